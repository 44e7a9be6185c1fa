"""The gamma-augmented decomposable contrastive loss (Chen et al., NeurIPS 2022), as stochastic EM.

For anchor i with positive score s_i+ and partition function Z_i = E_neg[exp(s_ij)], the generalized
loss -s_i+ + alpha log Z_i is made linear in Z_i by the Gamma identity. Each step, per anchor:

  1. log Z_hat_i = logmeanexp_j s_ij over the in-batch candidates (negatives only by default;
     `include_positive` adds the positive)                                     (graph kept)
  2. E-step: log R_i <- log((1-gamma) R_i + gamma Z_hat_i)  in the per-sample memory (no graph);
             u_i = alpha / (R_i + eps) (mode "mean") or u_i ~ Gamma(alpha, rate R_i + eps) ("sample")
  3. M-step: minimise mean_i [ -s_i+ + stopgrad(u_i) Z_hat_i(theta) ]

With gamma = 1, mode "mean", alpha = 1 and include_positive the gradient is exactly the minibatch
InfoNCE gradient (biased); the memory R_i carried across steps is what reduces the bias, not to zero:
1/R_i of a noisy memory is not 1/Z_i on average (a Jensen gap) and the entries go stale between visits.
Measured on a fixed population (tests/test_loss_gamma.py, N=128, batch 8): the memory brings the
expected gradient several times closer to the full-data gradient than the same estimator without
memory (gamma = 1). Because the E-step runs before the M-step, u_i Z_hat_i <= alpha / gamma in mode
"mean": the weights cannot explode when the scores jump.

`estimator="sogclr"` is SogCLR (Yuan et al., ICML 2022) in the same machinery: the memory tracks
g_i = mean_j exp(s_ij - s_i+) (the partition function relative to the positive) and the M-step
minimises mean_i stopgrad(alpha / (R_i + eps)) g_i(theta), with no separate positive term.

The core works on a score matrix: `logits` [B, C] (anchor i against candidate j, already scaled by
1/tau), `pos` [B] (the positive's column of each anchor), an optional validity mask of the candidates
and the anchors' sample indices. `GammaDirection.scores` is that core for one direction (the synthetic
benchmark drives it with s_theta = theta * g(x, y)); `GammaContrastiveLoss` computes both directions
of a two-tower batch from embeddings and updates both directions' state in one exchange.
Scores are computed in float32 with autocast off and everything else in log space, so the loss is
stable under bf16 autocast and for scores far beyond exp's float32 range.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from .contrastive import _dist_on, candidate_mask, gather_candidates, similarity
from .phases import phase
from .state import SMALL_EXCHANGE, LocalRateStore, ShardedRateStore


@dataclass
class GammaSettings:
    alpha: float = 1.0
    gamma: float = 0.1
    gamma_schedule: str = "constant"   # or "cosine": 1.0 -> gamma_min over training
    gamma_min: float = 0.2
    gamma_decay_fraction: float = 1.0  # cosine: reach gamma_min at this fraction of training, then hold
    rescale_memory: bool = False       # the memory holds log R / logit_scale (see state.py)
    track_age: bool = False            # the store remembers when each entry was last written
    mode: str = "mean"                 # or "sample"
    include_positive: bool = False
    gather_negatives: bool = False
    eps: float = 0.0
    estimator: str = "gamma"           # or "sogclr"

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"gamma loss: alpha must be > 0, got {self.alpha}")
        if not 0.0 < self.gamma <= 1.0 or not 0.0 < self.gamma_min <= 1.0:
            raise ValueError(f"gamma loss: gamma and gamma_min must be in (0, 1], got {self.gamma}, {self.gamma_min}")
        if self.mode not in ("mean", "sample"):
            raise ValueError(f"gamma loss: mode must be 'mean' or 'sample', got {self.mode!r}")
        if self.gamma_schedule not in ("constant", "cosine"):
            raise ValueError(f"gamma loss: gamma_schedule must be 'constant' or 'cosine', got {self.gamma_schedule!r}")
        if self.estimator not in ("gamma", "sogclr"):
            raise ValueError(f"gamma loss: estimator must be 'gamma' or 'sogclr', got {self.estimator!r}")
        if self.eps < 0:
            raise ValueError(f"gamma loss: eps must be >= 0, got {self.eps}")
        if not 0.0 < self.gamma_decay_fraction <= 1.0:
            raise ValueError(f"gamma loss: gamma_decay_fraction must be in (0, 1], got {self.gamma_decay_fraction}")

    @classmethod
    def from_config(cls, loss_cfg) -> "GammaSettings":
        """From the config's `loss` section (kind gamma or sogclr); the config has checked the values."""
        g = loss_cfg.gamma
        if loss_cfg.kind == "sogclr":
            # SogCLR: the memory tracks mean_j exp(s_ij - s_i+) over negatives, u = 1/(R + eps)
            return cls(alpha=1.0, gamma=g.gamma, gamma_schedule=g.gamma_schedule, gamma_min=g.gamma_min,
                       gamma_decay_fraction=g.gamma_decay_fraction, mode="mean", include_positive=False,
                       gather_negatives=loss_cfg.gather_negatives, eps=g.eps, estimator="sogclr",
                       rescale_memory=g.rescale_memory, track_age=g.track_age)
        return cls(alpha=g.alpha, gamma=g.gamma, gamma_schedule=g.gamma_schedule, gamma_min=g.gamma_min,
                   gamma_decay_fraction=g.gamma_decay_fraction, mode=g.mode, include_positive=g.include_positive,
                   gather_negatives=loss_cfg.gather_negatives, eps=g.eps, rescale_memory=g.rescale_memory,
                   track_age=g.track_age)

    def gamma_at(self, progress: float) -> float:
        if self.gamma_schedule == "constant":
            return self.gamma
        p = min(max(progress / self.gamma_decay_fraction, 0.0), 1.0)
        return self.gamma_min + 0.5 * (1.0 - self.gamma_min) * (1.0 + math.cos(math.pi * p))


