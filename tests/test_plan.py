"""The epoch plan behind resumable streaming: every record exactly once per epoch, positions that
survive resume and a change of worker count."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pipelines.stream import Segment, Unit, advance, epoch_plan, reshard, split_sequence

pytestmark = pytest.mark.foundation


def records(parts):
    return [(s.unit, r) for p in parts for s in p for r in range(s.start, s.stop)]


units_st = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12)


@given(units_st, st.integers(1, 6), st.integers(0, 3), st.booleans())
@settings(max_examples=200, deadline=None)
def test_plan_covers_every_record_once_and_balances(sizes, world, epoch, shuffle):
    units = [Unit(f"s{i}", 0, n) for i, n in enumerate(sizes)]
    parts = epoch_plan(units, epoch, seed=1, world_size=world, shuffle=shuffle)
    got = records(parts)
    assert sorted(got) == sorted((u, r) for u, n in enumerate(sizes) for r in range(n))
    lens = [sum(s.size for s in p) for p in parts]
    assert max(lens) - min(lens) <= 1


@given(units_st, st.integers(1, 5), st.integers(1, 5), st.data())
@settings(max_examples=200, deadline=None)
def test_resume_and_reshard_skip_exactly_the_consumed_records(sizes, w_old, w_new, data):
    units = [Unit(f"s{i}", 0, n) for i, n in enumerate(sizes)]
    parts = epoch_plan(units, 0, seed=2, world_size=w_old, shuffle=True)
    consumed = [data.draw(st.integers(0, sum(s.size for s in p))) for p in parts]
    done = [rec for p, k in zip(parts, consumed) for rec in records([p])[:k]]
    remaining = [advance(p, k) for p, k in zip(parts, consumed)]
    new_parts = reshard(remaining, w_new)
    rest = records(new_parts)
    assert len(new_parts) == w_new
    assert sorted(done + rest) == sorted(records(parts))
    assert not set(done) & set(rest)


def test_plan_is_deterministic_and_changes_with_epoch():
    units = [Unit(f"s{i}", g, 32) for i in range(3) for g in range(4)]
    a = epoch_plan(units, 0, seed=0, world_size=2, shuffle=True)
    assert a == epoch_plan(units, 0, seed=0, world_size=2, shuffle=True)
    assert a != epoch_plan(units, 1, seed=0, world_size=2, shuffle=True)


def test_split_of_empty_sequence():
    assert split_sequence([], 3) == [[], [], []]
    assert split_sequence([Segment(0, 0, 1)], 2) == [[], [Segment(0, 0, 1)]]
