"""The random streams of a rank (Python, NumPy, torch, CUDA) as a checkpoint component: saved with every
checkpoint, restored on a resume with the same worker count, re-seeded on another."""

from __future__ import annotations

import random
from typing import Iterable

import numpy as np
import torch

from workers.training.stateful import Recut


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def recut_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a rank that resumes on a different worker count (no saved stream to continue)."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**31 - 1)


def seed_all(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class ProcessRNG:
    """The process-wide streams: continued exactly on the same worker count; on another, every rank
    restarts them from `Recut.seed`."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state_dict: dict) -> None:
        set_rng_state(state_dict)

    def reshard(self, shards: Iterable[dict], recut: Recut) -> None:
        seed_all(recut.seed)