@dataclass
class PartitionEstimate:
    """Step 1 for one direction: everything the E- and M-steps need."""
    logits: torch.Tensor       # [B, C] float32/float64, graph kept
    pos: torch.Tensor          # [B] positive scores, graph kept
    log_zhat: torch.Tensor     # [B] log of the mean exp over the candidates counted, graph kept
    has_neg: torch.Tensor      # [B] bool: the anchor had at least one candidate to average
    state_input: torch.Tensor  # [B] detached value fed to the memory (NaN = no observation)
    every_anchor_has_neg: bool = False  # known from the shapes alone: has_neg is all True


@functools.lru_cache(maxsize=64)
def _diagonal_mask(B: int, C: int, offset: int, include_positive: bool, device: torch.device, dtype: torch.dtype):
    """For the usual batch (every candidate valid, anchor i's positive at column offset + i): the
    additive mask of the candidates counted (0, or -inf for the positive), log of their number,
    whether every anchor has one and `has_neg`, made once per shape instead of every step."""
    count = C if include_positive else C - 1
    add = torch.zeros(B, C, device=device, dtype=dtype)
    if not include_positive:
        add[torch.arange(B, device=device), torch.arange(B, device=device) + offset] = -math.inf
    return add, math.log(max(count, 1)), count > 0, torch.full((B,), count > 0, dtype=torch.bool, device=device)


