"""A rank's training state and data position: what `train_state.json` in each checkpoint rank folder
holds, the step counts the schedules plan for, and the loss sums that survive a resume."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from gammaray.config import GammarayConfig
from pipelines.stream import Segment, advance, part_to_json
from workers.runtime import RANK_DIR_PREFIX


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    total_steps: int = 0                  # the step count the LR schedule and the gamma schedule plan for
    part: list[Segment] | None = None     # this rank's records of the epoch not yet consumed at (re)start
    consumed: int = 0                     # records of `part` consumed since then
    epoch_consumed_before: int = 0        # records of the epoch consumed before `part` began
    records_trained: int = 0              # good records stepped on, all epochs
    quarantine: list[dict] = field(default_factory=list)
    best_val_r_at_1: float = -1.0
    last_val: dict = field(default_factory=dict)
    resumes: list[dict] = field(default_factory=list)   # one entry per restart: step, world sizes, how
    audit: list[dict] = field(default_factory=list)     # per finished epoch (train.audit_samples)
    plan: dict = field(default_factory=dict)            # train.epochs / max_steps that total_steps was planned for
    identity: dict = field(default_factory=dict)        # what the position means (workers/training/resume.py)
    loss_sums: dict = field(default_factory=dict)       # this epoch's loss terms x records (workers/training/step.py)
    loss_sums_prev: dict = field(default_factory=dict)  # the same for the last finished epoch
    lockstep_left: int | None = None      # lockstep batches the ranks still take this epoch (None: plan anew)

    def position_json(self, rank: int, world_size: int) -> dict:
        # None: the epoch's plan is not cut yet (every rank alike)
        remaining = None if self.part is None else part_to_json(advance(self.part, self.consumed))
        return {"rank": rank, "world_size": world_size, "epoch": self.epoch, "step": self.step,
                "total_steps": self.total_steps, "remaining": remaining,
                "epoch_consumed": self.epoch_consumed_before + self.consumed,
                "records_trained": self.records_trained, "best_val_r_at_1": self.best_val_r_at_1,
                "last_val": self.last_val, "resumes": self.resumes, "audit": self.audit, "plan": self.plan,
                "identity": self.identity, "loss_sums": self.loss_sums, "loss_sums_prev": self.loss_sums_prev,
                "lockstep_left": self.lockstep_left}


def steps_per_epoch(cfg: GammarayConfig, records_per_worker: int) -> int:
    micro = math.ceil(records_per_worker / cfg.data.batch_size)
    return math.ceil(micro / cfg.train.gradient_accumulation_steps)


def estimate_total_steps(cfg: GammarayConfig, num_records: int, world_size: int) -> int:
    total = steps_per_epoch(cfg, math.ceil(num_records / max(1, world_size))) * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def rank_folders(d: str) -> list[int]:
    """The ranks a checkpoint folder has a folder for, in order."""
    return sorted(int(name[len(RANK_DIR_PREFIX):]) for name in os.listdir(d) if name.startswith(RANK_DIR_PREFIX))


def read_position(d: str, rank: int) -> dict:
    """One rank's train_state.json."""
    path = os.path.join(d, f"{RANK_DIR_PREFIX}{rank:05d}", "train_state.json")
    if not os.path.exists(path):
        raise RuntimeError(f"{d}: incomplete checkpoint, no {os.path.relpath(path, d)}")
    with open(path) as f:
        return json.load(f)


def read_positions(d: str) -> list[dict]:
    positions = [read_position(d, r) for r in rank_folders(d)]
    if not positions or [p["rank"] for p in positions] != list(range(positions[0]["world_size"])):
        raise RuntimeError(f"{d}: incomplete checkpoint, rank folders {[p['rank'] for p in positions]}")
    return positions


def plan_of(cfg: GammarayConfig) -> dict:
    return {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps}


def remaining_steps(cfg: GammarayConfig, parts: list[list[Segment]], epoch: int, num_records: int, W: int) -> int:
    """Optimizer steps left: the rest of this epoch (the largest part decides) plus the later epochs."""
    left = steps_per_epoch(cfg, max((sum(s.size for s in p) for p in parts), default=0))
    later = max(0, cfg.train.epochs - epoch - 1) * steps_per_epoch(cfg, math.ceil(num_records / W))
    return left + later


def merge_loss_sums(parts: list[dict]) -> dict:
    """The loss sums of several old ranks as one (a resume on another worker count keeps them on rank 0)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    sums: dict[str, float] = {}
    for p in parts:
        for k, v in p["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
    return {"records": sum(p["records"] for p in parts), "sums": sums}
