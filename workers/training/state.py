"""A rank's training state and data position, a checkpoint component (workers/training/stateful.py):
what `train_state.json` (the position) and `quarantine.json` in each checkpoint rank folder hold, the
step counts the schedules plan for, and the loss sums that survive a resume."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable

from gammaray.config import GammarayConfig
from pipelines.stream import Segment, advance, part_from_json, part_to_json, reshard
from workers.runtime import RANK_DIR_PREFIX
from workers.training.stateful import Recut


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
    loss_sums: dict = field(default_factory=dict)       # this epoch's loss terms x records (workers/training/step.py)
    loss_sums_prev: dict = field(default_factory=dict)  # the same for the last finished epoch
    lockstep_left: int | None = None      # lockstep batches the ranks still take this epoch (None: plan anew)

    # the current run's: plan and identity are saved with the position and compared on a resume, never loaded
    plan: dict = field(default_factory=dict)            # train.epochs / max_steps that total_steps was planned for
    identity: dict = field(default_factory=dict)        # what the position means (workers/training/resume.py)
    num_records: int = 0                  # the catalogue's records: a re-plan counts the later epochs with it

    # checkpoint component -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """`position`: what every rank reads on a resume (small); `quarantine`: the rejected records
        (read by their own rank, or by rank 0 when the worker count changed)."""
        # remaining None: the epoch's plan is not cut yet (every rank alike)
        remaining = None if self.part is None else part_to_json(advance(self.part, self.consumed))
        position = {"epoch": self.epoch, "step": self.step, "total_steps": self.total_steps, "remaining": remaining,
                    "epoch_consumed": self.epoch_consumed_before + self.consumed,
                    "records_trained": self.records_trained, "best_val_r_at_1": self.best_val_r_at_1,
                    "last_val": self.last_val, "resumes": self.resumes, "audit": self.audit, "plan": self.plan,
                    "identity": self.identity, "loss_sums": self.loss_sums, "loss_sums_prev": self.loss_sums_prev,
                    "lockstep_left": self.lockstep_left}
        return {"position": position, "quarantine": self.quarantine}

    def load_state_dict(self, state_dict: dict) -> None:
        """This rank's own position (the same worker count): the same walk as the run that saved it."""
        p = state_dict["position"]
        self._load_shared(p)
        self.part = None if p["remaining"] is None else part_from_json(p["remaining"])
        self.consumed, self.epoch_consumed_before = 0, p["epoch_consumed"]
        self.records_trained = p["records_trained"]
        self.loss_sums, self.loss_sums_prev = p.get("loss_sums", {}), p.get("loss_sums_prev", {})
        self.lockstep_left = p.get("lockstep_left")
        self.quarantine = list(state_dict["quarantine"])

    def reshard(self, shards: Iterable[dict], recut: Recut) -> None:
        """Every old rank's position: their unconsumed records re-cut for the new worker count; the
        totals (records trained, loss sums, quarantine) are kept on rank 0 so sums over ranks stay right."""
        shards = list(shards)
        positions = [s["position"] for s in shards]
        first = positions[0]
        self._load_shared(first)
        parts = reshard([part_from_json(p["remaining"] or []) for p in positions], recut.world_size)
        self.part = None if first["remaining"] is None else parts[recut.rank]
        self.consumed, self.epoch_consumed_before, self.lockstep_left = 0, 0, None
        on_zero = recut.rank == 0
        self.records_trained = sum(p["records_trained"] for p in positions) if on_zero else 0
        self.loss_sums = merge_loss_sums([p.get("loss_sums", {}) for p in positions]) if on_zero else {}
        self.loss_sums_prev = merge_loss_sums([p.get("loss_sums_prev", {}) for p in positions]) if on_zero else {}
        self.quarantine = [q for s in shards for q in s.get("quarantine", [])] if on_zero else []

    def _load_shared(self, p: dict) -> None:
        """What every rank of a checkpoint holds alike (rank 0's when the worker count changed)."""
        self.epoch, self.step = p["epoch"], p["step"]
        self.total_steps = p.get("total_steps") or self.total_steps
        self.best_val_r_at_1, self.last_val = p["best_val_r_at_1"], p.get("last_val", {})
        self.resumes, self.audit = list(p.get("resumes", [])), list(p.get("audit", []))

    def needs_replan(self, saved: dict, world_size: int) -> bool:
        """Whether the step count the schedules plan for must be re-planned after loading `saved` (a
        position): kept while the plan holds (exact resume), re-planned when the worker count,
        train.epochs or train.max_steps changed."""
        return not (saved["world_size"] == world_size and saved.get("plan") == self.plan and saved.get("total_steps"))

    def replan(self, cfg: GammarayConfig, positions: list[dict], world_size: int) -> None:
        """The step count from the remaining records of every rank (`positions`: the checkpoint's,
        re-cut when the worker count changed)."""
        parts = [part_from_json(p["remaining"] or []) for p in positions]
        if len(parts) != world_size:
            parts = reshard(parts, world_size)
        current = self.epoch if self.part is not None else self.epoch - 1  # an uncut epoch counts whole
        total = self.step + remaining_steps(cfg, parts, current, self.num_records, world_size)
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total


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
