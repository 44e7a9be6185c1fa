"""The random streams of a rank (Python, NumPy, torch, CUDA): saved with every checkpoint, restored on a
resume with the same worker count, re-seeded on another."""

from __future__ import annotations

import random

import numpy as np
import torch


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


def reseed(seed: int, rank: int, step: int) -> int:
    """RNG seed for a rank that resumes on a different worker count (no saved stream to continue)."""
    s = (seed * 1_000_003 + step * 1_009 + rank) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s
