"""The gamma-augmented decomposable contrastive loss (Chen et al., NeurIPS 2022), as stochastic EM.

For anchor i with positive score s_i+ and partition function Z_i = E_neg[exp(s_ij)], the generalized
loss -s_i+ + alpha log Z_i is made linear in Z_i by the Gamma identity. Each step, per anchor:

  1. log Z_hat_i = logmeanexp_j s_ij over the in-batch candidates            (graph kept)
  2. E-step: log R_i <- log((1-gamma) R_i + gamma Z_hat_i)  in the per-sample memory (no graph);
             u_i = alpha / R_i (mode "mean") or u_i ~ Gamma(alpha, rate R_i) (mode "sample")
  3. M-step: minimise mean_i [ -s_i+ + stopgrad(u_i) Z_hat_i(theta) ]

With gamma = 1 and mode "mean" the gradient is exactly the minibatch InfoNCE gradient (biased); the
memory R_i carried across steps is what removes the bias. Because the E-step runs before the M-step,
u_i Z_hat_i <= alpha / gamma: the weights cannot explode when the scores jump.
Everything is computed in float32 log space (stable under bf16 autocast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .contrastive import gather_candidates, _dist_on
from .state import LocalRateStore, ShardedRateStore


@dataclass
class GammaSettings:
    alpha: float = 1.0
    gamma: float = 0.1
    gamma_schedule: str = "constant"   # or "cosine": 1.0 -> gamma_min over training
    gamma_min: float = 0.2
    mode: str = "mean"                 # or "sample"
    include_positive: bool = True
    gather_negatives: bool = False

    def gamma_at(self, progress: float) -> float:
        if self.gamma_schedule == "constant":
            return self.gamma
        p = min(max(progress, 0.0), 1.0)
        return self.gamma_min + 0.5 * (1.0 - self.gamma_min) * (1.0 + math.cos(math.pi * p))


def log_mean_exp(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log of the mean of exp over valid entries of each row (stable; -inf entries excluded)."""
    masked = logits.masked_fill(~valid, float("-inf"))
    count = valid.sum(dim=1).clamp_min(1).to(logits.dtype)
    return torch.logsumexp(masked, dim=1) - torch.log(count)


class GammaDirection:
    """One direction (anchors of one modality) with its own per-sample rate memory."""

    def __init__(self, store: LocalRateStore | ShardedRateStore, settings: GammaSettings, generator: torch.Generator):
        self.store = store
        self.settings = settings
        self.generator = generator

    def __call__(self, anchors: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
                 sample_index: torch.Tensor, progress: float, valid: torch.Tensor | None = None,
                 offset: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        B = anchors.shape[0]
        logits = logit_scale * anchors.float() @ candidates.float().T          # [B, C]
        pos_idx = torch.arange(B, device=anchors.device) + offset
        pos = logits[torch.arange(B, device=anchors.device), pos_idx]
        cand_ok = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid[None, :].expand_as(logits)
        if not s.include_positive:
            cand_ok = cand_ok.clone()
            cand_ok[torch.arange(B, device=anchors.device), pos_idx] = False
        log_zhat = log_mean_exp(logits, cand_ok)                                # graph kept

        gamma_t = s.gamma_at(progress)
        log_rate = self.store.update(sample_index, log_zhat.detach(), gamma_t).to(log_zhat)
        log_u = math.log(s.alpha) - log_rate
        if s.mode == "sample":
            g = torch._standard_gamma(torch.full_like(log_rate, s.alpha, device="cpu"), generator=self.generator)
            log_u = torch.log(g.clamp_min(1e-30)).to(log_rate) - log_rate
        weight = torch.exp(log_u.detach() + log_zhat)                           # u_i * Z_hat_i(theta)
        objective = (-pos + weight).mean() if B else logits.sum() * 0.0
        diagnostics = {
            "log_rate_mean": log_rate.mean() if B else log_rate.sum(),
            "weight_mean": weight.detach().mean() if B else weight.detach().sum(),
            "generalized_loss": (-pos.detach() + s.alpha * log_rate).mean() if B else log_rate.sum(),
        }
        return objective, diagnostics


class GammaContrastiveLoss:
    """Both directions, each with its own memory. Not an nn.Module: it has no parameters, only
    per-sample state, which is checkpointed through `state_dict` / `load_shards`."""

    def __init__(self, num_samples: int, settings: GammaSettings, seed: int = 0, distributed: bool | None = None,
                 device: torch.device | str = "cpu"):
        self.settings = settings
        sharded = _dist_on() if distributed is None else distributed
        make = (lambda: ShardedRateStore(num_samples, device=device)) if sharded else (lambda: LocalRateStore(num_samples, device=device))
        self.generator = torch.Generator().manual_seed(seed + (torch.distributed.get_rank() if sharded else 0))
        self.image_to_text = GammaDirection(make(), settings, self.generator)
        self.text_to_image = GammaDirection(make(), settings, self.generator)

    def __call__(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 sample_index: torch.Tensor, progress: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        if self.settings.gather_negatives and _dist_on():
            all_text, valid_t, off = gather_candidates(text)
            all_image, valid_i, _ = gather_candidates(image)
        else:
            all_text, valid_t, all_image, valid_i, off = text, None, image, None, 0
        l_i2t, d_i2t = self.image_to_text(image, all_text, logit_scale, sample_index, progress, valid_t, off)
        l_t2i, d_t2i = self.text_to_image(text, all_image, logit_scale, sample_index, progress, valid_i, off)
        metrics = {f"gamma/{k}": float(0.5 * (d_i2t[k] + d_t2i[k])) for k in d_i2t}
        metrics["gamma/gamma_t"] = self.settings.gamma_at(progress)
        return 0.5 * (l_i2t + l_t2i), metrics

    def participate(self, image: torch.Tensor, text: torch.Tensor) -> None:
        """Join this step's collectives with an empty batch (a rank whose data ran out first)."""
        if self.settings.gather_negatives and _dist_on():
            gather_candidates(text[:0])
            gather_candidates(image[:0])
        empty_i = torch.zeros(0, dtype=torch.long, device=image.device)
        empty_z = torch.zeros(0, dtype=torch.float32, device=image.device)
        for direction in (self.image_to_text, self.text_to_image):
            direction.store.update(empty_i, empty_z, 1.0)

    def state_dict(self) -> dict:
        return {"image_to_text": self.image_to_text.store.state_dict(),
                "text_to_image": self.text_to_image.store.state_dict(),
                "generator": self.generator.get_state()}

    def load_shards(self, shards: list[dict]) -> None:
        """Restore from the per-rank state dicts of a checkpoint saved with any world size."""
        self.image_to_text.store.load_shards(sd["image_to_text"] for sd in shards)
        self.text_to_image.store.load_shards(sd["text_to_image"] for sd in shards)

    def load_generator_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def nbytes(self) -> int:
        return self.image_to_text.store.nbytes() + self.text_to_image.store.nbytes()