def estimate_partition(logits: torch.Tensor, pos_col: torch.Tensor | None, settings: GammaSettings,
                       valid: torch.Tensor | None = None, offset: int | None = None) -> PartitionEstimate:
    """log Z_hat_i = log mean_{j counted} exp(s_ij), stable (logsumexp) and NaN-free in its gradient
    even for an anchor with nothing to average (batch of 1 without the positive). `logits` may have
    leading dimensions ([..., B, C], e.g. both directions of a batch at once: one set of ops for
    both); the candidates counted (and `has_neg`, [B]) are the same for all of them.

    `offset` (with `valid` None): the caller's promise that pos_col is arange(B) + offset, the
    two-tower batch; the positives are then a diagonal and the mask is made once per shape (a step
    at a small micro-batch is mostly the number of tensor operations it launches). With `offset`
    given, pos_col may be None (made only where the diagonal does not apply)."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    B, C = work.shape[-2:]
    if valid is None and offset is not None and 0 <= offset and offset + B <= C:
        add, log_count, every, has = _diagonal_mask(B, C, offset, settings.include_positive, work.device, work.dtype)
        if every:
            pos = work.diagonal(offset, dim1=-2, dim2=-1)
            log_zhat = torch.logsumexp(work + add, dim=-1) - log_count
            observed = log_zhat.detach() - pos.detach() if settings.estimator == "sogclr" else log_zhat.detach()
            return PartitionEstimate(work, pos, log_zhat, has, observed, every_anchor_has_neg=True)
    if pos_col is None:
        if offset is None:
            raise ValueError("estimate_partition: give pos_col or offset")
        pos_col = torch.arange(B, device=work.device) + offset
    pos_col = pos_col.to(work.device).long()
    pos = work.gather(-1, pos_col.expand(work.shape[:-1])[..., None]).squeeze(-1)
    ok = candidate_mask(B, C, pos_col, valid, include_positive=settings.include_positive, device=work.device)
    has = ok.any(dim=1)
    # an empty row gets a dummy column 0 so that logsumexp (and its gradient) stays finite; it is masked out
    safe = ok | ((~has)[:, None] & (torch.arange(C, device=work.device) == 0)[None, :])
    count = safe.sum(dim=1).to(work.dtype)
    log_zhat = torch.logsumexp(work.masked_fill(~safe, -math.inf), dim=-1) - torch.log(count)
    observed = log_zhat.detach() - (pos.detach() if settings.estimator == "sogclr" else 0.0)
    state_input = torch.where(has, observed, torch.full_like(observed, math.nan))
    return PartitionEstimate(work, pos, log_zhat, has, state_input)


@functools.lru_cache(maxsize=16)
def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A constant 0 for a diagnostic that is known to be 0 (made once, not every step; never
    written in place)."""
    return torch.zeros((), device=device, dtype=dtype)


