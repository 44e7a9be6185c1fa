"""The product_ids prepare has to know, split by a 64-bit hash into P partitions, each held by its owner.

Partition j holds the ids whose hash (blake2b, 64 bits) falls in the j-th of P equal hash ranges:
their hashes in memory (about 34 bytes a record: hash, number, spill offset, row hash, two flags),
their strings in an unlinked temporary file of the owner (`SpilledIds`). An id is compared as a
string only where its hash matches, so a hash collision can never make two products one.

With Ray the owners are P long-lived actors (pipelines/prepare_parallel.py) and the driver holds
no id at all: it routes each record to its partition (`PartitionedIds`) and asks, one call per
batch per partition, in source order, what the record is (`IdPartition.decide`): already in the
catalogue (or changed at its source), met again, new, or a duplicate. An owner answers its calls
in the order they were sent, so first-seen-wins holds across batches sent before the answers
come back. In one process (`--cpus 1`, small sources) one local partition of the same class does
the same.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Callable

import numpy as np

SPILL_BYTES = 1 << 20  # id strings buffered in memory before they are appended to the spill file
_MERGE_AT = 1 << 15    # this run's pending hashes merged into a sorted array past this many

# what `IdPartition.decide` answers for a record
ALREADY = 0    # in the catalogue, met for the first time in this source
CHANGED = 1    # ... and its source row differs from the one prepared (kept as first prepared)
AGAIN = 2      # in the catalogue, met before in this source
NOT_KNOWN = 3  # not in the catalogue, and not to be added (asked as a catalogued one)
NEW = 4        # added by this run
DUPLICATE = 5  # added earlier in this run (or catalogued): a duplicate


def id_hash(product_id: str) -> int:
    """A signed 64-bit hash of a product_id (blake2b)."""
    digest = hashlib.blake2b(product_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def partition_bounds(count: int) -> list[int]:
    """The first hash of partitions 1..count-1: P equal ranges of the signed 64-bit hashes."""
    return [-(1 << 63) + (j << 64) // count for j in range(1, count)]


def hash_range(index: int, count: int) -> tuple[int, int]:
    """[lo, hi) of partition `index` of `count`."""
    bounds = [-(1 << 63)] + partition_bounds(count) + [1 << 63]
    return bounds[index], bounds[index + 1]


class SpilledIds:
    """Strings by number (0, 1, ...), in an unlinked temporary file: 8 bytes of memory each (its end
    offset), the string read back only for an exact comparison."""

    def __init__(self):
        fd, path = tempfile.mkstemp(prefix="gammaray-ids-")
        os.unlink(path)  # gone with the process, however it ends
        self._fd = fd
        self._ends = np.zeros(1024, np.int64)
        self.count = 0
        self._flushed = 0           # strings 0.._flushed-1 are in the file
        self._tail: list[bytes] = []
        self._tail_bytes = 0

    def extend(self, ids: list[str]) -> None:
        encoded = [s.encode("utf-8", "surrogatepass") for s in ids]
        lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
        n = self.count + len(encoded)
        if n > len(self._ends):
            self._ends = np.resize(self._ends, max(n, 2 * len(self._ends)))
        base = self._ends[self.count - 1] if self.count else 0
        self._ends[self.count:n] = base + np.cumsum(lengths)
        self.count = n
        self._tail += encoded
        self._tail_bytes += int(lengths.sum())
        if self._tail_bytes >= SPILL_BYTES:
            self._flush()

    def _flush(self) -> None:
        start = int(self._ends[self._flushed - 1]) if self._flushed else 0
        os.pwrite(self._fd, b"".join(self._tail), start)
        self._flushed, self._tail, self._tail_bytes = self.count, [], 0

    def __getitem__(self, i: int) -> str:
        if i >= self._flushed:
            return self._tail[i - self._flushed].decode("utf-8", "surrogatepass")
        start = int(self._ends[i - 1]) if i else 0
        return os.pread(self._fd, int(self._ends[i]) - start, start).decode("utf-8", "surrogatepass")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


class IdPartition:
    """The ids of one hash range: the catalogue's (`load`, then `finish_load`) and those this run
    adds (`decide`). Entries are numbered in the order they came (the catalogue's first); `hash_fn`
    is the 64-bit hash (a parameter so that tests can force collisions)."""

    def __init__(self, index: int = 0, count: int = 1, hash_fn: Callable[[str], int] = id_hash):
        self.index, self.count, self.hash_fn = index, count, hash_fn
        self.lo, self.hi = hash_range(index, count)
        self._ids = SpilledIds()
        self._loading: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.num_known = 0
        self._known_hash = np.empty(0, np.int64)  # sorted
        self._known_num = np.empty(0, np.int64)   # the entry of each sorted hash
        self._row_hash = np.empty(0, np.int64)    # by entry: what the source row said when prepared
        self._has_row_hash = np.empty(0, bool)    # False: the shard predates row hashes
        self._seen = np.empty(0, bool)            # by entry: met in the source by this run
        self._new_hash = np.empty(0, np.int64)    # this run's, merged and sorted
        self._new_num = np.empty(0, np.int64)
        self._pending: dict[int, int | list[int]] = {}  # this run's, not merged yet
        self.num_new = 0

    # the catalogue ------------------------------------------------------------------------------

    def load(self, hashes: np.ndarray, ids: list[str], row_hash: np.ndarray, has_row_hash: np.ndarray) -> int:
        """Catalogued ids of this partition (any order; before the first `decide`)."""
        if len(hashes) and (int(hashes.min()) < self.lo or int(hashes.max()) >= self.hi):
            raise ValueError(f"id partition {self.index} of {self.count} was given a hash outside its range")
        self._ids.extend(ids)
        self._loading.append((np.asarray(hashes, np.int64), np.asarray(row_hash, np.int64),
                              np.asarray(has_row_hash, bool)))
        return len(ids)

    def load_scanned(self, part: tuple) -> int:
        """`load` of one part of what `scan_shards` returns (as Ray hands an object over: one argument)."""
        return self.load(*part)

    def finish_load(self) -> int:
        if self._loading:
            h, rows, has = (np.concatenate(a) for a in zip(*self._loading))
            self._loading = []
            order = np.argsort(h, kind="stable")
            self._known_hash, self._known_num = h[order], order.astype(np.int64)
            self._row_hash, self._has_row_hash = rows, has
            self.num_known = len(h)
            self._seen = np.zeros(len(h), bool)
        return self.num_known

    # asking ---------------------------------------------------------------------------------------

    def known(self, hashes: np.ndarray, ids: list[str]) -> np.ndarray:
        """Whether each id is in the catalogue (this run's additions not looked at)."""
        out = np.zeros(len(ids), bool)
        for i in self._hash_matches(self._known_hash, hashes):
            out[i] = self._known_entry(int(hashes[i]), ids[i]) >= 0
        return out

    def is_known(self, product_id: str | None) -> bool:
        return product_id is not None and self._known_entry(self.hash_fn(product_id), product_id) >= 0

    def decide(self, hashes: np.ndarray, ids: list[str], add: np.ndarray, row_hash: np.ndarray,
               has_row_hash: np.ndarray) -> np.ndarray:
        """What each record is, in order (the codes above). A catalogued id is marked met; one that
        is not is added where `add` says the record is valid, unless this run added it already."""
        out = np.empty(len(ids), np.int8)
        maybe_known = np.zeros(len(ids), bool)
        maybe_known[self._hash_matches(self._known_hash, hashes)] = True
        maybe_new = np.zeros(len(ids), bool)
        maybe_new[self._hash_matches(self._new_hash, hashes)] = True
        for i, pid in enumerate(ids):
            h = int(hashes[i])
            k = self._known_entry(h, pid) if maybe_known[i] else -1
            if k >= 0:
                if self._seen[k]:
                    out[i] = AGAIN
                    continue
                self._seen[k] = True
                out[i] = CHANGED if (self._has_row_hash[k] and has_row_hash[i]
                                     and int(self._row_hash[k]) != int(row_hash[i])) else ALREADY
            elif not add[i]:
                out[i] = NOT_KNOWN
            elif self._new_entry(h, pid, maybe_new[i]) >= 0:
                out[i] = DUPLICATE
            else:
                self._add(h, pid)
                out[i] = NEW
        if len(self._pending) >= _MERGE_AT:
            self._merge()
        return out

    def is_new(self, hashes: np.ndarray, ids: list[str]) -> np.ndarray:
        """Whether each id was added by this run."""
        maybe_new = np.zeros(len(ids), bool)
        maybe_new[self._hash_matches(self._new_hash, hashes)] = True
        return np.fromiter((self._new_entry(int(h), pid, m) >= 0 for h, pid, m in zip(hashes, ids, maybe_new)),
                           bool, len(ids))

    def stats(self) -> dict[str, Any]:
        """What this partition holds (the tests check that every id is in its owner's range)."""
        hashes = np.concatenate([self._known_hash, self._new_hash, np.fromiter(self._pending, np.int64)])
        return {"index": self.index, "count": self.count, "lo": self.lo, "hi": self.hi, "num_known": self.num_known,
                "num_new": self.num_new, "min_hash": int(hashes.min()) if len(hashes) else None,
                "max_hash": int(hashes.max()) if len(hashes) else None, "process": os.getpid()}

    def close(self) -> None:
        self._ids.close()

    # inside -----------------------------------------------------------------------------------------

    @staticmethod
    def _hash_matches(sorted_hashes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Positions i of `hashes` whose hash is in `sorted_hashes`."""
        if not len(sorted_hashes) or not len(hashes):
            return np.empty(0, np.int64)
        pos = np.minimum(np.searchsorted(sorted_hashes, hashes), len(sorted_hashes) - 1)
        return np.flatnonzero(sorted_hashes[pos] == hashes)

    def _known_entry(self, h: int, pid: str) -> int:
        for k in _equal_range(self._known_hash, self._known_num, h):
            if self._ids[k] == pid:
                return k
        return -1

    def _new_entry(self, h: int, pid: str, maybe_merged: bool = True) -> int:
        candidates = _equal_range(self._new_hash, self._new_num, h) if maybe_merged else []
        v = self._pending.get(h)
        if v is not None:
            candidates += [v] if isinstance(v, int) else v
        for k in candidates:
            if self._ids[k] == pid:
                return k
        return -1

    def _add(self, h: int, pid: str) -> None:
        k = self._ids.count
        self._ids.extend([pid])
        old = self._pending.get(h)
        self._pending[h] = k if old is None else ([old] if isinstance(old, int) else old) + [k]
        self.num_new += 1

    def _merge(self) -> None:
        nums = [k for v in self._pending.values() for k in ([v] if isinstance(v, int) else v)]
        hashes = [h for h, v in self._pending.items() for _ in ([v] if isinstance(v, int) else v)]
        h = np.concatenate([self._new_hash, np.asarray(hashes, np.int64)])
        k = np.concatenate([self._new_num, np.asarray(nums, np.int64)])
        order = np.argsort(h, kind="stable")
        self._new_hash, self._new_num = h[order], k[order]
        self._pending = {}


def _equal_range(sorted_hashes: np.ndarray, nums: np.ndarray, h: int) -> list[int]:
    lo = int(np.searchsorted(sorted_hashes, h, "left"))
    if lo == len(sorted_hashes) or sorted_hashes[lo] != h:
        return []
    hi = int(np.searchsorted(sorted_hashes, h, "right"))
    return nums[lo:hi].tolist()


class PartitionedIds:
    """The driver's (and the chunk tasks') side of the partitions: each id routed to its owner by
    its hash, one call per partition per batch. `owners` are Ray actor handles (`remote`) or local
    `IdPartition`s; this object holds no id."""

    def __init__(self, owners: list, hash_fn: Callable[[str], int] = id_hash, remote: bool = False):
        self.owners, self.hash_fn, self.remote = owners, hash_fn, remote
        self.bounds = np.asarray(partition_bounds(len(owners)), np.int64)
        self.num_known = 0  # set once the owners have loaded the catalogue

    def route(self, ids: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(the hash of each id, the positions of the ids of each partition)."""
        hashes = np.fromiter((self.hash_fn(p) for p in ids), np.int64, len(ids))
        if len(self.owners) == 1:
            return hashes, [np.arange(len(ids))]
        part = np.searchsorted(self.bounds, hashes, "right")
        order = np.argsort(part, kind="stable")
        cuts = np.searchsorted(part[order], np.arange(1, len(self.owners)))
        return hashes, np.split(order, cuts)

    def _call(self, j: int, method: str, *args):
        if self.remote:
            return getattr(self.owners[j], method).remote(*args)
        return getattr(self.owners[j], method)(*args)

    def _get(self, refs: list) -> list:
        if not self.remote:
            return refs
        import ray

        return ray.get(refs)

    def _ask(self, method: str, ids: list[str], dtype, *columns: np.ndarray):
        """Send `method` to each partition with its ids (and their part of each column); returns
        a function that gathers the answers in the order of `ids`."""
        hashes, parts = self.route(ids)
        asked = [(j, pos, self._call(j, method, hashes[pos], [ids[i] for i in pos], *(c[pos] for c in columns)))
                 for j, pos in enumerate(parts) if len(pos)]

        def gather() -> np.ndarray:
            out = np.empty(len(ids), dtype)
            for (_, pos, _), answer in zip(asked, self._get([a for _, _, a in asked])):
                out[pos] = answer
            return out
        return gather

    def known(self, ids: list[str]) -> np.ndarray:
        return self._ask("known", ids, bool)()

    def __contains__(self, product_id: str | None) -> bool:
        """`pid in ids`: in the catalogue (validate_raw's known_ids, in one process)."""
        if product_id is None or not self.num_known:
            return False
        if not self.remote and len(self.owners) == 1:
            return self.owners[0].is_known(product_id)
        return bool(self.known([product_id])[0])

    def decide(self, ids: list[str], add: np.ndarray, row_hash: np.ndarray, has_row_hash: np.ndarray):
        """Sent now (in order), gathered by calling what this returns."""
        return self._ask("decide", ids, np.int8, add, row_hash, has_row_hash)

    def is_new(self, ids: list[str]) -> np.ndarray:
        return self._ask("is_new", ids, bool)()

    def stats(self) -> list[dict]:
        return self._get([self._call(j, "stats") for j in range(len(self.owners))])

    def close(self) -> None:
        if self.remote:
            import ray

            for owner in self.owners:
                ray.kill(owner)
        else:
            for owner in self.owners:
                owner.close()
        self.owners = []

