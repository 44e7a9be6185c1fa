"""The training objective: a contrastive term plus the structure regularizers, as named terms.

`Objective(...)(outputs, batch)` returns `LossTerms`: `terms` are the weighted tensors whose sum is
what gets backpropagated (`contrastive_loss`, `sep_loss`, `bridge_loss`, `gc_loss`), `metrics` are
values for logging (unweighted values, gamma diagnostics). Logging and Ray Tune read the names.

Nothing here reads a device value on the host: metrics stay detached device tensors until
`LossTerms.scalars()` (the loops call it every `train.log_every` steps), so a step never waits for
the accelerator. `batch_size` (the micro-batch) lets the gathered negatives and the gamma memory's
exchange run in fixed-size blocks (workers/losses/state.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from gammaray.config import LossConfig
from gammaray.schema import BatchKeys as K, pair_slots
from workers.losses.contrastive import gather_candidates, infonce_loss, siglip_loss
from workers.losses.gamma import GammaContrastiveLoss, GammaSettings
from workers.losses.structure import StructureObjective, StructureSettings
from workers.training.stateful import Recut


# diagnostics that have no value on some steps (NaN then): left out of `scalars()`
OPTIONAL_METRICS = ("gamma/memory_age_mean", "gamma/memory_age_max")


@dataclass
class LossTerms:
    terms: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        values = iter(self.terms.values())
        total = next(values, 0)
        for t in values:  # not sum(): its start 0 adds one operation (and a backward node) per step
            total = total + t
        return total

    def detached(self) -> "LossTerms":
        """The same values without the graph (what a loop keeps until it logs): no host read."""
        terms = {name: t.detach() if t.requires_grad else t for name, t in self.terms.items()}
        return LossTerms(terms=terms, metrics={k: v.detach() if torch.is_tensor(v) and v.requires_grad else v
                                               for k, v in self.metrics.items()})

    def scalars(self) -> dict[str, float]:
        """Host floats of every term, `loss` and the metrics: one read of the device per call."""
        tensors = {**self.terms, "loss": self.total, **{k: v for k, v in self.metrics.items() if torch.is_tensor(v)}}
        flat = torch.stack([v.detach().to(torch.float64).reshape(()) for v in tensors.values()]).cpu().tolist()
        read = dict(zip(tensors, flat))
        out = {}
        for k in [*self.terms, "loss", *self.metrics]:
            v = read[k] if k in read else float(self.metrics[k])
            if k in OPTIONAL_METRICS and v != v:
                continue
            out[k] = v
        return out


class Objective:
    def __init__(self, cfg: LossConfig, num_samples: int, seed: int = 0, device: torch.device | str = "cpu",
                 distributed: bool | None = None, view_pair: str = "image_text", batch_size: int | None = None):
        self.cfg = cfg
        self.batch_size = batch_size
        # which two model outputs are the positive pair: ("image", "text") unless data.view_pair says otherwise;
        # below, `image`/`text` name the pair's first/second side
        self.pair = pair_slots(view_pair)
        self.gamma: GammaContrastiveLoss | None = None
        if cfg.kind in ("gamma", "sogclr"):
            self.gamma = GammaContrastiveLoss(num_samples, GammaSettings.from_config(cfg), seed=seed, device=device,
                                              distributed=distributed, capacity=batch_size)
        # latent modality structure (workers/losses/structure.py): in-modal terms, the regularizers, ITM
        self.structure = StructureObjective(StructureSettings.from_config(cfg.structure, cfg.gather_negatives))
        # the structure terms relate the image and the text tower (the config refuses them for other pairs)
        self.with_structure = self.pair == ("image", "text")

    @property
    def needs_augmented_views(self) -> bool:
        return self.with_structure and self.structure.needs_augmented_views

    def __call__(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], progress: float = 0.0,
                 active: bool = True) -> LossTerms:
        """`active=False`: this rank has no data this step; it joins the collectives the loss needs
        (candidate gathers, the loss-state exchange) and contributes exactly zero."""
        image, text, scale = out[self.pair[0]], out[self.pair[1]], out["logit_scale"]
        metrics: dict[str, torch.Tensor | float] = {"logit_scale": scale.detach().reshape(())}
        kind = self.cfg.kind
        if not active:
            if self.gamma is not None:
                self.gamma.participate(image, text, scale)
            elif self.cfg.gather_negatives:
                gather_candidates(text[:0], self.batch_size)
                if kind == "infonce":
                    gather_candidates(image[:0], self.batch_size)
            zero = (image.sum() + text.sum() + scale.sum()) * 0.0
            inactive_terms = {"contrastive_loss": zero}
            if self.with_structure:
                self.structure.apply(out, inactive_terms, metrics, active=False)
            return LossTerms(terms=inactive_terms, metrics=metrics)
        if kind == "infonce":
            con = infonce_loss(image, text, scale, gather=self.cfg.gather_negatives, pad_to=self.batch_size)
        elif kind == "siglip":
            con = siglip_loss(image, text, scale, out["logit_bias"], gather=self.cfg.gather_negatives,
                              pad_to=self.batch_size)
        else:
            assert self.gamma is not None
            con, gm = self.gamma(image, text, scale, batch[K.SAMPLE_INDEX], progress,
                                 distinct=bool(batch.get(K.SAMPLE_INDEX_DISTINCT, False)))
            metrics.update(gm)
        terms = {"contrastive_loss": con}
        if self.with_structure:
            self.structure.apply(out, terms, metrics)
        return LossTerms(terms=terms, metrics=metrics)

    # the loss state (the gamma memory's shard and E-step generator) is a checkpoint component
    # (workers/training/stateful.py)
    def state_dict(self) -> dict:
        return {"gamma": self.gamma.state_dict()} if self.gamma is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.load_shards([state_dict])

    def reshard(self, shards: Iterable[dict], recut: Recut) -> None:
        """Re-shard the memory (sample i lives on rank i mod W); the E-step generator restarts from
        `recut.seed`."""
        self.load_shards(shards)
        if self.gamma is not None:
            self.gamma.generator.manual_seed(recut.seed)

    def nbytes(self) -> int:
        return self.gamma.nbytes() if self.gamma is not None else 0

    def load_shards(self, shards: Iterable[dict]) -> None:
        """Per-rank state dicts of a checkpoint saved with any world size; an iterable (a generator
        reading one file at a time keeps peak memory at one old shard)."""
        if self.gamma is not None:
            self.gamma.load_shards(s["gamma"] for s in shards if "gamma" in s)
