"""How fast is a training step: gammaray's own step, as the training loop runs it, against a plain
PyTorch step of the same towers and loss maths, in one process on one device, side by side.

For each micro-batch (default 8, 16, 64, 256) and loss (infonce, gamma) it times
  gammaray   the loop's step: synthetic host batches (numpy, as the data stream hands them over:
             uint8 [B,H,W,3] pixels, normalised on the device by prepare_batch)
             through workers/batches.Lockstep (copied to the device one batch ahead), prepare_batch,
             workers/training/step.train_step on the engine the config builds (DeepSpeed or DDP, in a
             world of one), the device-side loss sums, and the metrics read every train.log_every steps
  reference  the step written the way the field writes a fast one: the same model (build_model), the
             same loss maths written out plainly (a plain tensor for the gamma memory), torch AdamW
             (fused on GPU, foreach on CPU) with the same parameter groups, schedule and clipping,
             bf16 autocast and channels_last on GPU, the uint8 pixels normalised on the device;
             no Ray, no DeepSpeed
  timm       (GPU only, `pip install gammaray[bench]`) timm's efficientnet_lite0 training step at
             224 px, bf16 autocast, channels_last, fused AdamW: an outside anchor for the image tower
in two regimes: "towers" (the configured towers train) and "heads" (locked towers: only the heads and
the temperature train, on cached features, as configs/locked-towers.yaml; feature widths 1280 / 384).

Per row: step_s (the fastest of --repeats timed windows of at least --steps steps and --min-window-s;
the windows of a micro-batch's losses and implementations alternate, so their ratios come from one
stretch of time), samples/s, FLOPs per sample (forward + backward counted by torch.utils.flop_counter,
every convolution's backward taken as 2x its forward: the counter's figure for depthwise
convolutions is an overcount), achieved TFLOP/s and the fraction of
the device's dense bf16 peak (PEAK_TFLOPS, or --peak-tflops; none on CPU unless given), host
synchronisations per steady-state step (counted: on GPU torch.cuda.set_sync_debug_mode; on CPU the
Python-level reads of a tensor's value, `.item() .tolist() .cpu() .numpy() int() float() bool()`,
patched for the timed window; the loop's metrics read every train.log_every steps is counted apart as
host_syncs_per_report), and peak memory (GPU: max allocated; CPU: the process's peak resident set
growth over the row). One row is also run under torch.profiler for its per-phase times.

Length (about 680 lines): the two steps being compared, their timing and the report stay in one file, so a
reader can check that the comparison is fair without leaving it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections import Counter

import numpy as np

# dense bf16 tensor-core peak (TFLOP/s, no sparsity) of common GPUs, matched on the device name
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}
HEADS_WIDTHS = (1280, 384)  # EfficientNet-Lite0's pooled features, all-MiniLM-L6-v2's
NUM_SAMPLES = 100_000
VOCAB = 500
HOST_STATE_MODULES = ("torch.optim",)
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-sizes", default="8,16,64,256", help="micro-batches (default 8,16,64,256)")
    p.add_argument("--losses", default="infonce,gamma", help="loss kinds (default infonce,gamma)")
    p.add_argument("--regimes", default="towers,heads", help="towers, heads or both (default both)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per window (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed windows per row, the losses and implementations of a micro-batch alternating; the "
                        "fastest counts (default 2)")
    p.add_argument("--min-window-s", type=float, default=0.5,
                   help="a window times at least --steps steps and at least this long (by the clock), so that rows "
                        "of a few milliseconds (the heads regime) are not timed over a scheduler's slice (default 0.5)")
    p.add_argument("--impls", default="gammaray,reference,timm", help="which steps to time (timm: GPU only)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s (default: PEAK_TFLOPS "
                   "by GPU name; none on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, for a CPU row on a shared "
                        "machine (with --threads 1 it is the step's own work, whatever runs beside it)")
    p.add_argument("--profile-row", default="gamma,16", metavar="LOSS,B",
                   help="the gammaray towers row run once more under torch.profiler for its phases ('' = none)")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list (PATH.details.json: phases, provenance)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of other (device, config, regime) already in --json (another run's)")
    p.add_argument("--png", metavar="PATH", help="plot samples/s against micro-batch")
    p.add_argument("--note", default="", help="provenance note stored in the details file (machine load, ...)")


# --------------------------------------------------------------------------------------------
# counting host synchronisations


class SyncCounter:
    """Counts host reads of tensor values while active. On CPU: the Python-level methods that read a
    value (SYNC_METHODS), patched on torch.Tensor; on CUDA: torch.cuda.set_sync_debug_mode("warn"),
    whose warnings are counted (every real stall on the GPU, whoever causes it)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.count = 0
        self.report_count = 0  # reads inside `report()`: the loop's metrics read every train.log_every steps
        self.reporting = False
        self.where: Counter = Counter()
        self._saved: dict = {}
        self._depth = 0

    def _wrap(self, name: str, orig):
        def wrapped(t, *a, **k):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            # torch.optim reads its per-parameter step counters, which live on the host by design
            # (capturable=False): on a GPU those reads never wait for the device
            if self._depth == 0 and not module.startswith(HOST_STATE_MODULES):
                if self.reporting:
                    self.report_count += 1
                else:
                    self.count += 1
                    self.where[f"{name} {module}:{caller.f_lineno}"] += 1
            self._depth += 1
            try:
                return orig(t, *a, **k)
            finally:
                self._depth -= 1
        return wrapped

    @contextlib.contextmanager
    def report(self):
        """Count the reads inside into report_count (GPU: the sync warnings are attributed after the
        window, so a GPU count includes the reports: one every train.log_every steps)."""
        self.reporting = True
        try:
            yield
        finally:
            self.reporting = False

    @contextlib.contextmanager
    def active(self):
        import torch

        if self.cuda:
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield self
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            hits = [w for w in caught if "synchroniz" in str(w.message)]
            self.count += len(hits)
            self.where.update(str(w.message)[:60] for w in hits)
            return
        for name in SYNC_METHODS:
            orig = getattr(torch.Tensor, name, None)
            if orig is not None:
                self._saved[name] = orig
                setattr(torch.Tensor, name, self._wrap(name, orig))
        try:
            yield self
        finally:
            for name, orig in self._saved.items():
                setattr(torch.Tensor, name, orig)
            self._saved.clear()


