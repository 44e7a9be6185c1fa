"""The gamma loss's shortcuts for the usual batch give the general path's values: the positives on a
diagonal (no masks), duplicates of a small exchange found by comparing rows, the sorted path above it.
A small micro-batch's step is mostly its number of tensor operations (`gammaray bench step`), so the
common case takes fewer; these tests hold the two paths to the same numbers."""

from __future__ import annotations

import math

import pytest
import torch

from workers.losses.gamma import GammaSettings, estimate_partition, m_step
from workers.losses.state import LocalRateStore, combine_duplicates

pytestmark = [pytest.mark.loss, pytest.mark.usefixtures("one_torch_thread")]



@pytest.mark.parametrize("seed", range(4))
def test_the_two_duplicate_combinations_agree_with_the_host_reference(seed):
    """A fixed-size update combines a slot's duplicate rows by comparing every row with every other
    (up to SMALL_EXCHANGE rows) or over sorted segments (above): both give the host path's
    `combine_duplicates` value on every row, NaN where a slot had no observation."""
    from workers.losses.state import _combine_by_comparison, _combine_by_sorting

    g = torch.Generator().manual_seed(seed)
    m = 40
    slots = torch.randint(0, 12, (m,), generator=g)
    lz = torch.randn(m, 2, generator=g, dtype=torch.float64) * 30
    lz[torch.rand(m, 2, generator=g) < 0.3] = math.nan
    uniq, ref, inverse = combine_duplicates(slots, lz)
    by_row = ref[inverse]
    torch.testing.assert_close(_combine_by_comparison(slots, lz), by_row, equal_nan=True, rtol=0, atol=1e-12)
    srt, perm, comb = _combine_by_sorting(slots, lz)
    assert torch.equal(srt, slots[perm])
    torch.testing.assert_close(comb, by_row[perm], equal_nan=True, rtol=0, atol=1e-12)


def test_a_batch_past_the_comparison_size_updates_like_a_small_one(monkeypatch):
    """The sorted path (a large exchange) and the comparison path write the same memory."""
    import workers.losses.state as state

    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 50, (64,), generator=g)
    log_z = torch.randn(64, 2, generator=g)
    small = LocalRateStore(50, channels=2, track_age=True)
    small.update(index, log_z, 0.3, capacity=64)
    out_small = small.update(index.flip(0), log_z, 0.3, capacity=64)
    monkeypatch.setattr(state, "SMALL_EXCHANGE", 8)
    large = LocalRateStore(50, channels=2, track_age=True)
    large.update(index, log_z, 0.3, capacity=64)
    out_large = large.update(index.flip(0), log_z, 0.3, capacity=64)
    torch.testing.assert_close(out_small, out_large, rtol=0, atol=1e-6, equal_nan=True)
    for a, b in zip(small.tables, large.tables):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(small.last_age, large.last_age, equal_nan=True)


@pytest.mark.parametrize("include_positive,estimator", [(False, "gamma"), (True, "gamma"), (False, "sogclr")])
def test_the_diagonal_shortcut_equals_the_masked_estimate(include_positive, estimator):
    """With every candidate valid and the positives on a diagonal (offset given), the estimate and
    the M-step skip the masks: same values and gradients as the general path."""
    g = torch.Generator().manual_seed(1)
    s = GammaSettings(include_positive=include_positive, estimator=estimator, alpha=1.3)
    base = torch.randn(2, 6, 9, generator=g, dtype=torch.float64) * 5
    pos = torch.arange(6) + 2
    log_rate = torch.randn(2, 6, generator=g, dtype=torch.float64)
    out = []
    for offset in (None, 2):
        x = base.clone().requires_grad_()
        est = estimate_partition(x, pos, s, None, offset)
        assert est.every_anchor_has_neg == (offset is not None)
        obj, diag = m_step(est, log_rate, s, None)
        obj.sum().backward()
        out.append((est.state_input, obj.detach(), {k: v.detach() for k, v in diag.items()}, x.grad))
    (si0, o0, d0, g0), (si1, o1, d1, g1) = out
    torch.testing.assert_close(si0, si1, rtol=0, atol=1e-12)
    torch.testing.assert_close(o0, o1, rtol=0, atol=1e-12)
    torch.testing.assert_close(g0, g1, rtol=0, atol=1e-12)
    for k in d0:
        torch.testing.assert_close(d0[k], d1[k].to(d0[k].dtype), rtol=0, atol=1e-12)
