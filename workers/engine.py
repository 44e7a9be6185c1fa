"""DeepSpeed set-up from the config tree: ZeRO stage, precision, accumulation, clipping, AdamW with
linear warm-up and cosine decay."""

from __future__ import annotations

import math
import os

import torch

from gammaray.config import GammarayConfig

NO_DECAY_HINTS = ("bias", "norm", "layernorm", "log_logit_scale", "logit_bias", "embeddings")


def use_bf16(cfg: GammarayConfig, on_gpu: bool) -> bool:
    p = cfg.train.deepspeed.precision
    return p == "bf16" or (p == "auto" and on_gpu)


def deepspeed_config(cfg: GammarayConfig, on_gpu: bool) -> dict:
    ds = cfg.train.deepspeed
    conf = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": use_bf16(cfg, on_gpu)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.gradient_clipping > 0:
        conf["gradient_clipping"] = ds.gradient_clipping
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


def build_engine(model: torch.nn.Module, cfg: GammarayConfig, total_steps: int, on_gpu: bool):
    """(engine, optimizer, scheduler). The process group must already exist (Ray Train made it)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed

    # the shared-memory comm op is JIT-compiled on first use (~35 s on CPU) and not needed here
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    o = cfg.train.optim
    # a torch optimizer avoids DeepSpeed's fused_adam JIT build and behaves the same on CPU and GPU
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, total_steps, o.min_lr_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, on_gpu),
        dist_init_required=False,
    )
    return engine, optimizer, scheduler


def init_single_process_group() -> None:
    """A world of one for the driver-side loop (ScalingConfig(num_workers=0), notebooks)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("gloo", rank=0, world_size=1)
