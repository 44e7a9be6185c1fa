"""The product_ids prepare has to know, held as 64-bit hashes: no set of id strings in memory.

A catalogue of N records costs about 25 bytes a record here (hash, place, row hash, a seen flag),
against about 150 bytes of a Python string set. An id is compared as a string only where its hash
matches: the string of the record it may be is read back from where it lives (the catalogue's
per-shard id files, this run's shards, or the shard buffer not yet written), so a hash collision
can never make two products one.

Records are numbered by their place in the catalogue (the order of its shards, then this run's
writes): places 0..K-1 are the catalogue's, K.. this run's.
"""

from __future__ import annotations

import hashlib
import threading
from bisect import bisect_right
from collections import OrderedDict
from typing import Callable

import numpy as np

CACHE_IDS = 1 << 16  # id strings of shards kept for the exact comparisons (at least one shard)
_MERGE_AT = 1 << 15  # this run's pending hashes merged into a sorted array past this many


def id_hash(product_id: str) -> int:
    """A signed 64-bit hash of a product_id (blake2b)."""
    digest = hashlib.blake2b(product_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class IdTable:
    """product_id -> place, for the catalogue's records (`known`) and those this run writes (`add`).

    `shard_ids(s)` gives the ids of shard s in row order (s counts the catalogue's shards, then this
    run's); `hash_fn` is the 64-bit hash (a parameter so that tests can force collisions)."""

    def __init__(self, shard_ids: Callable[[int], list[str]], hash_fn: Callable[[str], int] = id_hash):
        self.hash_fn = hash_fn
        self._shard_ids = shard_ids
        self._lock = threading.Lock()  # validation threads ask `is_known` while the driver adds
        self._starts: list[int] = [0]  # first place of each shard, then the end
        self._cache: OrderedDict[int, list[str]] = OrderedDict()
        self._cached = 0
        self.num_known = 0
        self._known_hash = np.empty(0, np.int64)   # sorted
        self._known_place = np.empty(0, np.int64)  # the place of each sorted hash
        self.row_hash = np.empty(0, np.int64)      # by place: what the source row said when prepared
        self.has_row_hash = np.empty(0, bool)      # False: the shard predates row hashes
        self.seen = np.empty(0, bool)              # by place: met in the source by this run
        self._new_hash = np.empty(0, np.int64)     # this run's, merged and sorted
        self._new_place = np.empty(0, np.int64)
        self._pending: dict[int, int | list[int]] = {}  # this run's, not merged yet
        self.num_new = 0
        self._buffer: list[str] = []  # ids added since the last `shard_done` (not in a shard yet)

    # building ---------------------------------------------------------------------------------

    def load_known(self, shards: list[tuple[list[str], list[int | None]]]) -> None:
        """The catalogue: per shard (in manifest order), its ids and their row hashes."""
        hashes, rows, has = [], [], []
        for ids, row_hashes in shards:
            hashes.append(np.fromiter((self.hash_fn(p) for p in ids), np.int64, len(ids)))
            rows.append(np.fromiter((0 if h is None else h for h in row_hashes), np.int64, len(ids)))
            has.append(np.fromiter((h is not None for h in row_hashes), bool, len(ids)))
            self._starts.append(self._starts[-1] + len(ids))
        h = np.concatenate(hashes) if hashes else np.empty(0, np.int64)
        order = np.argsort(h, kind="stable")
        self._known_hash, self._known_place = h[order], order.astype(np.int64)
        self.row_hash = np.concatenate(rows) if rows else np.empty(0, np.int64)
        self.has_row_hash = np.concatenate(has) if has else np.empty(0, bool)
        self.num_known = len(h)
        self.seen = np.zeros(len(h), bool)

    def known_filter(self) -> "IdFilter":
        """A Bloom filter of the catalogue's ids. Only a hint (where `hash_fn` is not `id_hash`, a
        test's, it hints wrong): every decision is still made here, exactly."""
        return IdFilter.of(self._known_hash)

    def add(self, product_id: str) -> int:
        """A record this run writes (in write order); returns its place."""
        place = self.num_known + self.num_new
        h = self.hash_fn(product_id)
        with self._lock:
            old = self._pending.get(h)
            self._pending[h] = place if old is None else ([old] if isinstance(old, int) else old) + [place]
            self.num_new += 1
            self._buffer.append(product_id)
            if len(self._pending) >= _MERGE_AT:
                self._merge()
        return place

    def shard_done(self) -> None:
        """The ids added since the last call are one shard of this run (its ids stay cached)."""
        with self._lock:
            shard = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._buffer))
            self._remember(shard, self._buffer)
            self._buffer = []

    def _merge(self) -> None:
        places = [p for v in self._pending.values() for p in ([v] if isinstance(v, int) else v)]
        hashes = [h for h, v in self._pending.items() for _ in ([v] if isinstance(v, int) else v)]
        h = np.concatenate([self._new_hash, np.asarray(hashes, np.int64)])
        p = np.concatenate([self._new_place, np.asarray(places, np.int64)])
        order = np.argsort(h, kind="stable")
        self._new_hash, self._new_place = h[order], p[order]
        self._pending = {}

    # asking -------------------------------------------------------------------------------------

    def place(self, product_id: str) -> int | None:
        """The place of the record with this product_id (catalogue or this run), None if there is none."""
        with self._lock:
            h = self.hash_fn(product_id)
            for place in self._candidates(h, new=True):
                if self._id_at(place) == product_id:
                    return place
            return None

    def known_place(self, product_id: str | None) -> int | None:
        """The place of the catalogue's record with this product_id (this run's not looked at)."""
        if product_id is None or not self.num_known:
            return None
        with self._lock:
            for place in self._candidates(self.hash_fn(product_id), new=False):
                if self._id_at(place) == product_id:
                    return place
            return None

    def is_known(self, product_id: str | None) -> bool:
        return self.known_place(product_id) is not None

    __contains__ = is_known  # `pid in table`: the catalogue's records (validate_raw's known_ids)

    def is_new(self, product_id: str) -> bool:
        place = self.place(product_id)
        return place is not None and place >= self.num_known

    def _candidates(self, h: int, new: bool) -> list[int]:
        out = _equal_range(self._known_hash, self._known_place, h)
        if new:
            out += _equal_range(self._new_hash, self._new_place, h)
            v = self._pending.get(h)
            if v is not None:
                out += [v] if isinstance(v, int) else v
        return out

    def _id_at(self, place: int) -> str:
        buffered = place - self._starts[-1]
        if buffered >= 0:
            return self._buffer[buffered]
        shard = bisect_right(self._starts, place) - 1
        ids = self._cache.get(shard)
        if ids is None:
            ids = self._shard_ids(shard)
            self._remember(shard, ids)
        else:
            self._cache.move_to_end(shard)
        return ids[place - self._starts[shard]]

    def _remember(self, shard: int, ids: list[str]) -> None:
        self._cache[shard] = ids
        self._cached += len(ids)
        while self._cached > CACHE_IDS and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached -= len(dropped)


