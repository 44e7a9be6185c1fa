"""The epoch plan behind resumable streaming: every record exactly once per epoch, positions that
survive resume and a change of worker count."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pipelines.plan import UnitTable, epoch_part, unit_order
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


@given(units_st, st.integers(1, 6), st.integers(0, 3), st.booleans())
@settings(max_examples=200, deadline=None)
def test_a_workers_own_part_is_its_slice_of_the_whole_plan(sizes, world, epoch, shuffle):
    """epoch_part (what a worker computes: only its own range) equals the full plan's slice, and
    the full plan is still the order of every earlier release (unit order cut by split_sequence)."""
    units = [Unit(f"s{i % 3}", i // 3, n) for i, n in enumerate(sizes)]
    table = UnitTable.from_units(units)
    whole = epoch_plan(units, epoch, seed=3, world_size=world, shuffle=shuffle)
    legacy = split_sequence([Segment(u, 0, sizes[u]) for u in unit_order(units, epoch, 3, shuffle).tolist()], world)
    assert whole == legacy
    for rank in range(world):
        assert epoch_part(table, epoch, 3, world, rank, shuffle) == whole[rank]


def test_unit_table_from_row_groups_matches_the_units():
    table = UnitTable.from_row_groups(["a", "b", "c"], [[3, 3], [], [5, 1, 2]])
    assert list(table) == [Unit("a", 0, 3, 0), Unit("a", 1, 3, 3), Unit("c", 0, 5, 0), Unit("c", 1, 1, 5),
                           Unit("c", 2, 2, 6)]
    assert table == UnitTable.from_units(list(table)) and table.total_rows == 14 and len(table) == 5
    import pickle
    assert pickle.loads(pickle.dumps(table)) == table
