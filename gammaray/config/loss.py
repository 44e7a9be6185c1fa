"""loss.*: the contrastive loss (InfoNCE or gamma) and the structure regularizers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section


# --------------------------------------------------------------------------------------------
# losses


class GammaLossConfig(Section):
    alpha: float = Field(1.0, gt=0.0, description="Gamma shape (alpha=1: InfoNCE/SogCLR weighting).")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="EMA weight of the per-sample rate memory.")
    gamma_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant, or cosine from 1.0 down to gamma_min over the run."
    )
    gamma_min: float = Field(0.2, gt=0.0, le=1.0, description="Final EMA weight of the cosine schedule.")
    gamma_decay_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="cosine: reach gamma_min at this fraction of training, then hold it "
                                         "(1.0 = decay over the whole run)."
    )
    mode: Literal["mean", "sample"] = Field("mean", description="E-step: u=alpha/R (mean) or u~Gamma(alpha,R).")
    include_positive: bool = Field(
        False,
        description="Z_hat also averages the positive (False: in-batch negatives only, the minibatch estimate of the "
                    "negatives-only full-data objective: with the memory, less biased than without (relative gradient "
                    "bias 0.056 vs 0.141 at batch 8 and 1/tau=10 in tests/test_loss_gamma.py), not unbiased; True: mode=mean,gamma=1,alpha=1 is exactly "
                    "CLIP's InfoNCE).",
    )
    eps: float = Field(0.0, ge=0.0, description="Added to the rate R_i before u_i = alpha/(R_i + eps) (SogCLR's epsilon).")
    rescale_memory: bool = Field(
        False, description="The memory holds log R / logit_scale, so entries written at another temperature are "
                           "rescaled (R^(scale_now/scale_then)) before the EMA mixes in a new estimate."
    )
    track_age: bool = Field(
        False, description="Log how stale the memory is (gamma/memory_age_mean|max: steps since each anchor's entry "
                           "was last written). Off by default: 4 bytes more per sample and worker shard (12 instead "
                           "of 8, 400 MB more for 100 M samples) and about a dozen more tensor operations per step "
                           "(docs/training.md, 'How fast is a step'); under the epoch sampler an entry is rewritten "
                           "about once an epoch, so the age says little a run does not already know."
    )


class StructureConfig(Section):
    """Latent modality structure (Jiang et al., CVPR 2023). Every weight 0 = off, with no extra compute
    (no augmented views, no specific heads)."""

    in_modal: bool | Literal["auto"] = Field(
        "auto", description="Base loss L_con = 1/4 (V2T + T2V + V2V + T2T), the base the paper's results assume: "
                            "add in-modal InfoNCE terms (the augmented view is the positive) and halve the "
                            "cross-modal term. auto = on exactly when a regularizer weight is > 0 (a plain run "
                            "stays cross-modal only and needs no augmented views); true/false force it."
    )
    lambda_sep: float = Field(0.0, ge=0.0, description="Weight of deep feature separation L_ortho + L^i_con + L_uni (0 = off).")
    lambda_br: float = Field(0.0, ge=0.0, description="Weight of the Brownian-bridge loss (0 = off).")
    lambda_gc: float = Field(0.0, ge=0.0, description="Weight of geometric consistency (0 = off).")
    bridge_t: float = Field(0.25, gt=0.0, lt=1.0, description="Bridge point t (mu = t z_V + (1-t) z_T).")
    bridge_t_range: tuple[float, float] | None = Field(
        None, description="Sample t per sample uniformly from [lo, hi] each step instead of the fixed bridge_t."
    )
    gc_augmented: bool = Field(True, description="Geometric consistency also between each view and its augmented view.")

    def in_modal_active(self) -> bool:
        """in_modal resolved: auto = on exactly when a regularizer weight is > 0."""
        if self.in_modal == "auto":
            return self.lambda_sep > 0 or self.lambda_br > 0 or self.lambda_gc > 0
        return bool(self.in_modal)

    @field_validator("bridge_t_range")
    @classmethod
    def _t_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0.0 <= v[0] <= v[1] <= 1.0):
            raise ValueError("bridge_t_range must satisfy 0 <= lo <= hi <= 1")
        return v


class LossConfig(Section):
    kind: Literal["infonce", "gamma", "sogclr", "siglip"] = Field("gamma", description="Contrastive objective.")
    gather_negatives: bool = Field(
        False, description="InfoNCE/SigLIP: all-gather candidates across workers (with gradient)."
    )
    gamma: GammaLossConfig = GammaLossConfig()
    structure: StructureConfig = StructureConfig()