def _equal_range(sorted_hashes: np.ndarray, places: np.ndarray, h: int) -> list[int]:
    lo = int(np.searchsorted(sorted_hashes, h, "left"))
    if lo == len(sorted_hashes) or sorted_hashes[lo] != h:
        return []
    hi = int(np.searchsorted(sorted_hashes, h, "right"))
    return places[lo:hi].tolist()


class IdFilter:
    """A Bloom filter of the catalogue's ids (16 bits an id, 4 probes: about 0.25% false positives),
    for Ray tasks that must not hold the ids: a row it rules out is not catalogued; a row it lets
    through gets the cheap checks only (its images unread) and the driver decides it exactly."""

    PROBES = 4

    def __init__(self, bits: np.ndarray):
        self.bits = bits  # uint8, a power-of-two number of bits

    @classmethod
    def of(cls, hashes: np.ndarray) -> "IdFilter":
        m = 1 << max(6, int(np.ceil(np.log2(max(1, len(hashes)) * 16))))
        bits = np.zeros(m // 8, np.uint8)
        for idx in cls._probes(hashes.astype(np.int64).view(np.uint64), m):
            np.bitwise_or.at(bits, idx >> 3, (1 << (idx & 7)).astype(np.uint8))
        return cls(bits)

    @classmethod
    def _probes(cls, h: np.ndarray, m: int):
        h1, h2 = h & np.uint64(0xFFFFFFFF), (h >> np.uint64(32)) | np.uint64(1)
        for i in range(cls.PROBES):
            yield ((h1 + np.uint64(i) * h2) & np.uint64(m - 1)).astype(np.int64)

    def might_contain(self, product_id: str | None) -> bool:
        if product_id is None:
            return False
        h = id_hash(product_id) & 0xFFFFFFFFFFFFFFFF
        h1, h2, m = h & 0xFFFFFFFF, (h >> 32) | 1, len(self.bits) * 8
        for i in range(self.PROBES):
            idx = (h1 + i * h2) & (m - 1)
            if not self.bits[idx >> 3] & (1 << (idx & 7)):
                return False
        return True
