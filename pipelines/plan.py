"""The epoch plan: which rows of the catalogue each worker reads, in which order, in every epoch.

The catalogue's row groups (*units*) are put in a seeded order, rows are permuted within each unit
(lazily, in the read task: `row_permutation`), and the resulting sequence is cut into one contiguous
part per worker whose sizes differ by at most one record. A worker's data position is one number:
records of its part consumed.

What this costs per worker does not grow with the catalogue beyond a few numpy vectors: the units
are a `UnitTable` (numpy columns, one entry per row group: about 30 bytes each), the order is one
numpy permutation, and `epoch_part` builds `Segment` objects only for the worker's own range
(found by a binary search over the cumulative sizes), never for the whole epoch. At 10^8 records in
row groups of 128 that is 7.8 x 10^5 units: about 25 MB of vectors and a few tens of milliseconds.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the smallest unit of shuffling and reading."""

    shard: str        # path relative to the catalogue root
    row_group: int
    num_rows: int
    first_row: int = 0  # row of the shard where this row group starts


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a unit, in the unit's permuted row order for the epoch."""

    unit: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class UnitTable:
    """Every unit of a catalogue as numpy columns; `table[i]` is the `Unit` with id i (built on demand).

    Shard paths are stored once per shard (`shards`), units point at them by index, so the table is
    a few vectors whatever the catalogue's size; it pickles as those vectors."""

    __slots__ = ("shards", "shard_of", "row_group", "num_rows", "first_row", "_total")

    def __init__(self, shards: Sequence[str], shard_of: np.ndarray, row_group: np.ndarray, num_rows: np.ndarray,
                 first_row: np.ndarray):
        self.shards = list(shards)
        self.shard_of = np.asarray(shard_of, dtype=np.int32 if len(self.shards) < 2**31 else np.int64)
        self.row_group = np.asarray(row_group, dtype=np.int32)
        self.num_rows = np.asarray(num_rows, dtype=np.int64)
        self.first_row = np.asarray(first_row, dtype=np.int64)
        self._total: int | None = None

    @classmethod
    def from_row_groups(cls, paths: Sequence[str], row_groups: Sequence[Sequence[int]]) -> "UnitTable":
        """From each shard's path and the row counts of its row groups (the manifest's shape)."""
        counts = np.fromiter((len(g) for g in row_groups), dtype=np.int64, count=len(row_groups))
        sizes = np.fromiter((n for g in row_groups for n in g), dtype=np.int64, count=int(counts.sum()))
        return cls.from_flat(paths, counts, sizes)

    @classmethod
    def from_flat(cls, paths: Sequence[str], groups_per_shard: np.ndarray, sizes: np.ndarray) -> "UnitTable":
        """From flat vectors: row groups per shard, and the rows of every row group in shard order."""
        groups_per_shard = np.asarray(groups_per_shard, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        shard_of = np.repeat(np.arange(len(groups_per_shard), dtype=np.int32), groups_per_shard)
        if not len(sizes):
            return cls(paths, shard_of, np.zeros(0, np.int32), sizes, np.zeros(0, np.int64))
        shard_start = np.concatenate([[0], np.cumsum(groups_per_shard)[:-1]])
        start_of_unit = shard_start[shard_of]
        row_group = (np.arange(len(sizes), dtype=np.int64) - start_of_unit).astype(np.int32)
        # rows of the shard before each row group: a cumulative sum that restarts at every shard
        first_row = np.cumsum(sizes)
        first_row -= sizes
        first_row -= first_row[start_of_unit]
        return cls(paths, shard_of, row_group, sizes, first_row)

    @classmethod
    def from_units(cls, units: Iterable[Unit]) -> "UnitTable":
        units = list(units)
        index: dict[str, int] = {}
        shard_of = [index.setdefault(u.shard, len(index)) for u in units]
        return cls(list(index), np.array(shard_of, np.int64), np.array([u.row_group for u in units], np.int32),
                   np.array([u.num_rows for u in units], np.int64), np.array([u.first_row for u in units], np.int64))

    def __len__(self) -> int:
        return len(self.num_rows)

    def __getitem__(self, i: int) -> Unit:
        i = int(i)
        return Unit(self.shards[int(self.shard_of[i])], int(self.row_group[i]), int(self.num_rows[i]),
                    int(self.first_row[i]))

    def __iter__(self) -> Iterator[Unit]:
        return (self[i] for i in range(len(self)))

    @property
    def total_rows(self) -> int:
        if self._total is None:
            self._total = int(self.num_rows.sum())
        return self._total

    @property
    def nbytes(self) -> int:
        return (self.shard_of.nbytes + self.row_group.nbytes + self.num_rows.nbytes + self.first_row.nbytes
                + sum(len(s) + 50 for s in self.shards))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, UnitTable):
            return NotImplemented
        if not (len(self) == len(other) and np.array_equal(self.row_group, other.row_group)
                and np.array_equal(self.num_rows, other.num_rows) and np.array_equal(self.first_row, other.first_row)):
            return False
        if self.shards == other.shards:
            return np.array_equal(self.shard_of, other.shard_of)
        # the same units may name their shards through different lists (a shard without row groups)
        return bool(np.array_equal(np.asarray(self.shards, dtype=object)[self.shard_of],
                                   np.asarray(other.shards, dtype=object)[other.shard_of]))

    def __hash__(self) -> int:
        return hash((len(self), self.total_rows, self.shards[0] if self.shards else ""))

    def __getstate__(self):
        return (self.shards, self.shard_of, self.row_group, self.num_rows, self.first_row)

    def __setstate__(self, state) -> None:
        self.shards, self.shard_of, self.row_group, self.num_rows, self.first_row = state
        self._total = None

    def __repr__(self) -> str:
        return f"UnitTable({len(self)} units, {len(self.shards)} shards, {self.total_rows} rows)"


