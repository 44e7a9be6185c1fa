"""InfoNCE (CLIP) and SigLIP, with negatives local to the worker or all-gathered with gradient.

Each objective has a score-level core that takes `logits` [B, C] (anchor i against candidate j,
already scaled by 1/tau), `pos_col` [B] (the column of each anchor's positive) and an optional
validity mask of the candidates, plus an embedding-level form used by `workers/training/objective.py`.
Similarities are computed in float32 with autocast off (the embeddings are small; a bf16 logit of
50 is only good to +-0.25) and reduced with logsumexp / logsigmoid, so any score range is safe.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_candidates(x: torch.Tensor, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-gather rows of x from every rank, with gradient flowing back to their owners.

    Batches may differ in size between ranks (the last step of an epoch); rows are padded to the
    largest and a validity mask says which gathered rows are real. Returns (rows, valid, offset) where
    offset is the position of this rank's first row in the gathered tensor.

    `pad_to` (the micro-batch, an upper bound of every rank's rows): rows are padded to it instead of
    to the largest share, so the sizes never have to be read on the host (the training step's path).
    """
    if not _dist_on():
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), 0
    W, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = n.new_empty(W)
    _all_gather_flat(sizes, n)
    if pad_to is not None:
        if x.shape[0] > pad_to:
            raise ValueError(f"{x.shape[0]} rows to gather, more than pad_to={pad_to} (data.batch_size)")
        m = int(pad_to)
        valid = (torch.arange(m, device=x.device)[None, :] < sizes[:, None]).reshape(-1)
    else:
        sizes_l = sizes.tolist()
        m = max(sizes_l)
        valid = torch.cat([torch.arange(m, device=x.device) < s for s in sizes_l])
    padded = F.pad(x, (0, 0, 0, m - x.shape[0]))
    rows = _GatherRows.apply(padded)
    return rows, valid, rank * m


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    fn(out, x.contiguous())


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with gradient: the backward sums every rank's gradient for this rank's
    rows (reduce-scatter on NCCL; all-reduce + slice where the backend has no reduce-scatter, gloo)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        W = dist.get_world_size()
        out = x.new_empty((W * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_flat(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        W, rank = dist.get_world_size(), dist.get_rank()
        m = grad.shape[0] // W
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((m,) + tuple(grad.shape[1:]))
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            fn(out, grad)
            return out
        total = grad.clone()
        dist.all_reduce(total)
        return total[rank * m:(rank + 1) * m]


def similarity(anchors: torch.Tensor, candidates: torch.Tensor, logit_scale) -> torch.Tensor:
    """logit_scale * <a_i, c_j> in float32 (float64 for float64 inputs) whatever the autocast state."""
    dt = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        scale = torch.as_tensor(logit_scale, device=anchors.device).to(dt)
        return scale * (anchors.to(dt) @ candidates.to(dt).T)


def candidate_mask(B: int, C: int, pos_col: torch.Tensor, valid: torch.Tensor | None, include_positive: bool,
                   device: torch.device) -> torch.Tensor:
    """[B, C] bool: which candidates each anchor counts. valid is None, [C] or [B, C]."""
    if valid is None:
        ok = torch.ones(B, C, dtype=torch.bool, device=device)
    else:
        valid = valid.to(device).bool()
        ok = (valid[None, :] if valid.dim() == 1 else valid).expand(B, C).clone()
    if not include_positive and B:
        ok[torch.arange(B, device=device), pos_col.to(device).long()] = False
    return ok


def _work(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def _check_pos(logits: torch.Tensor, pos_col: torch.Tensor) -> None:
    if pos_col.shape != (logits.shape[0],):
        raise ValueError(f"pos_col must have one column per anchor: shape {tuple(pos_col.shape)} for logits "
                         f"{tuple(logits.shape)}")


def infonce_scores(logits: torch.Tensor, pos_col: torch.Tensor, valid: torch.Tensor | None = None,
                   reduction: str = "mean", include_positive: bool = True) -> torch.Tensor:
    """InfoNCE from a score matrix: per anchor -s_i+ + log sum_j exp(s_ij) over the valid candidates.

    include_positive=True is CLIP's InfoNCE. False sums over the negatives only (the "decoupled"
    form): up to the constant log(#negatives) it is the minibatch estimate -s_i+ + log mean_{j != i}
    exp(s_ij) of the objective whose partition function is an expectation over negatives, the one the
    gamma loss targets. An anchor with nothing to sum counts zero. reduction: "mean" or "none"."""
    _check_pos(logits, pos_col)
    work = _work(logits)
    B, C = work.shape
    if B == 0:
        return work.sum() * 0.0 if reduction == "mean" else work.new_zeros(0)
    pos_col = pos_col.to(work.device).long()
    rows = torch.arange(B, device=work.device)
    ok = candidate_mask(B, C, pos_col, valid, include_positive=include_positive, device=work.device)
    has = ok.any(dim=1)
    # a dummy column keeps logsumexp and its gradient finite for an anchor with nothing to sum (masked
    # below); applied unconditionally, as testing for such an anchor would read a device value on the host
    ok = ok | ((~has)[:, None] & (torch.arange(C, device=work.device) == 0)[None, :])
    lse = torch.logsumexp(work.masked_fill(~ok, float("-inf")), dim=1)
    per = torch.where(has, lse - work[rows, pos_col], torch.zeros_like(lse))
    return per.mean() if reduction == "mean" else per


def infonce_direction(anchors: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
                      valid: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Mean over anchors of -s_i+ + log sum_j exp(s_ij); anchor i's positive is candidate offset+i."""
    logits = similarity(anchors, candidates, logit_scale)
    pos_col = torch.arange(anchors.shape[0], device=logits.device) + offset
    if valid is None and anchors.shape[0] > 0:  # every candidate counts: the same maths, one fused op
        return F.cross_entropy(logits, pos_col)
    return infonce_scores(logits, pos_col, valid)


def infonce_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, gather: bool = False,
                 pad_to: int | None = None) -> torch.Tensor:
    """Symmetric CLIP loss: 1/2 (image->text + text->image)."""
    if gather and _dist_on():
        all_text, valid_t, off = gather_candidates(text, pad_to)
        all_image, valid_i, _ = gather_candidates(image, pad_to)
        return 0.5 * (infonce_direction(image, all_text, logit_scale, valid_t, off)
                      + infonce_direction(text, all_image, logit_scale, valid_i, off))
    if image.shape[0] == 0:
        return 0.5 * (infonce_direction(image, text, logit_scale) + infonce_direction(text, image, logit_scale))
    # text -> image is image -> text transposed: one product and one label vector for both directions
    logits = similarity(image, text, logit_scale)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def siglip_scores(logits: torch.Tensor, pos_col: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid loss from a score matrix that already includes the bias:
    -1/B sum_ij log sigmoid(z_ij l_ij), z = +1 for the positive, -1 otherwise, over valid candidates."""
    _check_pos(logits, pos_col)
    work = _work(logits)
    B, C = work.shape
    if B == 0:
        return work.sum() * 0.0
    pos_col = pos_col.to(work.device).long()
    labels = -torch.ones_like(work)
    labels[torch.arange(B, device=work.device), pos_col] = 1.0
    ok = candidate_mask(B, C, pos_col, valid, include_positive=True, device=work.device)
    per_pair = F.logsigmoid(labels * work) * ok.to(work.dtype)
    return -per_pair.sum() / B


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, bias: torch.Tensor,
                gather: bool = False, pad_to: int | None = None) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023): -1/|B| sum_ij log sigmoid(z_ij (t <x_i, y_j> + b))."""
    if gather and _dist_on():
        candidates, valid, offset = gather_candidates(text, pad_to)
    else:
        candidates, valid, offset = text, None, 0
    logits = similarity(image, candidates, logit_scale)
    logits = logits + torch.as_tensor(bias, device=image.device).to(logits.dtype)
    pos_col = torch.arange(image.shape[0], device=image.device) + offset
    return siglip_scores(logits, pos_col, valid)
