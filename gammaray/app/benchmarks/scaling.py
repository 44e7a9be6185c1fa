"""Step time, samples/s and bytes communicated per step: InfoNCE (all-gathered negatives) vs the gamma loss.

For each worker count (default 1 and 2) it starts that many processes (torch.distributed over gloo,
or NCCL with --gpu), builds the configured two-tower model in a DeepSpeed engine exactly as training
does, and times optimizer steps on synthetic batches (no data pipeline: this measures the step).
Every torch.distributed collective is wrapped and the bytes each rank hands to it are counted, by phase:
  loss     the loss's own traffic: InfoNCE all-gathers image and text embeddings (and sends their
           gradients back in backward); the gamma loss sends (index, log Z) pairs to the owner of each
           sample's rate and gets the updated rate back: O(batch) scalars, independent of the embedding size
  grads    DeepSpeed's gradient reduction (the same for both losses: it depends on the model size)
  params   DeepSpeed's parameter all-gather after the step (ZeRO-1/2) and the step's global row count
Rows (JSON): {"loss", "workers", "batch_size", "step_time_s", "samples_per_s", "bytes_per_step",
"loss_bytes_per_step", "grad_bytes_per_step", "param_bytes_per_step", "peak_gpu_mb", ...}; bytes are per
rank; peak_gpu_mb (--gpu) is the largest rank's torch.cuda.max_memory_allocated over the whole row
(model, engine, optimizer state and activations; a fresh model per row).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import socket
import tempfile
import time
from collections import defaultdict

VOCAB = 500
NUM_SAMPLES = 100_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gammaray.app.commands import add_config_args

    add_config_args(p)
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--losses", default="infonce,gamma", help="comma-separated loss kinds (default infonce,gamma)")
    p.add_argument("--batch-size", type=int, default=32, help="micro-batch per worker (default 32)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--gpu", action="store_true", help="one GPU per process, NCCL, bf16 (needs CUDA)")
    p.add_argument("--profile", metavar="PREFIX",
                   help="run the timed steps under torch.profiler and write rank 0's top operators per row to "
                        "PREFIX-LOSS-bB-zZ.txt (phases step/forward, loss, memory_exchange, backward, optimizer labelled); the row's "
                        "times then include the profiler's overhead and are marked profiled")
    p.add_argument("--process-per-row", action=argparse.BooleanOptionalAction, default=None,
                   help="start fresh processes for every loss, so no row's peak memory holds what the row before "
                        "left allocated (default: on with --gpu, off on CPU)")
    p.add_argument("--vocab-size", type=int, default=VOCAB,
                   help=f"text vocabulary of the synthetic tokens and the text tower (default {VOCAB}; "
                        "30522 for a BERT-size embedding table)")


# --------------------------------------------------------------------------------------------
# counting bytes


PAYLOAD_ARG = {  # which argument holds what this rank contributes
    "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "broadcast": "tensor", "reduce": "tensor",
    "all_gather": "tensor", "all_gather_single": "input_tensor", "all_gather_into_tensor": "input_tensor",
    "_all_gather_base": "input_tensor", "reduce_scatter_single": "input", "reduce_scatter_tensor": "input",
    "_reduce_scatter_base": "input", "reduce_scatter": "input_list",
    "all_to_all_single": "input", "all_to_all": "input_tensor_list",
    # gloo has no reduce-scatter: the backward of torch.distributed.nn's all_gather scatters from each rank
    "scatter": "scatter_list", "gather": "tensor",
}
# torch 2.13 renamed the flat collectives to *_single; the old names now call the new ones, so only
# the new name is counted where it exists (counting both would count every call twice)
FORWARDS_TO = {"all_gather_into_tensor": "all_gather_single", "_all_gather_base": "all_gather_single",
               "reduce_scatter_tensor": "reduce_scatter_single", "_reduce_scatter_base": "reduce_scatter_single"}


def _nbytes(x) -> int:
    import torch

    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter:
    """Wraps the torch.distributed collectives (DeepSpeed's comm layer calls them too) and adds the
    bytes each call hands over to the current phase."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.phase = "other"
        self._originals: dict = {}

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, arg in PAYLOAD_ARG.items():
            orig = getattr(c10d, name, None)
            if orig is None or hasattr(c10d, FORWARDS_TO.get(name, "-")):
                continue
            sig = inspect.signature(orig)

            def wrapped(*a, _orig=orig, _sig=sig, _arg=arg, **k):
                try:
                    payload = _sig.bind(*a, **k).arguments.get(_arg)
                except TypeError:
                    payload = None
                self.bytes[self.phase] += _nbytes(payload)
                self.calls[self.phase] += 1
                return _orig(*a, **k)

            self._originals[name] = orig
            for mod in (dist, c10d):
                setattr(mod, name, wrapped)

    def uninstall(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, orig in self._originals.items():
            for mod in (dist, c10d):
                setattr(mod, name, orig)

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    @contextlib.contextmanager
    def in_phase(self, name: str):
        prev, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = prev


# --------------------------------------------------------------------------------------------
# one process


def synthetic_batch(cfg, rank: int, world: int, step: int, device, vocab: int = VOCAB):
    import torch

    from gammaray.schema import BatchKeys as K

    B, H, L = cfg.data.batch_size, cfg.data.image_size, cfg.data.max_text_tokens
    g = torch.Generator().manual_seed(1000 * step + rank)
    start = (step * world + rank) * B
    batch = {K.SAMPLE_INDEX: (torch.arange(B) + start) % NUM_SAMPLES,
             K.PIXELS: torch.randn(B, 3, H, H, generator=g),
             K.INPUT_IDS: torch.randint(5, vocab, (B, L), generator=g),
             K.ATTENTION_MASK: torch.ones(B, L, dtype=torch.long)}
    return {k: v.to(device) for k, v in batch.items()}


def measure(cfg, loss: str, steps: int, warmup: int, counter: CommCounter, device, on_gpu: bool,
            vocab: int = VOCAB, profile: str | None = None) -> dict:
    """Collective: time `steps` optimizer steps of one loss on every rank of the current group."""
    import torch
    import torch.distributed as dist

    from gammaray.config import apply_overrides
    from workers.training.engine import build_engine, use_bf16
    from workers.models.registry import build_model
    from workers.training.objective import Objective
    from workers.training.step import prepare_batch, train_step

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = apply_overrides(cfg, {"loss.kind": loss, "loss.gather_negatives": loss in ("infonce", "siglip")})
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # what an earlier row left allocated (should be ~0); it is inside this row's peak
    start_mb = torch.cuda.memory_allocated(device) / 2**20 if on_gpu else 0.0
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=vocab, pad_token_id=0)
    objective = Objective(cfg.loss, num_samples=NUM_SAMPLES, seed=0, device=device, distributed=world > 1,
                          batch_size=cfg.data.batch_size)
    engine, _, _ = build_engine(model, cfg, total_steps=steps + warmup, on_gpu=on_gpu, device=device, in_ray=False)
    bf16 = use_bf16(cfg, on_gpu)
    reduce_grads = engine.allreduce_gradients

    def tagged_reduce(*a, **k):
        with counter.in_phase("grads"):
            return reduce_grads(*a, **k)

    engine.allreduce_gradients = tagged_reduce
    optimizer_step = engine.step

    def tagged_step():
        with counter.in_phase("params"):
            return optimizer_step()

    engine.step = tagged_step
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: partitioned
    from torch.profiler import ProfilerActivity

    prof = None
    if profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        prof = torch.profiler.profile(activities=activities)
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
            if on_gpu:
                torch.cuda.synchronize()
            counter.reset()
            if prof is not None:
                prof.__enter__()
            t0 = time.perf_counter()
        batch = synthetic_batch(cfg, rank, world, i, device, vocab)
        with counter.in_phase("params"):  # the step's global row count (its loss weight; never read on the host)
            n = torch.full((1,), cfg.data.batch_size, dtype=torch.long, device=device)
            dist.all_reduce(n)
        with counter.in_phase("loss"):  # the training loop's step (workers/training/step.py)
            train_step(engine, objective, prepare_batch(batch, bf16), i / (warmup + steps),
                       weight=cfg.data.batch_size * world / n[0].double(), touch=world > 1)
    if on_gpu:
        torch.cuda.synchronize()
    dist.barrier()
    dt = (time.perf_counter() - t0) / steps
    if prof is not None:
        prof.__exit__(None, None, None)
        if rank == 0:
            sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
            path = f"{profile}-{loss}-b{cfg.data.batch_size}-z{cfg.train.deepspeed.zero_stage}.txt"
            with open(path, "w") as f:
                f.write(f"{loss}, micro-batch {cfg.data.batch_size}, ZeRO-{cfg.train.deepspeed.zero_stage}, "
                        f"{steps} profiled steps, {dt:.4f} s/step with the profiler on\n")
                averages = prof.key_averages()  # aggregated once, read twice
                f.write(averages.table(sort_by=sort, row_limit=30))
                lines = averages.table(sort_by="cpu_time_total", row_limit=500).splitlines()
                f.write("\n\nphases (record_function):\n" + "\n".join(lines[:3]) + "\n")
                f.write("\n".join(line for line in lines if "step/" in line) + "\n")
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else 0.0
    phases = {k: counter.bytes.get(k, 0) / steps for k in ("loss", "grads", "params")}
    totals = torch.tensor([dt, phases["loss"], phases["grads"], phases["params"]], dtype=torch.float64, device=device)
    dist.all_reduce(totals)  # (not counted: the counter was read above)
    dt, lb, gb, pb = (totals / world).tolist()
    memory = torch.tensor([peak_mb, start_mb], dtype=torch.float64, device=device)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    del engine, model, objective  # the next row builds its own: its peak must not include this one
    B = cfg.data.batch_size
    return {"loss": loss, "workers": world, "batch_size": B, "step_time_s": round(dt, 5),
            "samples_per_s": round(B * world / dt, 2), "bytes_per_step": int(round(lb + gb + pb)),
            "loss_bytes_per_step": int(round(lb)), "grad_bytes_per_step": int(round(gb)),
            "param_bytes_per_step": int(round(pb)), "gather_negatives": cfg.loss.gather_negatives,
            "embed_dim": cfg.model.embed_dim, "params": params, "zero_stage": cfg.train.deepspeed.zero_stage,
            "image_size": cfg.data.image_size, "text_tokens": cfg.data.max_text_tokens, "vocab_size": vocab,
            "peak_gpu_mb": round(memory[0].item(), 1) if on_gpu else None,
            "start_gpu_mb": round(memory[1].item(), 1) if on_gpu else None, "profiled": bool(profile),
            "device": torch.cuda.get_device_name(device) if on_gpu else "cpu"}


def _worker(rank: int, world: int, port: int, cfg_json: dict, losses: list[str], steps: int, warmup: int,
            out_path: str, on_gpu: bool, vocab: int = VOCAB, profile: str | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import torch
    import torch.distributed as dist

    from gammaray.config import from_dict
    from workers.runtime import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    counter = CommCounter()
    counter.install()
    rows = []
    try:
        for loss in losses:
            rows.append(measure(from_dict(cfg_json), loss, steps, warmup, counter, device, on_gpu, vocab, profile))
            if on_gpu:
                gc.collect()
    finally:
        counter.uninstall()
        dist.destroy_process_group()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)


def bench(cfg, workers: list[int], losses: list[str], steps: int, warmup: int, on_gpu: bool = False,
          vocab: int = VOCAB, profile: str | None = None, process_per_row: bool | None = None) -> list[dict]:
    import torch.multiprocessing as mp

    if process_per_row is None:
        process_per_row = on_gpu
    groups = [[loss] for loss in losses] if process_per_row else [losses]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in workers:
            for group in groups:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                out = os.path.join(tmp, f"w{w}.json")
                mp.spawn(_worker, args=(w, port, cfg.model_dump(mode="json"), group, steps, warmup, out, on_gpu, vocab,
                                        profile), nprocs=w, join=True)
                with open(out) as f:
                    rows.extend(dict(r, rows_in_process=len(group)) for r in json.load(f))
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'loss':8} {'workers':>7} {'batch':>5} {'step s':>8} {'samples/s':>10} {'bytes/step':>11} " \
           f"{'loss B':>9} {'grads B':>10} {'params B':>10}"
    gpu = any(r.get("peak_gpu_mb") is not None for r in rows)
    if gpu:
        head += f" {'peak GPU MB':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r['loss']:8} {r['workers']:>7} {r['batch_size']:>5} {r['step_time_s']:>8.3f} "
                f"{r['samples_per_s']:>10.1f} {r['bytes_per_step']:>11,} {r['loss_bytes_per_step']:>9,} "
                f"{r['grad_bytes_per_step']:>10,} {r['param_bytes_per_step']:>10,}")
        if gpu:
            line += f" {r.get('peak_gpu_mb') or 0:>11,.0f}"
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from gammaray.app.commands import config_from_args
    from gammaray.config import apply_overrides

    cfg = apply_overrides(config_from_args(args), {"data.batch_size": args.batch_size,
                                                   "train.gradient_accumulation_steps": 1})
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("gammaray bench scaling: --gpu needs CUDA")
            return 2
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    rows = bench(cfg, workers, losses, args.steps, args.warmup, on_gpu=args.gpu, vocab=args.vocab_size,
                 profile=os.path.abspath(args.profile) if args.profile else None,
                 process_per_row=args.process_per_row)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
