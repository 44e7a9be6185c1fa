"""Evaluation metrics on frozen embeddings: retrieval R@K, zero-shot accuracy, modality gap.

Conventions, chosen to never flatter a model: a candidate that ties the positive's score ranks
ahead of it (so a collapsed model that gives every pair the same score gets R@1 = 0, not 1).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def retrieval_ranks(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """0-based rank of gallery[i] among all gallery items for query[i] (ties count against)."""
    sims = query.float() @ gallery.float().T
    pos = sims.diagonal().unsqueeze(1)
    others = torch.ones_like(sims, dtype=torch.bool)
    others.fill_diagonal_(False)
    return ((sims >= pos) & others).sum(dim=1)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    n = max(1, ranks.numel())
    return {k: float((ranks < k).sum()) / n for k in ks}


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    i2t = recall_at_k(retrieval_ranks(image, text), ks)
    t2i = recall_at_k(retrieval_ranks(text, image), ks)
    out = {}
    for k in ks:
        out[f"r_at_{k}_i2t"] = i2t[k]
        out[f"r_at_{k}_t2i"] = t2i[k]
    out["chance_r_at_1"] = 1.0 / max(1, image.shape[0])
    return out


def zero_shot_accuracy(image: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose most similar class prompt is their own class (ties count against)."""
    sims = image.float() @ class_text.float().T
    own = sims.gather(1, labels.view(-1, 1))
    beaten = (sims >= own).sum(dim=1) - 1
    return float((beaten == 0).float().mean()) if labels.numel() else 0.0


def modality_gap(image: torch.Tensor, text: torch.Tensor) -> float:
    """Distance between the centroids of the two modalities (Liang et al. 2022)."""
    return float(torch.linalg.vector_norm(image.float().mean(0) - text.float().mean(0)))


def category_prompts(categories: Sequence[str], template: str) -> list[str]:
    """Category paths -> zero-shot prompts ("{}" is replaced by the category path)."""
    return [template.format(c) for c in categories]


def labels_for(values: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index.get(v, -1) if v is not None else -1 for v in values], dtype=np.int64)