# --------------------------------------------------------------------------------------------
# synthetic data


def host_batches(cfg, regime: str, n: int, seed: int = 0):
    """n host batches as the training stream hands them over (numpy; pixels uint8 [B,H,W,3])."""
    from gammaray.schema import BatchKeys as K

    B = cfg.data.batch_size
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        index = (np.arange(B) + i * B) % NUM_SAMPLES
        if regime == "heads":
            b = {K.SAMPLE_INDEX: index, K.IMAGE_FEATURES: rng.standard_normal((B, HEADS_WIDTHS[0]), dtype=np.float32),
                 K.TEXT_FEATURES: rng.standard_normal((B, HEADS_WIDTHS[1]), dtype=np.float32)}
        else:
            H, L = cfg.data.image_size, cfg.data.max_text_tokens
            b = {K.SAMPLE_INDEX: index, K.PIXELS: rng.integers(0, 256, (B, H, H, 3), dtype=np.uint8),
                 K.INPUT_IDS: rng.integers(5, VOCAB, (B, L)), K.ATTENTION_MASK: np.ones((B, L), dtype=np.int64)}
        out.append(b)
    return out


def build(cfg, regime: str, device):
    import torch

    from workers.models.registry import build_model
    from workers.models.two_tower import TwoTowerModel

    torch.manual_seed(0)
    if regime == "heads":
        return TwoTowerModel(cfg.model, feature_widths=HEADS_WIDTHS)
    return build_model(cfg.model, vocab_size=VOCAB, pad_token_id=0)


# --------------------------------------------------------------------------------------------
# the two steps