def as_unit_table(units) -> UnitTable:
    return units if isinstance(units, UnitTable) else UnitTable.from_units(units)


def total_rows(units) -> int:
    return units.total_rows if isinstance(units, UnitTable) else sum(u.num_rows for u in units)


def unit_order(units, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The epoch's order of unit ids: one seeded numpy permutation (the same order since the first
    release: `rng.shuffle(arange(n))`, so checkpoints of earlier versions resume on the same data)."""
    order = np.arange(len(units))
    if shuffle:
        np.random.default_rng([seed, epoch, 7]).shuffle(order)
    return order


def row_permutation(unit: int, num_rows: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch, 11, unit]).permutation(num_rows)


def _cut(order: np.ndarray, sizes: np.ndarray, lo: int, hi: int) -> list[Segment]:
    """The segments of records [lo, hi) of the sequence `order` (unit ids) whose sizes are `sizes`."""
    if hi <= lo:
        return []
    ends = np.cumsum(sizes)
    starts = ends - sizes
    i0 = int(np.searchsorted(ends, lo, side="right"))   # first unit that ends after lo
    i1 = int(np.searchsorted(starts, hi, side="left"))  # first unit that starts at or after hi
    s, e = starts[i0:i1], ends[i0:i1]
    a, b = np.maximum(s, lo) - s, np.minimum(e, hi) - s
    keep = b > a
    return [Segment(u, x, y) for u, x, y in zip(order[i0:i1][keep].tolist(), a[keep].tolist(), b[keep].tolist())]


def epoch_part(units, epoch: int, seed: int, world_size: int, rank: int, shuffle: bool) -> list[Segment]:
    """One worker's part of the epoch: `epoch_plan(...)[rank]`, without building the other parts."""
    table = as_unit_table(units)
    order = unit_order(table, epoch, seed, shuffle)
    sizes = table.num_rows[order]
    total = int(sizes.sum())
    return _cut(order, sizes, total * rank // world_size, total * (rank + 1) // world_size)


def epoch_plan(units, epoch: int, seed: int, world_size: int, shuffle: bool) -> list[list[Segment]]:
    """Every worker's part (tests, tools); a worker calls `epoch_part` for its own."""
    table = as_unit_table(units)
    order = unit_order(table, epoch, seed, shuffle)
    sizes = table.num_rows[order]
    total = int(sizes.sum())
    return [_cut(order, sizes, total * r // world_size, total * (r + 1) // world_size) for r in range(world_size)]


def split_sequence(segments: list[Segment], world_size: int) -> list[list[Segment]]:
    """Cut a sequence of segments into world_size contiguous parts whose sizes differ by at most 1."""
    total = sum(s.size for s in segments)
    bounds = [total * r // world_size for r in range(world_size + 1)]
    parts: list[list[Segment]] = [[] for _ in range(world_size)]
    pos = 0
    for seg in segments:
        s0, s1 = pos, pos + seg.size
        r = max(0, bisect.bisect_right(bounds, s0) - 1)
        while r < world_size and bounds[r] < s1:
            lo, hi = max(s0, bounds[r]), min(s1, bounds[r + 1])
            if hi > lo:
                parts[r].append(Segment(seg.unit, seg.start + lo - pos, seg.start + hi - pos))
            r += 1
        pos = s1
    return parts


def advance(part: list[Segment], consumed: int) -> list[Segment]:
    """The part with its first `consumed` records removed."""
    out = []
    for seg in part:
        if consumed >= seg.size:
            consumed -= seg.size
            continue
        out.append(Segment(seg.unit, seg.start + consumed, seg.stop))
        consumed = 0
    return out


def reshard(remaining: list[list[Segment]], world_size: int) -> list[list[Segment]]:
    """Re-cut the unconsumed parts of an old worker set for a new worker count (order preserved)."""
    return split_sequence([s for part in remaining for s in part], world_size)


def part_to_json(part: list[Segment]) -> list[list[int]]:
    return [[s.unit, s.start, s.stop] for s in part]


def part_from_json(obj: list[list[int]]) -> list[Segment]:
    return [Segment(int(u), int(a), int(b)) for u, a, b in obj]
