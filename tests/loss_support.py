"""Helpers shared by the loss tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_embeddings(B: int, D: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """B seeded random rows of unit norm."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1)
