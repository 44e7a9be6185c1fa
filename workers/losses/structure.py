"""Latent modality structure regularizers (Jiang et al., CVPR 2023): a library, torch only.

Notation (docs/design.md section 3): unit-norm embeddings z_V (image), z_T (text), z^a an augmented view
(a second augmentation of the record for the two-tower model, the momentum encoders' output for the
fusion model), z^i modality-specific features from extra heads. Batch of N rows, j, k index rows.

- In-modal contrastive: InfoNCE from z_V to the augmented views z^a_V (the positive is the same
  record's view), likewise T2T. The base loss L_con = 1/4 (V2T + T2V + V2V + T2T).
- Deep feature separation: L_sep = L_ortho + L^i_con + L_uni with (the paper's forms)
  L_ortho = mean_j (<z_Vj, z^i_Vj>^2 + <z_Tj, z^i_Tj>^2),
  L^i_con = V2V + T2T on the specific features (augmented view as positive),
  L_uni   = uni(z^i_V) + uni(z^i_T), uni(x) = log mean_{j,k} exp(-2 ||x_j - x_k||^2) over all N^2 pairs,
  the diagonal (exp(0) = 1) included under the one log; each modality sums like L_ortho's two terms.
  (Until issue 14 uni averaged over distinct pairs j != k and both parts were averaged over the
  modalities: a uniformity gradient (N + S) / S times this one, S = sum_{j != k} exp(-2 ||x_j - x_k||^2),
  17x at N = 4 and 8x at 8 for random unit vectors in 64-d; at lambda_sep = 0.3 the two measured the
  same within noise, docs/bench/sep-form.json, so only the paper's is kept.)
- Brownian bridge: mu_j = normalize(t_j z_Vj + (1 - t_j) z_Tj), L_br = mean_j ||z^a_Vj - mu_j||^2,
  t fixed (0.25) or drawn per row from a range; the bridge's variance t(1-t) is not rescaled.
- Geometric consistency: L_gc = (1/N) sum_{j,k} [(<z_Vj,z_Tk> - <z_Vk,z_Tj>)^2 + (<z_Vj,z_Vk> - <z_Tj,z_Tk>)^2]
  and its augmented form (1/N) sum_{j,k} [(<z_Vj,z_Vk> - <z^a_Vj,z^a_Vk>)^2 + (<z_Tj,z_Tk> - <z^a_Tj,z^a_Tk>)^2]
  + (1/N) sum_j (<z_Vj,z_Tj> - <z^a_Vj,z^a_Tj>)^2.

Every term is a mean (or a 1/N-normalised sum) over rows, so it is invariant to permuting the batch.
`StructureObjective` applies the configured terms to a model's outputs for `workers/training/objective.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .contrastive import _dist_on, gather_candidates, infonce_direction


# --------------------------------------------------------------------------------------------
# the terms, as pure functions


def in_modal_infonce(anchors: torch.Tensor, augmented: torch.Tensor, logit_scale: torch.Tensor,
                     gather: bool = False) -> torch.Tensor:
    """InfoNCE from each row to the augmented views of the batch; row i's positive is view i.

    l_i = -s(z_i, z^a_i) + log sum_j exp(s(z_i, z^a_j)),  s = logit_scale * <., .>; mean over i.
    With `gather`, the candidates are the augmented views of every rank (gradient flows back)."""
    if gather and _dist_on():
        rows, valid, offset = gather_candidates(augmented)
        return infonce_direction(anchors, rows, logit_scale, valid, offset)
    return infonce_direction(anchors, augmented, logit_scale)


def orthogonality_loss(z_v: torch.Tensor, zi_v: torch.Tensor, z_t: torch.Tensor, zi_t: torch.Tensor) -> torch.Tensor:
    """mean_j (<z_Vj, z^i_Vj>^2 + <z_Tj, z^i_Tj>^2): zero exactly when the specific features are
    orthogonal to the shared ones."""
    return ((z_v * zi_v).sum(-1).pow(2) + (z_t * zi_t).sum(-1).pow(2)).mean()


def uniformity_loss(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean_{j,k} exp(-t ||x_j - x_k||^2) over all N^2 pairs, the diagonal included (the paper's
    form; 0 for N = 1), as a log-sum-exp (stable)."""
    n = x.shape[0]
    sq = (x * x).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
    # the diagonal's d2 is exactly 0 (not a rounding residue of sq + sq - 2 <x, x>)
    d2 = d2.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0.0)
    return torch.logsumexp(-t * d2.reshape(-1), dim=0) - math.log(n * n)


