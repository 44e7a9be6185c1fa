"""train.audit_samples: count how often each record was trained in an epoch, and stop the run if one was
trained twice."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist

from gammaray.config import RunError
from workers.training.stateful import Recut


class DuplicateSampleError(RunError):
    """train.audit_samples found a record trained twice within one epoch."""


class SampleAudit:
    """train.audit_samples: how often each sample_index was trained in the current epoch. Per rank,
    checkpointed with the rank; summed over ranks at the end of every epoch (and on rank 0 when a
    resume changes the worker count)."""

    def __init__(self, num_samples: int):
        self.counts = torch.zeros(num_samples, dtype=torch.int32)

    def add(self, sample_index: np.ndarray) -> None:
        idx = torch.from_numpy(np.asarray(sample_index, dtype=np.int64))
        if idx.numel() and int(idx.max()) >= self.counts.numel():
            self.counts = torch.cat([self.counts, torch.zeros(int(idx.max()) + 1 - self.counts.numel(), dtype=torch.int32)])
        self.counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))

    def add_counts(self, counts: torch.Tensor) -> None:
        n = max(self.counts.numel(), counts.numel())
        self.counts = torch.nn.functional.pad(self.counts, (0, n - self.counts.numel()))
        self.counts[: counts.numel()] += counts.to(torch.int32)

    # checkpoint component (workers/training/stateful.py)
    def state_dict(self) -> dict:
        return {"counts": self.counts}

    def load_state_dict(self, state_dict: dict) -> None:
        self.counts = state_dict["counts"]

    def reshard(self, shards: Iterable[dict], recut: Recut) -> None:
        """The old ranks' counts summed (the checkpoint layout hands them to rank 0, none to the others)."""
        for shard in shards:
            self.add_counts(shard["counts"])

    def close_epoch(self, epoch: int, device: torch.device) -> dict:
        """Collective. Summary of the finished epoch; raises if a record was trained twice."""
        total = self.counts.to(device, copy=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        total = total.cpu()
        self.counts.zero_()
        summary = {"epoch": epoch, "once": int((total == 1).sum()), "repeated": int((total > 1).sum()),
                   "missed": int((total == 0).sum())}
        if summary["repeated"]:
            twice = torch.nonzero(total > 1).flatten()[:10].tolist()
            raise DuplicateSampleError(f"epoch {epoch}: {summary['repeated']} records trained more than once, "
                                       f"e.g. sample_index {twice}")
        return summary
