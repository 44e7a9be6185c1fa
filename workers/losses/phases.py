"""Labels for the training step's phases in torch.profiler (`gammaray bench step` reads them): data,
forward, loss, memory exchange, backward, optimizer, metrics.

`torch.profiler.record_function` dispatches an operator on entry and exit even when no profiler
runs: about 9 us per label on a CPU, half a dozen labels a step, where a small micro-batch's step is
a few milliseconds of such fixed costs. `phase` labels only while a profiler is recording."""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

_NO_LABEL = contextlib.nullcontext()


def phase(name: str):
    """record_function(name) while a profiler records, else a context that does nothing."""
    return record_function(name) if torch._C._autograd._profiler_enabled() else _NO_LABEL