class GammarayStep:
    """The training loop's step (workers/training/loop.py), on the engine the config builds."""

    def __init__(self, cfg, regime: str, device, total: int):
        import torch

        from workers.training.engine import DDPEngine, setting_on, build_engine, init_single_process_group, \
            optimizer_and_schedule, use_bf16
        from workers.training.objective import Objective
        from workers.training.step import DeviceLossSums

        on_gpu = device.type == "cuda"
        self.cfg, self.device, self.total = cfg, device, total
        self.model = build(cfg, regime, device)
        self.objective = Objective(cfg.loss, num_samples=NUM_SAMPLES, seed=0, device=device, distributed=False,
                                   batch_size=cfg.data.batch_size)
        if regime == "heads":  # workers/training/heads.py's engine
            self.model.to(device).train()
            opt, sched = optimizer_and_schedule(self.model, cfg, total, on_gpu)
            self.engine = DDPEngine.local(self.model, opt, sched, cfg, device, bf16=use_bf16(cfg, on_gpu))
        else:
            init_single_process_group()
            self.engine, _, _ = build_engine(self.model, cfg, total, on_gpu, device, in_ray=False)
        self.bf16 = use_bf16(cfg, on_gpu) and regime != "heads"
        self.channels_last = setting_on(cfg.train.channels_last, on_gpu)
        self.pin = on_gpu and setting_on(cfg.train.pin_memory, on_gpu)
        self.sums = DeviceLossSums()
        self.step_no = 0
        self.reports = 0
        torch.manual_seed(0)

    def run(self, batches, state, on_report=None) -> None:
        from types import SimpleNamespace

        from pipelines.stream import StreamBatch
        from workers.batches import Lockstep
        from workers.training.step import prepare_batch, scalars, train_step

        stream = (StreamBatch(b, 0, []) for b in batches)
        state = state or SimpleNamespace(loss_sums={})
        for sb, tensors, n, _last in Lockstep(stream, self.device, pin=self.pin):
            batch = prepare_batch(tensors, self.bf16, self.channels_last)
            terms = train_step(self.engine, self.objective, batch, self.step_no / max(1, self.total))
            self.sums.add(terms, n, state)
            self.step_no += 1
            if self.step_no % self.cfg.train.log_every == 0:
                if on_report is not None:
                    with on_report():
                        scalars(terms)
                else:
                    scalars(terms)


class ReferenceStep:
    """A plain PyTorch step of the same towers and loss maths (see the module's docstring)."""

    def __init__(self, cfg, regime: str, device, total: int):
        import torch

        from workers.training.engine import lr_lambda, param_groups

        on_gpu = device.type == "cuda"
        self.cfg, self.device, self.regime = cfg, device, regime
        self.model = build(cfg, regime, device).to(device).train()
        if on_gpu and regime == "towers":
            self.model.image_tower.to(memory_format=torch.channels_last)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        o = cfg.train.optim
        kernel = {"fused": True} if on_gpu else {"foreach": True}
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=o.betas, **kernel)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(o.warmup_steps, total, o.min_lr_ratio))
        self.autocast = on_gpu and regime == "towers"
        self.kind = cfg.loss.kind
        self.gamma = cfg.loss.gamma.gamma
        self.memory = torch.full((2, NUM_SAMPLES), float("nan"), device=device)  # log R per direction
        self.clip = cfg.train.gradient_clipping

    def loss(self, out, index):
        import torch
        import torch.nn.functional as F

        img, txt, scale = out["image"].float(), out["text"].float(), out["logit_scale"].float()
        logits = scale * img @ txt.T
        B = logits.shape[0]
        labels = torch.arange(B, device=logits.device)
        if self.kind == "infonce":
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        # gamma, mean mode, negatives only: log Z_hat over the off-diagonal, EMA in log space, u = 1/R
        eye = torch.eye(B, dtype=torch.bool, device=logits.device)
        total = 0.0
        for d, s in enumerate((logits, logits.T)):
            lz = torch.logsumexp(s.masked_fill(eye, -math.inf), dim=1) - math.log(max(B - 1, 1))
            with torch.no_grad():
                old = self.memory[d, index]
                new = torch.logaddexp(old + math.log1p(-self.gamma), lz + math.log(self.gamma))
                new = torch.where(torch.isnan(old), lz, new)
                self.memory[d, index] = new
            total = total + (-s.diagonal() + torch.exp(lz - new)).mean()
        return 0.5 * total

    def run(self, batches, state=None, on_report=None) -> None:
        import torch

        from gammaray.schema import BatchKeys as K

        pin = self.device.type == "cuda"
        for b in batches:
            batch = {k: (torch.from_numpy(v).pin_memory() if pin else torch.from_numpy(v)).to(self.device, non_blocking=True)
                     for k, v in b.items()}
            if K.PIXELS in batch:  # uint8 NHWC: the permute is channels_last; NCHW memory on CPU
                x = batch[K.PIXELS].permute(0, 3, 1, 2).float().mul_(1 / 127.5).sub_(1.0)
                batch[K.PIXELS] = x if self.device.type == "cuda" else x.contiguous()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(batch)
            loss = self.loss(out, batch[K.SAMPLE_INDEX])
            loss.backward()
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)


