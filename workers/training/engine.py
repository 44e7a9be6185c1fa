"""The training engine from the config tree: DeepSpeed (ZeRO 0/1/2/3, bf16, accumulation, clipping) or
torch DDP (`ray.train.torch.prepare_model`, workers/training/ddp.py), both with torch AdamW and linear
warm-up + cosine decay.

Both strategies expose the DeepSpeed engine calls the loop uses (`engine(batch)`, `backward`, `step`,
`set_gradient_accumulation_boundary`, `global_steps`, `module`, `train`/`eval`,
`save_checkpoint`/`load_checkpoint`), so `workers/training/loop.py` has one loop.

Checkpoints (`EngineState`, the engine and its LR schedule as one checkpoint component, over
`save_state` / `load_state`):
- DeepSpeed's own files: one per rank (ZeRO partitions the fp32 master weights and Adam moments by
  rank). They restore a run on the same worker count exactly.
- A *portable* copy (`portable.pt`, written by rank 0 when train.portable_checkpoint): the full fp32
  master weights, both Adam moments and the step count per named parameter, the LR scheduler, the
  module buffers and the engine counters. DeepSpeed 0.19 refuses its own optimizer files on a
  different data-parallel size ("Automatic adjustment of ZeRO's optimizer state partitioning with a
  new world size is not currently supported") unless they are first converted offline to its
  "universal" format; the portable copy is gathered with DeepSpeed's public
  `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` and scattered back with the matching
  `safe_set_*` calls, which work for ZeRO 1, 2, 3 and the bf16 optimizer alike.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist

from gammaray.config import GammarayConfig
from workers.safe_load import check_deepspeed_files, load as load_data
from workers.training.ddp import DDPEngine

NO_DECAY_HINTS = ("bias", "norm", "layernorm", "log_logit_scale", "logit_bias", "embeddings")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
PORTABLE_FILE = "portable.pt"


def use_bf16(cfg: GammarayConfig, on_gpu: bool) -> bool:
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and on_gpu)


def deepspeed_config(cfg: GammarayConfig, on_gpu: bool) -> dict:
    ds = cfg.train.deepspeed
    conf = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": use_bf16(cfg, on_gpu)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # always explicit: DeepSpeed 0.19's default is 1.0, so leaving the key out for "off" still clips
        "gradient_clipping": cfg.train.gradient_clipping,
    }
    return conf


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(h in name.lower() for h in NO_DECAY_HINTS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * t))

    return f


def adamw_kernel(cfg: GammarayConfig, on_gpu: bool) -> dict:
    """torch AdamW's keyword for `train.optim.implementation` (auto: fused on GPU, foreach on CPU)."""
    impl = cfg.train.optim.implementation
    if impl == "auto":
        impl = "fused" if on_gpu else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]


def setting_on(value, on_gpu: bool) -> bool:
    """A fast-step key: true, false, or "auto" (= on GPU only)."""
    return on_gpu if value == "auto" else bool(value)


def fast_step_setup(model: torch.nn.Module, cfg: GammarayConfig, on_gpu: bool) -> torch.nn.Module:
    """What a fast step uses, applied once before the engine is built: TF32 matmuls and convolutions,
    the image tower in channels_last, torch.compile (train.compile). Each is a config key whose
    "auto" means on GPU only; none changes the maths beyond float rounding (tests/test_training_step.py)."""
    t = cfg.train
    if on_gpu and setting_on(t.tf32, on_gpu):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    if setting_on(t.channels_last, on_gpu) and getattr(model, "image_tower", None) is not None:
        model.image_tower.to(memory_format=torch.channels_last)
    if t.compile:
        model.compile()
    return model


def optimizer_and_schedule(model: torch.nn.Module, cfg: GammarayConfig, total_steps: int, on_gpu: bool = False):
    o = cfg.train.optim
    # a torch optimizer avoids DeepSpeed's fused_adam JIT build and behaves the same on CPU and GPU
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas,
                                  **adamw_kernel(cfg, on_gpu))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, total_steps, o.min_lr_ratio))
    return optimizer, scheduler


def build_engine(model: torch.nn.Module, cfg: GammarayConfig, total_steps: int, on_gpu: bool,
                 device: torch.device | None = None, in_ray: bool = True):
    """(engine, optimizer, scheduler). The process group must already exist (Ray Train made it)."""
    fast_step_setup(model, cfg, on_gpu)
    if cfg.train.strategy == "ddp":
        optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps, on_gpu)
        engine = DDPEngine(model, optimizer, scheduler, cfg, device or torch.device("cpu"),
                           bf16=use_bf16(cfg, on_gpu), in_ray=in_ray)
        return engine, optimizer, scheduler
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    from workers.runtime import import_deepspeed

    deepspeed = import_deepspeed()

    # the shared-memory comm op is JIT-compiled on first use (~35 s on CPU) and not needed here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    forget_stale_deepspeed_groups()
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps, on_gpu)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, on_gpu),
        dist_init_required=False,
    )
    if use_bf16(cfg, on_gpu):
        # DeepSpeed casts the parameters to bf16 but not the buffers: BatchNorm (the ResNet image tower)
        # then fails with "expected scalar type BFloat16 but found Float"
        for m in engine.module.modules():
            for name, b in m._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != torch.bfloat16:
                    m._buffers[name] = b.to(torch.bfloat16)
    return engine, optimizer, scheduler


