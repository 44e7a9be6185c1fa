"""torch DistributedDataParallel behind the DeepSpeed engine's calls (`train.strategy=ddp`, and the
one-process engine of the in-process loops): the loop in workers/training/loop.py drives either engine
the same way."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist

from gammaray.config import GammarayConfig
from workers.safe_load import load as load_data

DDP_FILE = "ddp_state.pt"


class _LeafSafe(torch.nn.Module):
    """Gives outputs that are parameters themselves (e.g. `logit_bias.float()` of an fp32 parameter) a
    graph node, so DDP's unused-parameter search finds them instead of marking them ready twice."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        out = self.model(batch)
        return {k: v.view_as(v) if torch.is_tensor(v) and v.requires_grad and v.grad_fn is None else v
                for k, v in out.items()}


class DDPEngine:
    """torch DistributedDataParallel (through Ray's `prepare_model` inside Ray Train) behind the
    DeepSpeed calls the loop makes: the loss is divided by the accumulation steps, gradients are
    synchronised only at accumulation boundaries, clipped, then AdamW and the schedule step. bf16
    runs under autocast with fp32 weights. The optimizer state is replicated, so a checkpoint loads
    on any worker count."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, cfg: GammarayConfig, device: torch.device,
                 bf16: bool, in_ray: bool, gas: int | None = None, wrap: bool = True):
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.gas = cfg.train.gradient_accumulation_steps if gas is None else gas
        self.clip = cfg.train.gradient_clipping
        self.micro_batch = cfg.data.batch_size
        self.device = device
        self.bf16 = bf16
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self._boundary: bool | None = None
        world = dist.get_world_size() if dist.is_initialized() and wrap else 1
        self.world = world
        kwargs = {"find_unused_parameters": True}  # towers compute poolers that a loss may not use
        if not wrap:
            model.to(device)
            self.wrapped = model
        elif in_ray:
            from ray.train.torch import prepare_model

            self.wrapped = prepare_model(_LeafSafe(model), move_to_device=device, parallel_strategy_kwargs=kwargs)
        else:
            model.to(device)
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.wrapped = DistributedDataParallel(_LeafSafe(model), **kwargs)
            else:
                self.wrapped = model

    @classmethod
    def local(cls, model: torch.nn.Module, optimizer, scheduler, cfg: GammarayConfig, device,
              bf16: bool = False) -> "DDPEngine":
        """One process, no process group, one micro-batch per step: the engine of the in-process
        loops (workers/training/inprocess.py, workers/training/heads.py, the benchmarks)."""
        return cls(model, optimizer, scheduler, cfg, torch.device(device), bf16=bf16, in_ray=False, gas=1, wrap=False)

    # the DeepSpeed engine's surface -------------------------------------------------------
    @property
    def training(self) -> bool:
        return self.module.training

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary is not None:
            return self._boundary
        return (self.micro_steps + 1) % self.gas == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        self._boundary = is_boundary

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if hasattr(self.wrapped, "require_backward_grad_sync"):
            # DDP's no_sync(), without a context manager around forward and backward
            self.wrapped.require_backward_grad_sync = self.is_gradient_accumulation_boundary() or not self.module.training
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            return self.wrapped(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas if self.gas != 1 else loss).backward()  # x / 1 is x: no operation for it

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_steps += 1
        self.micro_steps += 1
        self.global_samples += self.micro_batch * self.world

    # checkpoints: the optimizer state is replicated, so one file (rank 0's) loads on any worker count
    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps,
                "global_samples": self.global_samples, "micro_steps": self.micro_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd["module"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.lr_scheduler.load_state_dict(sd["lr_scheduler"])
        self.global_steps, self.global_samples, self.micro_steps = sd["global_steps"], sd["global_samples"], sd["micro_steps"]

    def save_checkpoint(self, save_dir: str, tag: str = "state") -> None:
        if (dist.get_rank() if dist.is_initialized() else 0) != 0:
            return
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(self.state_dict(), os.path.join(save_dir, tag, DDP_FILE))

    def load_checkpoint(self, load_dir: str, tag: str = "state", **_: Any) -> None:
        self.load_state_dict(load_data(os.path.join(load_dir, tag, DDP_FILE), map_location=self.device))