def bridge_points(z_v: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """mu_j = normalize(t_j z_Vj + (1 - t_j) z_Tj): the point at time t of the bridge from text to image."""
    if not torch.is_tensor(t):
        t = torch.full((z_v.shape[0],), float(t), dtype=z_v.dtype, device=z_v.device)
    t = t.to(z_v.dtype).unsqueeze(-1)
    return F.normalize(t * z_v + (1.0 - t) * z_t, dim=-1)


def brownian_bridge_loss(z_v_aug: torch.Tensor, z_v: torch.Tensor, z_t: torch.Tensor,
                         t: torch.Tensor | float) -> torch.Tensor:
    """mean_j ||z^a_Vj - mu_j||^2: zero exactly when the augmented image feature is the bridge point."""
    return (z_v_aug - bridge_points(z_v, z_t, t)).pow(2).sum(-1).mean()


def sample_bridge_t(n: int, fixed: float, t_range: tuple[float, float] | None, device, dtype=torch.float32,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """t per row: `fixed`, or uniform on [lo, hi] (drawn from `generator`, else the torch RNG)."""
    if t_range is None:
        return torch.full((n,), float(fixed), dtype=dtype, device=device)
    lo, hi = t_range
    u = torch.rand(n, generator=generator, dtype=dtype, device="cpu" if generator is not None else device)
    return (lo + (hi - lo) * u).to(device)


def geometric_consistency_loss(z_v: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_{j,k} [(<z_Vj,z_Tk> - <z_Vk,z_Tj>)^2 + (<z_Vj,z_Vk> - <z_Tj,z_Tk>)^2].

    Zero exactly when the two modalities' embeddings are identical (then both Gram matrices agree)."""
    n = z_v.shape[0]
    # <z_Vk, z_Tj> as its own product (not a transpose), so identical inputs give bitwise equal terms
    cross = (z_v @ z_t.T - z_t @ z_v.T).pow(2).sum()
    inner = (z_v @ z_v.T - z_t @ z_t.T).pow(2).sum()
    return (cross + inner) / max(1, n)


def geometric_consistency_aug_loss(z_v: torch.Tensor, z_t: torch.Tensor, z_v_aug: torch.Tensor | None,
                                   z_t_aug: torch.Tensor | None) -> torch.Tensor:
    """(1/N) sum_{j,k} [(<z_Vj,z_Vk> - <z^a_Vj,z^a_Vk>)^2 + (same for T)] + (1/N) sum_j (<z_Vj,z_Tj> - <z^a_Vj,z^a_Tj>)^2.

    Terms whose augmented view is absent are left out. Zero when each view equals its augmented view."""
    n = max(1, z_v.shape[0])
    total = z_v.sum() * 0.0
    if z_v_aug is not None:
        total = total + (z_v @ z_v.T - z_v_aug @ z_v_aug.T).pow(2).sum()
    if z_t_aug is not None:
        total = total + (z_t @ z_t.T - z_t_aug @ z_t_aug.T).pow(2).sum()
    if z_v_aug is not None and z_t_aug is not None:
        total = total + ((z_v * z_t).sum(-1) - (z_v_aug * z_t_aug).sum(-1)).pow(2).sum()
    return total / n


# --------------------------------------------------------------------------------------------
# the configured objective part


@dataclass
class StructureSettings:
    in_modal: bool = False          # resolved: loss.structure.in_modal=auto is on exactly when a weight is > 0
    lambda_sep: float = 0.0
    lambda_br: float = 0.0
    lambda_gc: float = 0.0
    bridge_t: float = 0.25
    bridge_t_range: tuple[float, float] | None = None
    gc_augmented: bool = True
    gather_negatives: bool = False

    @classmethod
    def from_config(cls, structure_cfg, gather_negatives: bool = False) -> "StructureSettings":
        s = structure_cfg
        return cls(in_modal=s.in_modal_active(), lambda_sep=s.lambda_sep, lambda_br=s.lambda_br,
                   lambda_gc=s.lambda_gc, bridge_t=s.bridge_t,
                   bridge_t_range=tuple(s.bridge_t_range) if s.bridge_t_range else None,
                   gc_augmented=s.gc_augmented, gather_negatives=gather_negatives)


class MissingFeatures(KeyError):
    pass


def _need(out: dict, key: str, why: str) -> torch.Tensor:
    if key not in out:
        raise MissingFeatures(f"{why} needs model output '{key}', which the forward did not produce "
                              f"(outputs: {sorted(out)})")
    return out[key]


class StructureObjective:
    """Adds the structure terms to an objective's named terms (weighted) and metrics (unweighted).

    Terms (each only when switched on, so 0 = off costs nothing): `in_modal_loss` (and the halving
    of `contrastive_loss` that makes the base L_con), `sep_loss`, `bridge_loss`, `gc_loss`, and the
    fusion model's `itm_loss` when the model produced one. A rank without data (`active=False`) joins
    the same collectives and contributes exact zeros under the same names."""

    def __init__(self, settings: StructureSettings, generator: torch.Generator | None = None):
        self.s = settings
        self.generator = generator

    @property
    def needs_augmented_views(self) -> bool:
        s = self.s
        return s.in_modal or s.lambda_sep > 0 or s.lambda_br > 0 or s.lambda_gc > 0

    def _gathers(self) -> list[str]:
        """Outputs all-gathered (in this order) when negatives are global."""
        if not (self.s.gather_negatives and _dist_on()):
            return []
        keys = []
        if self.s.in_modal:
            keys += ["image_aug", "text_aug"]
        if self.s.lambda_sep > 0:
            keys += ["image_specific_aug", "text_specific_aug"]
        return keys

    def apply(self, out: dict[str, torch.Tensor], terms: dict[str, torch.Tensor], metrics: dict[str, float],
              active: bool = True) -> None:
        s = self.s
        if not active:
            for key in self._gathers():
                gather_candidates(_need(out, key, "gathered in-modal negatives")[:0])
            zero = out["image"].sum() * 0.0
            if s.in_modal:
                terms["contrastive_loss"] = terms["contrastive_loss"] * 0.5
                terms["in_modal_loss"] = zero
            for name, lam in (("sep_loss", s.lambda_sep), ("bridge_loss", s.lambda_br), ("gc_loss", s.lambda_gc)):
                if lam > 0:
                    terms[name] = zero
            if "itm_loss" in out:
                terms["itm_loss"] = out["itm_loss"] * 0.0
            return

        z_v, z_t, scale = out["image"], out["text"], out["logit_scale"]
        gather = s.gather_negatives
        if s.in_modal:
            v2v = in_modal_infonce(z_v, _need(out, "image_aug", "structure.in_modal"), scale, gather)
            t2t = in_modal_infonce(z_t, _need(out, "text_aug", "structure.in_modal"), scale, gather)
            # L_con = 1/4 (V2T + T2V + V2V + T2T); the contrastive term holds 1/2 (V2T + T2V)
            terms["contrastive_loss"] = terms["contrastive_loss"] * 0.5
            terms["in_modal_loss"] = 0.25 * (v2v + t2t)
            metrics["structure/v2v"] = v2v.detach()
            metrics["structure/t2t"] = t2t.detach()
        if s.lambda_sep > 0:
            why = "loss.structure.lambda_sep (model.specific_heads)"
            zi_v, zi_t = _need(out, "image_specific", why), _need(out, "text_specific", why)
            ortho = orthogonality_loss(z_v, zi_v, z_t, zi_t)
            spec_con = (in_modal_infonce(zi_v, _need(out, "image_specific_aug", why), scale, gather)
                        + in_modal_infonce(zi_t, _need(out, "text_specific_aug", why), scale, gather))
            uni = uniformity_loss(zi_v) + uniformity_loss(zi_t)
            sep = ortho + spec_con + uni
            terms["sep_loss"] = s.lambda_sep * sep
            metrics.update({"structure/sep": sep.detach(), "structure/ortho": ortho.detach(),
                            "structure/specific_con": spec_con.detach(),
                            "structure/uniformity": uni.detach()})
        if s.lambda_br > 0:
            t = sample_bridge_t(z_v.shape[0], s.bridge_t, s.bridge_t_range, z_v.device, z_v.dtype, self.generator)
            br = brownian_bridge_loss(_need(out, "image_aug", "loss.structure.lambda_br"), z_v, z_t, t)
            terms["bridge_loss"] = s.lambda_br * br
            metrics["structure/bridge"] = br.detach()
        if s.lambda_gc > 0:
            gc = geometric_consistency_loss(z_v, z_t)
            metrics["structure/gc_base"] = gc.detach()
            if s.gc_augmented:
                gca = geometric_consistency_aug_loss(z_v, z_t, _need(out, "image_aug", "loss.structure.gc_augmented"),
                                                     _need(out, "text_aug", "loss.structure.gc_augmented"))
                metrics["structure/gc_aug"] = gca.detach()
                gc = gc + gca
            terms["gc_loss"] = s.lambda_gc * gc
            metrics["structure/gc"] = gc.detach()
        if "itm_loss" in out:
            terms["itm_loss"] = out["itm_loss"]
            metrics["itm/loss"] = out["itm_loss"].detach()
            if "itm_accuracy" in out:
                metrics["itm/accuracy"] = torch.as_tensor(out["itm_accuracy"]).detach()