def sample_log_gamma(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """log of n draws of Gamma(alpha, 1), float64 on CPU from `generator` (log first: small alpha
    puts much mass near 0, where float32 underflows)."""
    g = torch._standard_gamma(torch.full((n,), float(alpha), dtype=torch.float64), generator=generator)
    return torch.log(g.clamp_min(torch.finfo(torch.float64).tiny))


def m_step(est: PartitionEstimate, log_rate: torch.Tensor, settings: GammaSettings,
           generator: torch.Generator | None,
           average_leading: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 3 given the updated memory log R (detached, [..., B]). Returns the M-step objective
    mean_i [-s_i+ + stopgrad(u_i) Z_hat_i(theta)] (anchors without negatives count zero; its value is
    a surrogate, about alpha - s_i+ at the fixed point) and detached diagnostics, among them the
    generalized loss mean_i [-s_i+ + alpha log R_i] that the EM minimises; both shaped like the
    leading dimensions of the estimate (scalars for one direction); with `average_leading` the
    objective and the diagnostics are averaged over the leading dimensions as well, scalars (both
    directions of a batch: one reduction instead of one per direction and another across them)."""
    s = settings
    B = est.pos.shape[-1]
    has = est.has_neg
    every = est.every_anchor_has_neg  # then the masks below change nothing: left out (fewer operations)
    log_r = log_rate if log_rate.dtype == est.log_zhat.dtype and not log_rate.requires_grad \
        else log_rate.to(est.log_zhat).detach()
    if not every:
        log_r = torch.where(has, log_r, torch.zeros_like(log_r))  # anchors without negatives: inert
    if s.eps > 0:
        log_r = torch.logaddexp(log_r, torch.full_like(log_r, math.log(s.eps)))
    if s.mode == "sample":  # the leading dimensions draw one after the other from the generator
        log_u = sample_log_gamma(s.alpha, log_r.numel(), generator).reshape(log_r.shape).to(log_r) - log_r
    elif s.alpha == 1.0:
        log_u = None  # u = 1 / R: the weight below is exp(log Z_hat - log R), one operation fewer
    else:
        log_u = math.log(s.alpha) - log_r
    if s.estimator == "sogclr":
        log_g = est.log_zhat - est.pos
        weight = torch.exp(log_g - log_r if log_u is None else log_u + log_g)   # u_i * g_i(theta)
        per_anchor = weight
    else:
        weight = torch.exp(est.log_zhat - log_r if log_u is None else log_u + est.log_zhat)  # u_i * Z_hat_i(theta)
        per_anchor = weight - est.pos
    # the generalized loss -s_i+ + alpha log Z_i with the memory's estimate of Z_i (for logging)
    scaled = log_r if s.alpha == 1.0 else s.alpha * log_r
    value = scaled - est.pos.detach() if s.estimator == "gamma" else scaled
    if every:  # the diagnostics as one stack: one reduction for all of them
        objective = per_anchor.mean() if average_leading else per_anchor.mean(-1)
        stats = torch.stack([log_r, weight.detach(), value])
        rate, w, gen = stats.mean(tuple(range(1, stats.dim())) if average_leading else -1).unbind(0)
        none = _zero(rate.device, rate.dtype) if average_leading else torch.zeros_like(rate)
        return objective, {"log_rate_mean": rate, "weight_mean": w, "generalized_loss": gen,
                           "anchors_without_negatives": none}
    per_anchor = torch.where(has, per_anchor, torch.zeros_like(per_anchor))
    objective = per_anchor.sum(-1) / max(B, 1)
    if B == 0:
        objective = est.logits.sum((-2, -1)) * 0.0
    n = has.sum().clamp_min(1)
    diagnostics = {
        "log_rate_mean": (log_r * has).sum(-1) / n,
        "weight_mean": (weight.detach() * has).sum(-1) / n,
        "generalized_loss": (value * has).sum(-1) / n,
        "anchors_without_negatives": (~has).sum().to(log_r.dtype).expand(objective.shape),
    }
    if average_leading:
        objective = objective.mean()
        diagnostics = {k: v.mean() for k, v in diagnostics.items()}
    return objective, diagnostics


class GammaDirection:
    """One direction (anchors of one modality): channel `channel` of a rate store."""

    def __init__(self, store: LocalRateStore | ShardedRateStore, settings: GammaSettings,
                 generator: torch.Generator | None = None, channel: int = 0):
        self.store = store
        self.settings = settings
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.channel = channel

    def scores(self, logits: torch.Tensor, pos_col: torch.Tensor, sample_index: torch.Tensor,
               progress: float = 0.0, valid: torch.Tensor | None = None,
               offset: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The whole EM step from a score matrix: logits [B, C], pos_col [B], sample_index [B]
        (`offset`: pos_col is arange(B) + offset, see estimate_partition)."""
        est = estimate_partition(logits, pos_col, self.settings, valid, offset)
        obs = est.state_input
        if self.store.channels > 1:  # the other channels see "no observation"
            full = torch.full((obs.shape[0], self.store.channels), math.nan, dtype=obs.dtype, device=obs.device)
            full[:, self.channel] = obs
            log_rate = self.store.update(sample_index, full, self.settings.gamma_at(progress))[:, self.channel]
        else:
            log_rate = self.store.update(sample_index, obs, self.settings.gamma_at(progress))
        return m_step(est, log_rate, self.settings, self.generator)

    def __call__(self, anchors: torch.Tensor, candidates: torch.Tensor, logit_scale: torch.Tensor,
                 sample_index: torch.Tensor, progress: float = 0.0, valid: torch.Tensor | None = None,
                 offset: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Embedding-level form: anchor i's positive is candidate offset + i."""
        logits = similarity(anchors, candidates, logit_scale)
        pos_col = torch.arange(anchors.shape[0], device=logits.device) + offset
        return self.scores(logits, pos_col, sample_index, progress, valid, offset=offset)


@functools.lru_cache(maxsize=64)
def _minus_constant(add: torch.Tensor, c: float) -> torch.Tensor:
    """add - c for a cached mask (made once per shape, not every step)."""
    return add - c


class _DiagonalGamma(torch.autograd.Function):
    """Estimate, E-step and M-step of both directions of the usual two-tower batch as one autograd
    node: `i2t` [B, B] (text -> image is its transpose, the positives its diagonal), mode "mean",
    alpha 1, no eps, the memory written by `update` (log Z_hat [2, B] -> updated log R [2, B]).
    The same values as estimate_partition + m_step (average_leading) in about half the operations
    and a closed-form backward: d/ds_ij of u_i Z_hat_i is u_i Z_hat_i softmax_j over the candidates
    counted, so the gradient is w_i e_ij / sum_j e_ij - [j = i], averaged over the 2B anchors."""

    @staticmethod
    def forward(ctx, i2t, add, log_count: float, update):
        ctx.set_materialize_grads(False)  # the stats' gradient is never used: no zeros made for it
        shifted = torch.stack([i2t, i2t.T]).add_(_minus_constant(add, log_count))  # s + mask - log(count)
        top = shifted.amax(-1, keepdim=True)
        e = shifted.sub_(top).exp_()  # exp(s - max): [2, B, B], the same for any constant shift
        total = e.sum(-1)
        log_zhat = total.log().add_(top.squeeze(-1))
        log_r = update(log_zhat)
        weight = torch.exp(log_zhat - log_r)  # u_i Z_hat_i
        w_mean, pos_mean, rate_mean = weight.mean(), i2t.diagonal().mean(), log_r.mean()
        ctx.save_for_backward(e, weight / total)
        stats = torch.stack([rate_mean, w_mean, rate_mean - pos_mean])  # log R, u Z_hat, -s+ + log R
        ctx.mark_non_differentiable(stats)
        return w_mean - pos_mean, stats

    @staticmethod
    def backward(ctx, grad_objective, _grad_stats):
        if grad_objective is None:  # not materialised: nothing flows back
            return None, None, None, None
        e, coef = ctx.saved_tensors
        g = e * coef.unsqueeze(-1)
        grad = g[0] + g[1].T
        grad.diagonal().sub_(2.0)  # the positive, once in each direction
        return grad.mul_(grad_objective / (2 * e.shape[-1])), None, None, None


def _derived_seed(*parts) -> int:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


class GammaContrastiveLoss:
    """Both directions of a two-tower batch, each with its own state (channel 0: image anchors,
    channel 1: text anchors) in one store, updated in one exchange per step.

    Not an nn.Module: it has no parameters, only per-sample state and the E-step's random generator,
    which are checkpointed through `state_dict` / `load_shards`."""

    DIRECTIONS = ("image_to_text", "text_to_image")

    def __init__(self, num_samples: int, settings: GammaSettings, seed: int = 0, distributed: bool | None = None,
                 device: torch.device | str = "cpu", group=None, capacity: int | None = None):
        self.settings = settings
        # the micro-batch: gathers and the memory exchange in fixed-size blocks, no host read (state.py)
        self.capacity = capacity
        self.seed = int(seed)
        sharded = _dist_on() if distributed is None else distributed
        if sharded:
            self.store: LocalRateStore | ShardedRateStore = ShardedRateStore(
                num_samples, channels=2, group=group, device=device, track_age=settings.track_age)
        else:
            self.store = LocalRateStore(num_samples, channels=2, device=device, track_age=settings.track_age)
        self.generator = torch.Generator().manual_seed(_derived_seed("gamma-e-step", self.seed, self.store.rank))
        self.image_to_text = GammaDirection(self.store, settings, self.generator, channel=0)
        self.text_to_image = GammaDirection(self.store, settings, self.generator, channel=1)

    def __call__(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 sample_index: torch.Tensor, progress: float = 0.0,
                 distinct: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """(loss, metrics): the metrics are detached device tensors (read them when logging).
        `distinct`: the caller checked on the host that the sample indices are all different (the
        memory update then has no duplicates to combine)."""
        s = self.settings
        if s.gather_negatives and _dist_on():
            all_text, valid, off = gather_candidates(text, self.capacity)
            all_image, _, _ = gather_candidates(image, self.capacity)  # the same rows are valid
        else:
            all_text, valid, all_image, off = text, None, image, 0
        B = image.shape[0]
        if valid is None and self._diagonal_fits(B):  # the usual batch: one autograd node (_DiagonalGamma)
            i2t = similarity(image, text, logit_scale)
            add, log_count, _, _ = _diagonal_mask(B, B, 0, s.include_positive, i2t.device, i2t.dtype)
            gamma, scale = s.gamma_at(progress), self.memory_scale(logit_scale)

            def update(log_zhat):
                with phase("step/memory_exchange"):
                    return self.store.update_observed(sample_index, log_zhat, gamma, scale, distinct=distinct)

            loss, stats = _DiagonalGamma.apply(i2t, add, log_count, update)
            rate, w, gen = stats.unbind(0)
            metrics: dict[str, torch.Tensor | float] = {
                "gamma/log_rate_mean": rate, "gamma/weight_mean": w, "gamma/generalized_loss": gen,
                "gamma/anchors_without_negatives": _zero(rate.device, rate.dtype), "gamma/gamma_t": gamma}
            metrics.update(self.age_metrics())
            return loss, metrics
        pos_col = None  # arange(B) + off: estimate_partition makes it where the diagonal does not apply
        if valid is None:  # text -> image is image -> text transposed: one product for both
            i2t = similarity(image, text, logit_scale)
            both = torch.stack([i2t, i2t.T])
        else:  # both directions in one set of ops: [2, B, C] (the gathered rows' validity is the same for both)
            both = torch.stack([similarity(image, all_text, logit_scale), similarity(text, all_image, logit_scale)])
        est = estimate_partition(both, pos_col, s, valid, off)
        with phase("step/memory_exchange"):
            if self.capacity is not None and est.every_anchor_has_neg and isinstance(self.store, LocalRateStore) \
                    and est.log_zhat.shape[-1] <= SMALL_EXCHANGE:  # the fixed-size path, every anchor observed
                log_rate = self.store.update_observed(sample_index, est.state_input, s.gamma_at(progress),
                                                      self.memory_scale(logit_scale), distinct=distinct)
            else:
                log_rate = self.store.update(sample_index, est.state_input.T, s.gamma_at(progress),
                                             self.memory_scale(logit_scale), capacity=self.capacity).T
        loss, diag = m_step(est, log_rate, s, self.generator, average_leading=True)  # both directions' mean
        metrics: dict[str, torch.Tensor | float] = {f"gamma/{k}": v for k, v in diag.items()}
        metrics["gamma/gamma_t"] = s.gamma_at(progress)
        metrics.update(self.age_metrics())
        return loss, metrics

    def _diagonal_fits(self, B: int) -> bool:
        """Whether a local batch of B takes `_DiagonalGamma`: one process's fixed-size store (the
        observed update), every anchor with a candidate, the plain EM of mode "mean" with alpha 1."""
        s = self.settings
        return (self.capacity is not None and isinstance(self.store, LocalRateStore) and 0 < B <= SMALL_EXCHANGE
                and (B > 1 or s.include_positive) and s.estimator == "gamma" and s.mode == "mean"
                and s.alpha == 1.0 and s.eps == 0.0)

    def memory_scale(self, logit_scale: torch.Tensor):
        """The logit scale the memory is kept at (a detached device tensor: no host read), or 1."""
        return logit_scale.detach().reshape(()).double() if self.settings.rescale_memory else 1.0

    def age_metrics(self) -> dict[str, torch.Tensor]:
        """How stale this step's memory entries were: steps since each anchor's entry was last
        written (first visits excluded, counted apart; NaN when every entry was a first visit)."""
        age = self.store.last_age
        if age is None or age.numel() == 0:
            return {}
        seen = ~torch.isnan(age)
        mean = torch.nanmean(age)  # NaN when every entry was a first visit
        top = torch.where(torch.isnan(mean), mean, age.nan_to_num(nan=-math.inf).amax())
        return {"gamma/memory_first_visit_fraction": 1.0 - seen.float().mean(), "gamma/memory_age_mean": mean,
                "gamma/memory_age_max": top}

    @torch.no_grad()
    def log_rates(self, sample_index: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
        """The memory's log R of both directions for `sample_index` ([B, 2], NaN = never visited) at
        `logit_scale` (single-process stores: the diagnostics of workers/training/heads.py)."""
        if not isinstance(self.store, LocalRateStore):
            raise TypeError("log_rates reads a single-process store")
        lr = self.store.lookup(sample_index).double()
        return lr * (logit_scale if self.settings.rescale_memory else 1.0)

    def participate(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | None = None) -> None:
        """Join this step's collectives with an empty batch (a rank whose data ran out first). It
        still owns part of the memory and updates other ranks' rows there, at the step's logit scale."""
        if self.settings.gather_negatives and _dist_on():
            gather_candidates(text[:0], self.capacity)
            gather_candidates(image[:0], self.capacity)
        scale = 1.0 if logit_scale is None else self.memory_scale(logit_scale)
        self.store.update(torch.zeros(0, dtype=torch.long, device=image.device),
                          torch.zeros(0, 2, dtype=torch.float32, device=image.device), 1.0, scale,
                          capacity=self.capacity)

    # -- checkpoints
    def state_dict(self) -> dict:
        """This process's shard of both directions plus the E-step generator (no copy of the state:
        serialise it before the next step)."""
        return {"image_to_text": self.store.state_dict(0), "text_to_image": self.store.state_dict(1),
                "generator": self.generator.get_state(), "rank": self.store.rank,
                "world_size": self.store.world_size, "seed": self.seed}

    def load_shards(self, shards: Iterable[dict] | dict) -> None:
        """Restore from the per-rank state dicts of a checkpoint saved with any world size. `shards`
        may be a generator (each shard is read once, then dropped). With the same world size the
        generator resumes exactly where this rank's left off; after re-sharding it is re-derived
        deterministically from the checkpoint's generators and the new rank."""
        if isinstance(shards, dict):
            shards = [shards]
        mine, old_states = None, []
        for sd in shards:
            self.store.load_shards(sd["image_to_text"], channel=0)
            self.store.load_shards(sd["text_to_image"], channel=1)
            if "generator" in sd:
                r0 = int(sd.get("rank", sd["image_to_text"]["rank"]))
                w0 = int(sd.get("world_size", sd["image_to_text"]["world_size"]))
                old_states.append((r0, sd["generator"]))
                if w0 == self.store.world_size and r0 == self.store.rank:
                    mine = sd["generator"]
        if mine is not None:
            self.generator.set_state(mine)
        elif old_states:
            parts = [b"".join(bytes(st.numpy().tobytes()) for _, st in sorted(old_states, key=lambda x: x[0]))]
            self.generator.manual_seed(_derived_seed("gamma-e-step-reshard", self.seed, self.store.rank,
                                                     self.store.world_size, *parts))

    def load_generator_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def nbytes(self) -> int:
        return self.store.nbytes()
