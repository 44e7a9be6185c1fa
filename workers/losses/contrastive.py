"""InfoNCE (CLIP) and SigLIP, with negatives local to the worker or all-gathered with gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_candidates(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-gather rows of x from every rank, with gradient flowing back to their owners.

    Batches may differ in size between ranks (the last step of an epoch); rows are padded to the
    largest and a validity mask says which gathered rows are real. Returns (rows, valid, offset) where
    offset is the position of this rank's first row in the gathered tensor.
    """
    if not _dist_on():
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), 0
    import torch.distributed.nn.functional as dnn

    W, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(W)]
    dist.all_gather(sizes, n)
    sizes_l = [int(s) for s in sizes]
    m = max(sizes_l)
    padded = F.pad(x, (0, 0, 0, m - x.shape[0]))
    rows = torch.cat(dnn.all_gather(padded), dim=0)
    valid = torch.cat([torch.arange(m, device=x.device) < s for s in sizes_l])
    return rows, valid, rank * m


def infonce_direction(anchors: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
                      valid: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Mean over anchors of -s_i+ + log sum_j exp(s_ij); anchor i's positive is candidate offset+i."""
    logits = logit_scale * anchors @ candidates.T
    if valid is not None:
        logits = logits.masked_fill(~valid[None, :], float("-inf"))
    target = torch.arange(anchors.shape[0], device=anchors.device) + offset
    return F.cross_entropy(logits, target)


def infonce_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, gather: bool = False) -> torch.Tensor:
    """Symmetric CLIP loss: 1/2 (image->text + text->image)."""
    if gather and _dist_on():
        all_text, valid_t, off = gather_candidates(text)
        all_image, valid_i, _ = gather_candidates(image)
        return 0.5 * (infonce_direction(image, all_text, logit_scale, valid_t, off)
                      + infonce_direction(text, all_image, logit_scale, valid_i, off))
    return 0.5 * (infonce_direction(image, text, logit_scale) + infonce_direction(text, image, logit_scale))


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, bias: torch.Tensor,
                gather: bool = False) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023): -1/|B| sum_ij log sigmoid(z_ij (t <x_i, y_j> + b))."""
    candidates, valid, offset = (gather_candidates(text) if gather and _dist_on()
                                 else (text, torch.ones(text.shape[0], dtype=torch.bool, device=text.device), 0))
    logits = logit_scale * image @ candidates.T + bias
    labels = -torch.ones_like(logits)
    idx = torch.arange(image.shape[0], device=image.device)
    labels[idx, idx + offset] = 1.0
    per_pair = F.logsigmoid(labels * logits) * valid[None, :].to(logits.dtype)
    return -per_pair.sum() / image.shape[0]
