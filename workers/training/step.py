"""The training step: the one function every loop calls (the pretrain loop, the in-process loop of
Ray Tune trials and the structure benchmarks, the heads on cached features, `gammaray bench step`),
and the device-side loss sums the loops keep instead of reading every step's loss on the host.

A step makes no host read of a device value: the objective's terms and metrics stay detached
device tensors (`LossTerms.detached()`), the loss weight of a distributed step is a device tensor
(the global number of good rows, all-reduced without a read), and the loops read them every
`train.log_every` steps. So the Python of the next step runs while the accelerator still works on
this one; at small micro-batches that overlap is most of the step's speed.
"""

from __future__ import annotations

import numpy as np
import torch

from gammaray.schema import IMAGE_MEAN, IMAGE_STD
from gammaray.schema import BatchKeys as K
from workers.losses.phases import phase
from workers.training.objective import OPTIONAL_METRICS, LossTerms, Objective

NOT_AVERAGED = ("logit_scale",)  # a parameter's current value, not a per-record quantity


def train_step(engine, objective: Objective, batch: dict[str, torch.Tensor], progress: float, *,
               weight: torch.Tensor | float | None = None, active: bool = True, boundary: bool = True,
               touch: bool = False) -> LossTerms:
    """One micro-batch: forward, objective, backward, and (at an accumulation boundary) the
    optimizer step. `engine` has the DeepSpeed engine's calls (workers/training/engine.py);
    `weight` scales the loss (a distributed step's share of the global rows); `touch` adds 0 x every
    output so the same parameters get gradients on every rank (a rank with a stand-in batch);
    `active=False`: this rank has no data and contributes exactly zero. Returns the terms, detached."""
    engine.set_gradient_accumulation_boundary(boundary)
    with phase("step/forward"):
        out = engine(batch)
    with phase("step/loss"):
        terms = objective(out, batch, progress, active=active)
        if weight is None:
            loss = terms.total
        else:  # in the loss's precision, like a Python float weight would be
            loss = terms.total * (weight.to(terms.total.dtype) if torch.is_tensor(weight) else weight)
        if touch:
            loss = loss + sum(v.sum() for v in out.values() if torch.is_tensor(v)) * 0.0
    with phase("step/backward"):
        engine.backward(loss)
    with phase("step/optimizer"):
        engine.step()
    return terms.detached()


PIXEL_KEYS = (K.PIXELS, K.PIXELS_AUG, K.PIXELS_PAIR)


def prepare_batch(batch: dict[str, torch.Tensor], bf16: bool = False, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Pixels as the image tower takes them: uint8 [B,H,W,3] (the stream's `device_pixels`) normalised
    here, on the device; bf16 for a bf16 engine, channels_last (NHWC) memory when the tower is in it
    (train.channels_last). Other keys pass through."""
    out = dict(batch)
    for k in PIXEL_KEYS:
        v = out.get(k)
        if v is None:
            continue
        if v.dtype == torch.uint8:
            v = normalise_pixels(v, channels_last)
        if bf16:
            v = v.to(torch.bfloat16)
        if channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


# (x / 255 - mean) / std as x * SCALE + OFFSET in float32: the same two roundings as the host's
# pipelines/preprocess.normalise, so a batch normalised here is bit for bit the one normalised there
PIXEL_SCALE = float(np.float32(1.0 / (255.0 * IMAGE_STD)))
PIXEL_OFFSET = float(np.float32(-IMAGE_MEAN / IMAGE_STD))


def normalise_pixels(u8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float32 [B,3,H,W]; NHWC memory (channels_last) comes free with the permute."""
    x = u8.permute(0, 3, 1, 2).float()  # keeps the NHWC strides
    x = x.mul_(PIXEL_SCALE).add_(PIXEL_OFFSET)
    return x if channels_last else x.contiguous()


def scalars(terms: LossTerms | None) -> dict[str, float]:
    """The host floats of a step's terms (one device read), {} before the first step."""
    return {} if terms is None else terms.scalars()


def _scalar(t: torch.Tensor) -> torch.Tensor:
    """A detached 0-d view (no operation where it already is one: a step is mostly its operation count)."""
    t = t.detach() if t.requires_grad else t
    return t if t.dim() == 0 else t.reshape(())


class DeviceLossSums:
    """The loss terms of this epoch x their records (`TrainState.loss_sums`), summed on the device in
    float64 in the order a host sum would take (so the sums are the same numbers), read on the
    host only by `flush` (checkpoints, the end of an epoch, the end of the run)."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.acc: torch.Tensor | None = None
        self.records = 0
        self._start: dict = {}
        self.host: dict[str, float] = {}
        self._optional = False

    def add(self, terms: LossTerms, n: int, state) -> None:
        with phase("step/metrics"):
            self._add(terms, n, state)

    def _add(self, terms: LossTerms, n: int, state) -> None:
        values = {**terms.terms, "loss": terms.total, **terms.metrics}
        if self.names is None:
            names = [k for k in values if k not in NOT_AVERAGED]
            self.names = [k for k in names if torch.is_tensor(values[k])]
            self.host = {k: None for k in names if not torch.is_tensor(values[k])}  # plain floats: summed here
            self._optional = any(k in OPTIONAL_METRICS for k in self.names)
            self._start = state.loss_sums or {"records": 0, "sums": {}}
            self.acc = torch.tensor([self._start["sums"].get(k, 0.0) for k in self.names], dtype=torch.float64,
                                    device=terms.total.device)
            self.host = {k: self._start["sums"].get(k, 0.0) for k in self.host}
        assert self.acc is not None
        # float32 values widen exactly to float64 (stack promotes): one op, not one per term
        v = torch.stack([_scalar(values[k]) for k in self.names]).to(torch.float64)
        if self._optional:  # no value this step: adds nothing (as a missing value would)
            v = torch.nan_to_num(v, nan=0.0)
        self.acc += v * n
        for k in self.host:
            self.host[k] += float(values[k]) * n
        self.records += n

    def flush(self, state) -> None:
        """Write the sums into state.loss_sums (the only host read) and start again from them."""
        if self.names is None or self.acc is None:
            return
        sums = dict(self._start.get("sums", {}))
        sums.update(zip(self.names, self.acc.cpu().tolist()))
        sums.update(self.host)
        state.loss_sums = {"records": self._start.get("records", 0) + self.records, "sums": sums}
        self.reset()

    def reset(self) -> None:
        """Forget the unflushed sums (after the state's sums were reset: a new epoch)."""
        self.names, self.acc, self.records, self._start, self.host = None, None, 0, {}, {}