class TimmStep:
    """timm's efficientnet_lite0 classifier step (GPU): the image tower's outside anchor."""

    def __init__(self, cfg, regime: str, device, total: int):
        import timm
        import torch

        self.device = device
        self.model = timm.create_model("efficientnet_lite0", num_classes=1000).to(device).train()
        self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)

    def run(self, batches, state=None, on_report=None) -> None:
        import torch
        import torch.nn.functional as F

        for b in batches:
            x = torch.from_numpy(b["timm_pixels"]).pin_memory().to(self.device, non_blocking=True)
            y = torch.from_numpy(b["timm_labels"]).pin_memory().to(self.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(self.model(x.contiguous(memory_format=torch.channels_last)), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


IMPLS = {"gammaray": GammarayStep, "reference": ReferenceStep, "timm": TimmStep}


# --------------------------------------------------------------------------------------------
# measuring


def flops_per_sample(cfg, regime: str, device) -> float:
    """Forward + backward FLOPs of one sample of the model and loss (torch.utils.flop_counter), with
    every convolution's backward taken as twice its forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workers.training.step import prepare_batch

    ref = ReferenceStep(cfg, regime, device, total=10)
    b = prepare_batch({k: torch.from_numpy(v).to(device) for k, v in host_batches(cfg, regime, 1, seed=9)[0].items()})
    with FlopCounterMode(display=False) as fc:
        out = ref.model(b)
        ref.loss(out, b["sample_index"]).backward()
    ops = fc.get_flop_counts()["Global"]
    conv_fwd = sum(v for k, v in ops.items() if "convolution" in str(k) and "backward" not in str(k))
    rest = sum(v for k, v in ops.items() if "convolution" not in str(k))
    return (rest + 3 * conv_fwd) / cfg.data.batch_size


def device_name(device, clock: str = "wall") -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    timed = ", CPU time" if clock == "cpu" else ""
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' if n != 1 else ''}{timed})"


def peak_of(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def time_window(step, batches, warmup: int, steps: int, device, counter: SyncCounter | None = None,
                clock=time.perf_counter) -> tuple[float, dict]:
    """Seconds per step over `steps` timed steps after `warmup` (the step's own pipeline, one window)."""
    import torch

    from gammaray.app.benchmarks.common import peak_rss, reset_peak_rss

    state = None
    step.run(batches[:warmup], state)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    base = reset_peak_rss()
    ctx = counter.active() if counter is not None else contextlib.nullcontext()
    t0 = clock()
    with ctx:
        step.run(batches[warmup:warmup + steps], state, on_report=counter.report if counter is not None else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
    dt = (clock() - t0) / steps
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else (peak_rss() - base) / 2**20
    return dt, {"peak_mem_mb": round(mem, 1), "report_syncs": counter.report_count if counter is not None else None}


def window_steps(cfg, regime: str, args, device, clock) -> int:
    """Steps per timed window: --steps, more where that would take under --min-window-s (a heads step
    is a few milliseconds), from the clock's time of the gammaray step's warmup."""
    if args.min_window_s <= 0:
        return args.steps
    warm, timed = max(1, args.warmup), 3
    step = GammarayStep(cfg, regime, device, warm + timed)
    batches = host_batches(cfg, regime, warm + timed)
    step.run(batches[:warm], None)
    t0 = clock()
    step.run(batches[warm:], None)
    per_step = max(1e-6, (clock() - t0) / timed)
    return max(args.steps, min(2000, math.ceil(args.min_window_s / per_step)))


def measure_row(cfg, regime: str, losses: list[str], B: int, impls: list[str], args, device) -> list[dict]:
    """The rows of one (regime, micro-batch): every loss and implementation, their windows alternating
    (so the ratios between them, gammaray / reference and a loss against another, come from one stretch
    of time); each row keeps its fastest window."""
    from gammaray.config import apply_overrides

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfgs = {loss: apply_overrides(cfg, {"loss.kind": loss, "data.batch_size": B, "train.gradient_accumulation_steps": 1})
            for loss in losses}
    steps = window_steps(cfgs[losses[0]], regime, args, device, clock)
    total = args.warmup + steps
    batches = {loss: host_batches(c, regime, total) for loss, c in cfgs.items()}
    if "timm" in impls:
        rng = np.random.default_rng(1)
        for bs in batches.values():
            for b in bs:
                b["timm_pixels"] = rng.standard_normal((B, 3, 224, 224), dtype=np.float32)
                b["timm_labels"] = rng.integers(0, 1000, B)
    flops = {loss: flops_per_sample(c, regime, device) for loss, c in cfgs.items()}
    best: dict[tuple[str, str], tuple[float, dict]] = {}
    for rep in range(args.repeats):
        for loss in losses:
            for impl in impls:
                step = IMPLS[impl](cfgs[loss], regime, device, total * args.repeats)
                plain = [{k: v for k, v in b.items() if not k.startswith("timm_")} for b in batches[loss]] \
                    if impl != "timm" else batches[loss]
                counter = SyncCounter(device.type == "cuda") if rep == 0 else None
                dt, extra = time_window(step, plain, args.warmup, steps, device, counter, clock)
                if counter is not None:
                    extra["syncs"] = counter.count / steps
                    extra["sync_where"] = dict(counter.where)
                key = (loss, impl)
                if key not in best or dt < best[key][0]:
                    best[key] = (dt, {**best.get(key, (0, {}))[1], **extra, "steps": steps})
                del step
    name = device_name(device, args.clock)
    peak = peak_of(name, args.peak_tflops)
    rows = []
    for (loss, impl), (dt, extra) in best.items():
        f = flops[loss] if impl != "timm" else None
        tflops = f * B / dt / 1e12 if f else None
        rows.append({"device": name, "config": args.config_name, "impl": impl, "regime": regime, "loss": loss,
                     "batch_size": B, "step_s": round(dt, 6), "samples_per_s": float(f"{B / dt:.5g}"),
                     "host_syncs_per_step": extra.get("syncs"), "host_syncs_per_report": extra.get("report_syncs"),
                     "sync_sites": extra.get("sync_where"),
                     "flops_per_sample": round(f) if f else None, "tflops": float(f"{tflops:.4g}") if tflops else None,  # significant digits: CPU rows are ~1e-4
                     "peak_fraction": float(f"{tflops / peak:.4g}") if tflops and peak else None,
                     "peak_mem_mb": extra.get("peak_mem_mb"), "window_steps": extra["steps"]})
    return rows


def phases(cfg, loss: str, B: int, args, device) -> dict:
    """Per-phase times (ms per step) of the gammaray towers step from torch.profiler's record_function
    labels (workers/training/step.py, the gamma memory exchange)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gammaray.config import apply_overrides

    cfg = apply_overrides(cfg, {"loss.kind": loss, "data.batch_size": B, "train.gradient_accumulation_steps": 1})
    batches = host_batches(cfg, "towers", args.warmup + args.steps)
    step = GammarayStep(cfg, "towers", device, args.warmup + args.steps)
    step.run(batches[:args.warmup], None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t0 = clock()
    with profile(activities=acts) as prof:
        step.run(batches[args.warmup:], None)
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (clock() - t0) / args.steps
    out = {"loss": loss, "batch_size": B, "step_ms_profiled": round(wall * 1e3, 3), "clock": args.clock, "phases_ms": {}}
    for e in prof.key_averages():
        if e.key.startswith("step/"):
            out["phases_ms"][e.key[5:]] = round(e.cpu_time_total / 1e3 / args.steps, 3)
    return out


# --------------------------------------------------------------------------------------------
# output


def ratios(rows: list[dict]) -> dict:
    """gammaray / reference step time per "device | config/regime/loss/batch"."""
    by = {(r["device"], r["config"], r["regime"], r["loss"], r["batch_size"], r["impl"]): r["step_s"] for r in rows}
    return {ratio_key(*k[:5]): round(by[k] / by[k[:5] + ("reference",)], 3)
            for k in by if k[5] == "gammaray" and k[:5] + ("reference",) in by}


def ratio_key(device: str, config: str, regime: str, loss: str, batch: int) -> str:
    return f"{device} | {config}/{regime}/{loss}/{batch}"


def table(rows: list[dict]) -> str:
    from gammaray.app.benchmarks.common import markdown_table

    r_by = ratios(rows)
    out = []
    for r in rows:
        key = ratio_key(r["device"], r["config"], r["regime"], r["loss"], r["batch_size"])
        ratio = r_by.get(key) if r["impl"] == "gammaray" else None
        out.append([r["config"], r["regime"], r["loss"], str(r["batch_size"]), r["impl"], f"{r['step_s'] * 1e3:.2f}",
                    f"{r['samples_per_s']:.0f}", f"{ratio:.2f}" if ratio else "",
                    f"{r['flops_per_sample'] / 1e6:.1f}" if r["flops_per_sample"] else "",
                    f"{r['tflops']:.3f}" if r["tflops"] else "",
                    f"{100 * r['peak_fraction']:.2f}%" if r["peak_fraction"] else "",
                    "" if r["host_syncs_per_step"] is None else f"{r['host_syncs_per_step']:g}",
                    f"{r['peak_mem_mb']:.0f}"])
    return markdown_table(["config", "regime", "loss", "micro-batch", "step", "ms/step", "samples/s", "gammaray / reference",
                           "MFLOP/sample", "TFLOP/s", "of peak", "host syncs/step", "peak MB"], out)


def summary(rows: list[dict]) -> list[str]:
    """The figures a reader wants first, per (device, config): the fixed cost of a step (intercept of a
    least-squares line through gammaray's towers step times against the micro-batch), the best
    fraction of peak, the issue's bars (gammaray / reference <= 1.15 at 16 and <= 1.05 at 256; heads:
    gamma within 1.15x of InfoNCE at 16) and the host reads per step."""
    r_by = ratios(rows)
    lines = []
    for device, config in sorted({(r["device"], r["config"]) for r in rows}):
        mine = [r for r in rows if r["device"] == device and r["config"] == config]
        head = f"**{config}** on {device}:"
        tow = [(r["batch_size"], r["step_s"]) for r in mine if r["impl"] == "gammaray" and r["regime"] == "towers"]
        parts = []
        if len({b for b, _ in tow}) >= 3:  # a line through two noisy points says nothing
            xs, ys = np.array([b for b, _ in tow], float), np.array([t for _, t in tow], float)
            slope, icpt = np.polyfit(xs, ys, 1)
            if icpt > 0 and slope > 0:
                parts.append(f"fixed cost {icpt * 1e3:.1f} ms per step + {slope * 1e3:.2f} ms per sample "
                             "(gammaray towers step)")
        fr = [r["peak_fraction"] for r in mine if r["peak_fraction"] and r["impl"] == "gammaray"]
        if fr:
            parts.append(f"at most {100 * max(fr):.2f}% of the device's peak")
        syncs = [r["host_syncs_per_step"] for r in mine if r["impl"] == "gammaray" and r["host_syncs_per_step"] is not None]
        if syncs:
            parts.append(f"host reads per steady-state step: {max(syncs):g} (gammaray, counted)")
        bars = []
        for loss in ("infonce", "gamma"):
            for B, bar in ((16, 1.15), (256, 1.05)):
                v = r_by.get(ratio_key(device, config, "towers", loss, B))
                if v is not None:
                    bars.append(f"{loss} {B}: {_against(v, bar)}")
        by = {(r["loss"], r["batch_size"]): r["step_s"] for r in mine if r["impl"] == "gammaray" and r["regime"] == "heads"}
        if ("gamma", 16) in by and ("infonce", 16) in by:
            v = by["gamma", 16] / by["infonce", 16]
            bars.append(f"heads gamma / InfoNCE at 16: {_against(v, 1.15)}")
        lines.append(f"{head} {'; '.join(parts)}." + (f" gammaray / reference: {'; '.join(bars)}." if bars else ""))
    return lines


def _against(v: float, bar: float) -> str:
    """A ratio and its verdict, with a third decimal where two would print the bar itself."""
    shown = f"{v:.3f}" if f"{v:.2f}" == f"{bar:.2f}" else f"{v:.2f}"
    return f"{shown} ({'meets' if v <= bar else 'misses'} <= {bar})"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["config"], r["regime"], r["loss"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.2), squeeze=False)
    for ax, (conf, reg, loss) in zip(axes[0], groups):
        for impl, style in (("gammaray", "o-"), ("reference", "s--"), ("timm", "^:")):
            pts = sorted((r["batch_size"], r["samples_per_s"]) for r in rows
                         if r["config"] == conf and r["regime"] == reg and r["loss"] == loss and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), style, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{conf.removesuffix('.yaml')}\n{reg}, {loss}", fontsize=8)
        ax.set_xlabel("micro-batch")
    axes[0][0].set_ylabel("samples/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(", ".join(sorted({r["device"].split(" (")[0] + ": " + r["config"] for r in rows})), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace, cfg) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    args.config_name = os.path.basename(args.config) if getattr(args, "config", None) else "demo.yaml"
    if cfg.train.strategy != "deepspeed":  # the engine is part of what a row measures
        args.config_name += f" + {cfg.train.strategy}"
    impls = [x for x in args.impls.split(",") if x]
    if args.clock == "cpu" and on_gpu:
        print("gammaray bench step: --clock cpu times a CPU row (a GPU step's time is the device's): use --clock wall")
        return 2
    if "timm" in impls and not on_gpu:
        print("gammaray bench step: no timm row on CPU (it anchors the GPU figures; set train.use_gpu=true on a GPU)")
        impls.remove("timm")
    if "timm" in impls:
        try:
            import timm  # noqa: F401
        except ImportError:
            print("gammaray bench step: timm is not installed (pip install 'gammaray[bench]'): no timm row")
            impls.remove("timm")
    rows: list[dict] = []
    losses = [x for x in args.losses.split(",") if x]
    for regime in [x for x in args.regimes.split(",") if x]:
        for B in [int(x) for x in args.batch_sizes.split(",") if x]:
            got = measure_row(cfg, regime, losses, B, [i for i in impls if regime == "towers" or i != "timm"],
                              args, device)
            rows += got
            for r in got:
                print(f"{regime:6} {r['loss']:8} B={B:<4} {r['impl']:9} {r['step_s'] * 1e3:8.2f} ms  "
                      f"{r['samples_per_s']:9.0f}/s  syncs/step {r['host_syncs_per_step']}  "
                      f"({r['window_steps']} steps a window)", flush=True)
    rows.sort(key=lambda r: (r["regime"] != "towers", r["loss"] != "infonce", r["batch_size"], r["impl"]))
    print(table(rows))
    print("gammaray / reference:", json.dumps(ratios(rows)))
    details = {"note": args.note, "torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
               "steps": args.steps, "min_window_s": args.min_window_s, "warmup": args.warmup, "repeats": args.repeats,
               "ratios": ratios(rows)}
    if args.profile_row:
        loss, B = args.profile_row.split(",")
        details["profile"] = phases(cfg, loss, int(B), args, device)
        print("phases (ms/step, profiled):", json.dumps(details["profile"]))
    details = {f"{rows[0]['device']} | {args.config_name} | {args.regimes}": details} if rows else {}
    if args.json and args.append and os.path.exists(args.json):
        mine = {(r["device"], r["config"], r["regime"]) for r in rows}
        with open(args.json) as f:
            rows = [r for r in json.load(f) if (r["device"], r["config"], r["regime"]) not in mine] + rows
        dpath = args.json.removesuffix(".json") + ".details.json"
        if os.path.exists(dpath):
            with open(dpath) as f:
                details = {**json.load(f), **details}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        with open(args.json.removesuffix(".json") + ".details.json", "w") as f:
            json.dump(details, f, indent=1)
    if args.png:
        plot(rows, args.png)
    return 0