def set_total_steps(scheduler, cfg: GammarayConfig, total_steps: int) -> None:
    """Re-plan the cosine decay for a new total (a resume on a different worker count changes the
    number of steps left) and put the optimizer's learning rates where the new plan says."""
    o = cfg.train.optim
    f = lr_lambda(o.warmup_steps, total_steps, o.min_lr_ratio)
    scheduler.lr_lambdas = [f] * len(scheduler.lr_lambdas)
    lrs = [base * f(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


# --------------------------------------------------------------------------------------------
# checkpoints


def is_zero3(engine) -> bool:
    return not isinstance(engine, DDPEngine) and engine.zero_optimization_stage() == 3


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the Adam state (DeepSpeed's ZeRO and bf16 wrappers keep it in
    `.optimizer`, keyed by their flat fp32 partitions)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _gathered(engine, params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    if is_zero3(engine):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return nullcontext()


def _ensure_adam_state(engine) -> None:
    """Give every flat partition an Adam state (zeros, step 0: what AdamW creates at its first step)
    and link DeepSpeed's per-parameter views to it, so that `safe_*_full_optimizer_state` work on an
    engine that has not stepped yet."""
    base = base_optimizer(engine)
    opt = engine.optimizer
    # ZeRO-3 lists its flat fp32 partitions in the torch optimizer's groups only while it steps
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
    for p in flats:
        st = base.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 and the bf16 optimizer
        # always re-link: DeepSpeed 0.19 links once, right after the FIRST param group's first step,
        # so the views of every later group point at an empty state (safe_get_* then fails)
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _full_value(engine, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """Collective: the full fp32 master weight (key None) or Adam moment of one parameter."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    v = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if v is None:  # a plain fp32 parameter (ZeRO 0 without bf16): the optimizer holds it directly
        v = p.detach() if key is None else base_optimizer(engine).state[p][key]
    return v.detach().float().cpu().clone()


def _set_zero3_partition(p: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of a ZeRO-3 fp32 master weight or Adam moment. DeepSpeed 0.19's own
    `set_full_hp_param` narrows the unpadded value by the padded partition size, which fails when the
    parameter's size is not a multiple of the world size (e.g. a shape-(1,) temperature on 3 ranks)."""
    opt = p._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n, r, world = part.numel(), opt._get_param_partition_rank(p), opt._get_param_partition_world_size(p)
    flat = torch.zeros(n * world, dtype=part.dtype)
    flat[: value.numel()] = value.flatten().to(part.dtype)
    part.data.copy_(flat[r * n:(r + 1) * n].to(part.device))


def _set_full_value(engine, p: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero3 = hasattr(p, "ds_id")
    if key is None:
        with _gathered(engine, [p], modifier_rank=0):
            p.data.copy_(value.to(device=p.device, dtype=p.dtype).view_as(p.data))  # the low-precision copy
        if p.requires_grad and zero3:
            _set_zero3_partition(p, value, None)
        elif p.requires_grad:
            safe_set_full_fp32_param(p, value.to(p.device))                          # the fp32 master, if separate
        return
    if zero3:
        _set_zero3_partition(p, value, key)
    elif hasattr(p, "_hp_mapping"):
        safe_set_full_optimizer_state(p, value.to(p.device), key)
    else:
        base_optimizer(engine).state[p][key].copy_(value.view_as(p))


def portable_state(engine, scheduler) -> dict | None:
    """Collective over all ranks; every rank gets the world-size-independent training state (None
    for DDP, whose own checkpoint already is)."""
    if isinstance(engine, DDPEngine):
        return None  # the DDP checkpoint is already complete on every rank
    _ensure_adam_state(engine)
    out: dict[str, Any] = {"format": 1, "params": {}, "frozen": {}, **{k: {} for k in ADAM_KEYS}}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            with _gathered(engine, [p]):
                out["frozen"][name] = p.detach().float().cpu().clone()
            continue
        out["params"][name] = _full_value(engine, p, None)
        for k in ADAM_KEYS:
            out[k][name] = _full_value(engine, p, k)
    base = base_optimizer(engine)
    steps = {float(st["step"]) for st in base.state.values() if "step" in st}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer partitions disagree on the step count: {sorted(steps)}")
    out["optimizer_step"] = steps.pop() if steps else 0.0
    out["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    out["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    out["buffers"] = {n: b.detach().cpu().clone() for n, b in engine.module.named_buffers()}
    out["engine"] = {k: int(getattr(engine, k, 0)) for k in ("global_steps", "global_samples", "micro_steps",
                                                               "skipped_steps")}
    return out


def load_portable_state(engine, scheduler, state: dict) -> None:
    """Collective: put a `portable_state` into an engine of any world size and ZeRO stage."""
    _ensure_adam_state(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            _set_full_value(engine, p, state["frozen"][name], None)
            continue
        _set_full_value(engine, p, state["params"][name], None)
        for k in ADAM_KEYS:
            _set_full_value(engine, p, state[k][name], k)
    base = base_optimizer(engine)
    for st in base.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], state["optimizer_step"]) if torch.is_tensor(st["step"]) \
                else state["optimizer_step"]
    for group, saved in zip(base.param_groups, state["param_groups"]):
        group["lr"] = saved["lr"]
    buffers = dict(engine.module.named_buffers())
    for n, b in state["buffers"].items():
        if n in buffers:
            buffers[n].copy_(b.to(buffers[n]))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    for k, v in state["engine"].items():
        if hasattr(engine, k):
            setattr(engine, k, v)


def save_state(engine, scheduler, d: str, portable: bool) -> None:
    """Every rank: the engine's own checkpoint (per rank) and, once, the portable copy."""
    engine.save_checkpoint(os.path.join(d, "deepspeed"), tag="state")
    if portable:
        state = portable_state(engine, scheduler)
        if state is not None and (dist.get_rank() if dist.is_initialized() else 0) == 0:
            torch.save(state, os.path.join(d, PORTABLE_FILE))


def load_state(engine, scheduler, d: str, same_world: bool, shown: str | None = None) -> str:
    """Every rank. Returns how the optimizer state came back: 'exact' (same worker count, the
    engine's own files), 'portable' (different worker count, from the portable copy) or
    'weights-only' (different worker count and no portable copy: fresh optimizer). Files that
    would run code are refused (safe_load); `shown` names the checkpoint in that error."""
    shown = shown or d
    if same_world or isinstance(engine, DDPEngine):
        check_deepspeed_files(os.path.join(d, "deepspeed"), f"{shown}/deepspeed")  # DeepSpeed unpickles them
        engine.load_checkpoint(os.path.join(d, "deepspeed"), tag="state")
        return "exact"
    path = os.path.join(d, PORTABLE_FILE)
    if os.path.exists(path):
        load_portable_state(engine, scheduler, load_data(path, f"{shown}/{PORTABLE_FILE}"))
        return "portable"
    if is_zero3(engine):
        raise RuntimeError(f"{d}: a ZeRO-3 checkpoint without {PORTABLE_FILE} cannot be loaded on a different "
                           "worker count (its weights are partitioned by rank); save with train.portable_checkpoint")
    check_deepspeed_files(os.path.join(d, "deepspeed"), f"{shown}/deepspeed")
    engine.load_checkpoint(os.path.join(d, "deepspeed"), tag="state", load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)
    return "weights-only"


class EngineState:
    """The engine (DeepSpeed or DDP) and its LR schedule as one checkpoint component.

    `state_dict()` is the world-size-independent state (collective: every rank gets it): DeepSpeed's
    portable copy, or DDP's replicated state; `load_state_dict` puts it into an engine of any worker
    count and ZeRO stage. In a checkpoint folder the engine writes its own files (`save`: DeepSpeed's
    per-rank files and, with train.portable_checkpoint, the portable copy) and reads them back (`load`:
    exactly on the same worker count; on another, re-sharded from the portable copy)."""

    def __init__(self, engine, scheduler, cfg: GammarayConfig):
        self.engine, self.scheduler, self.cfg = engine, scheduler, cfg

    def state_dict(self) -> dict:
        if isinstance(self.engine, DDPEngine):
            return self.engine.state_dict()
        return portable_state(self.engine, self.scheduler)

    def load_state_dict(self, state_dict: dict) -> None:
        if isinstance(self.engine, DDPEngine):
            self.engine.load_state_dict(state_dict)
        else:
            load_portable_state(self.engine, self.scheduler, state_dict)

    def save(self, d: str) -> None:
        save_state(self.engine, self.scheduler, d, self.cfg.train.portable_checkpoint)

    def load(self, d: str, same_world: bool, shown: str | None = None) -> str:
        """How the optimizer state came back (`load_state`: exact, portable or weights-only)."""
        return load_state(self.engine, self.scheduler, d, same_world, shown)

    def set_total_steps(self, total_steps: int) -> None:
        set_total_steps(self.scheduler, self.cfg, total_steps)


def forget_stale_deepspeed_groups() -> None:
    """DeepSpeed keeps a module-level clone of the world group made by the first engine of a process.
    When that process group was destroyed and a new one made (a second in-process run: notebooks,
    train.workers=0 twice), the clone names a dead group and deepspeed.initialize fails with
    "Group ... is not registered"; drop it so DeepSpeed clones the live world again."""
    from deepspeed.utils import groups

    stale = groups._WORLD_GROUP  # noqa: SLF001 - DeepSpeed offers no reset
    if stale is not None and stale not in dist.distributed_c10d._world.pg_group_ranks:  # noqa: SLF001
        groups._WORLD_GROUP = None


def init_single_process_group() -> None:
    """A world of one for the driver-side loop (ScalingConfig(num_workers=0), notebooks)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    # an in-memory store: a world of one needs no port (a port picked free and bound later can be
    # taken in between, and a MASTER_PORT inherited from a parent may still be bound by it)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
