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


@pytest.mark.parametrize("gamma,scale,dtype", [(0.3, 1.0, torch.float32), (1.0, 1.0, torch.float64),
                                               (0.1, torch.tensor(7.5, dtype=torch.float64), torch.float32)])
def test_the_observed_update_equals_the_fixed_size_update(gamma, scale, dtype):
    """`update_observed` (one process, every row observed, channel-major) writes the memory, the
    ages and the returned rates of `update(..., capacity=...)`: duplicates in the batch, first visits
    and revisits, the rescaled memory, gamma = 1."""
    g = torch.Generator().manual_seed(3)
    fast, ref = (LocalRateStore(30, channels=2, track_age=True) for _ in range(2))
    for step in range(5):
        index = torch.randint(0, 30, (12,), generator=g)
        index[3] = index[7]  # a duplicate every step
        log_z = (torch.randn(12, 2, generator=g) * 20).to(dtype)
        got = fast.update_observed(index, log_z.T.contiguous(), gamma, scale)
        want = ref.update(index, log_z, gamma, scale, capacity=12)
        assert got.shape == (2, 12) and got.dtype == want.dtype
        torch.testing.assert_close(got.T, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fast.table, ref.table, rtol=1e-6, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(fast.last_age, ref.last_age, equal_nan=True)
        assert torch.equal(fast.last_update, ref.last_update) and fast.updates == ref.updates == step + 1
    assert [t.data_ptr() for t in fast.tables] == [fast.table[c].data_ptr() for c in range(2)]  # views, no copies


def test_the_observed_update_refuses_an_index_outside_the_memory():
    store = LocalRateStore(10, channels=2)
    for bad in (-1, 10):
        with pytest.raises(ValueError, match=r"sample_index must be >= 0 and < 10"):
            store.update_observed(torch.tensor([1, bad]), torch.zeros(2, 2), 0.5)
    assert torch.isnan(store.table).all()  # nothing written
    with pytest.raises(ValueError, match=r"log_z must be \[2, B\]"):
        store.update_observed(torch.tensor([1, 2]), torch.zeros(2, 3), 0.5)


@pytest.mark.parametrize("offset", [None, 0])
def test_m_step_averaged_over_directions_is_the_mean_of_the_directions(offset):
    """`average_leading` (the two-tower loss's form): objective and diagnostics are the means of the
    per-direction values, on the diagonal shortcut and on the general path."""
    g = torch.Generator().manual_seed(2)
    s = GammaSettings()
    x = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    log_rate = torch.randn(2, 5, generator=g, dtype=torch.float64)
    est = estimate_partition(x, torch.arange(5), s, None, offset)
    per_dir, d_dir = m_step(est, log_rate, s, None)
    both, d_both = m_step(est, log_rate, s, None, average_leading=True)
    torch.testing.assert_close(both, per_dir.mean(), rtol=0, atol=1e-12)
    assert d_both.keys() == d_dir.keys()
    for k in d_dir:
        assert torch.is_tensor(d_both[k]) and d_both[k].dim() == 0
        torch.testing.assert_close(d_both[k].double(), d_dir[k].double().mean(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("distinct,settings", [
    (False, dict(gamma=0.3, track_age=True)),
    (True, dict(gamma=0.3, track_age=True)),
    (True, dict(gamma=0.5, include_positive=True, rescale_memory=True)),
    (False, dict(gamma=0.3, mode="sample")),  # not the diagonal node: the general M-step on the short update
])
def test_the_two_tower_loss_on_the_short_path_matches_the_host_path(distinct, settings):
    """The training step's gamma loss (fixed-size, one process: the observed update and, in mode
    "mean", the one-node `_DiagonalGamma`) gives the loss, gradients (embeddings and logit scale),
    metrics and memory of the host path (no capacity: `combine_duplicates`, grown store, the
    estimate and M-step's own graph), step after step; duplicates included unless the batch is
    `distinct` (the caller's host check: no duplicates to combine)."""
    from workers.losses.gamma import GammaContrastiveLoss

    s = GammaSettings(**settings)
    short = GammaContrastiveLoss(40, s, distributed=False, capacity=8)
    host = GammaContrastiveLoss(40, s, distributed=False)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        idx = torch.randperm(40, generator=g)[:8] if distinct else torch.randint(0, 40, (8,), generator=g)
        if not distinct:
            idx[1] = idx[6]
        img, txt = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1) for _ in range(2))
        out = []
        for loss in (short, host):
            a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
            scale = torch.tensor(10.0 + step, requires_grad=True)
            value, metrics = loss(a, b, scale, idx, step / 4, distinct=distinct and loss is short)
            value.backward()
            out.append((value.detach(), a.grad, b.grad, scale.grad, {k: float(v) for k, v in metrics.items()}))
        (v0, ga0, gb0, gs0, m0), (v1, ga1, gb1, gs1, m1) = out
        torch.testing.assert_close(v0, v1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ga0, ga1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gb0, gb1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs0, gs1, rtol=1e-5, atol=1e-6)
        assert m0.keys() == m1.keys()
        for k in m0:
            assert (math.isnan(m0[k]) and math.isnan(m1[k])) or m0[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    for c in range(2):
        torch.testing.assert_close(short.store.tables[c], host.store.tables[c][:40], rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("include_positive", [False, True])
def test_the_diagonal_node_gradient_matches_finite_differences(include_positive):
    """`_DiagonalGamma`'s closed-form backward against finite differences of its own forward (float64,
    the memory's reply held fixed: u is a stop-gradient weight), batch of 2 and 6, logits far apart."""
    from workers.losses.gamma import _DiagonalGamma, _diagonal_mask

    g = torch.Generator().manual_seed(4)
    for B in (2, 6):
        i2t = (torch.randn(B, B, generator=g, dtype=torch.float64) * 8).requires_grad_()
        add, log_count, _, _ = _diagonal_mask(B, B, 0, include_positive, i2t.device, i2t.dtype)
        seen = []
        _DiagonalGamma.apply(i2t.detach(), add, log_count, lambda log_zhat: seen.append(log_zhat) or log_zhat)
        log_r = seen[0] + torch.randn(2, B, generator=g, dtype=torch.float64)  # a memory near the batch's value

        def objective(x):
            return _DiagonalGamma.apply(x, add, log_count, lambda log_zhat: log_r)[0]

        assert torch.autograd.gradcheck(objective, (i2t,), eps=1e-6, atol=1e-7)


def test_the_step_marks_a_batch_of_distinct_indices_from_the_host_array():
    """Lockstep (the loops' walk over a stream) tells the loss, from the host array before the copy,
    whether a batch's sample indices are all different; a batch with a duplicate is not marked."""
    import numpy as np

    from gammaray.schema import BatchKeys as K
    from pipelines.stream import StreamBatch
    from workers.batches import Lockstep, distinct_indices

    assert distinct_indices(np.array([3, 1, 2])) and distinct_indices(np.array([7])) and distinct_indices(np.array([]))
    assert not distinct_indices(np.array([3, 1, 3]))
    stream = [StreamBatch({K.SAMPLE_INDEX: np.array(ix, dtype=np.int64)}, 0, []) for ix in ([0, 1, 2], [4, 5, 4])]
    flags = [t[K.SAMPLE_INDEX_DISTINCT] for _, t, _, _ in Lockstep(iter(stream), torch.device("cpu"))]
    assert flags == [True, False]
