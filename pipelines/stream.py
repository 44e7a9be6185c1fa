"""Streaming a prepared catalogue into training workers with Ray Data, resumably.

Why not `streaming_split`: it hands blocks to whichever consumer asks first, so which worker sees
which record is not reproducible and a mid-epoch position cannot be saved (ray #48224). Instead each
epoch has a *plan*: the catalogue's row groups in a seeded order, rows permuted within each row group,
the resulting sequence cut into one contiguous part per worker. A worker streams its part through its
own Ray Data pipeline (read row group from object storage -> decode/augment/tokenize in CPU tasks,
order preserved) and its data position is one number: records of its part consumed. The remaining
parts of all workers can be re-cut for a different worker count.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.schema import RECORD_SCHEMA, BatchKeys as K, Reason, SchemaError, check_table_schema, conform_table

from . import storage
from .preprocess import PIXEL_KEYS, PreprocessSpec, normalise, preprocess_batch
from .tokenizer import load_fast as load_tokenizer

MODEL_KEYS = (K.SAMPLE_INDEX, K.PIXELS, K.PIXELS_AUG, K.INPUT_IDS, K.ATTENTION_MASK, K.INPUT_IDS_AUG,
              K.ATTENTION_MASK_AUG, K.PIXELS_PAIR, K.INPUT_IDS_PAIR, K.ATTENTION_MASK_PAIR)
READ_COLUMNS = ["product_id", "sample_index", "title", "description", "category", "image"]


# --------------------------------------------------------------------------------------------
# the epoch plan


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


def units_from_manifest(manifest: dict) -> list[Unit]:
    out = []
    for s in manifest["shards"]:
        first = 0
        for g, n in enumerate(s["row_groups"]):
            out.append(Unit(s["path"], g, n, first))
            first += n
    return out


def unit_order(units: list[Unit], epoch: int, seed: int, shuffle: bool) -> list[int]:
    order = np.arange(len(units))
    if shuffle:
        np.random.default_rng([seed, epoch, 7]).shuffle(order)
    return order.tolist()


def row_permutation(unit: int, num_rows: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch, 11, unit]).permutation(num_rows)


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


def epoch_plan(units: list[Unit], epoch: int, seed: int, world_size: int, shuffle: bool) -> list[list[Segment]]:
    seq = [Segment(u, 0, units[u].num_rows) for u in unit_order(units, epoch, seed, shuffle)]
    return split_sequence(seq, world_size)


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


# --------------------------------------------------------------------------------------------
# reading segments


@functools.lru_cache(maxsize=64)
def _parquet_file(uri: str, settings: storage.S3Settings | None) -> pq.ParquetFile:
    # every read below retries transient errors for storage.retry_time_s (storage.RetryingS3)
    return pq.ParquetFile(storage.open_random_access(uri, settings))


def _bad_rows(uri: str, rows: np.ndarray, reason: str, detail: str, columns: list[str]) -> pa.Table:
    """Stand-ins for records that could not be read: they keep their place in the stream (so the
    data position stays exact) and carry the reason to the quarantine."""
    n = len(rows)
    cols: dict[str, pa.Array] = {}
    for name in columns:
        if name == "sample_index":
            cols[name] = pa.array(np.full(n, -1, dtype=np.int64))
        elif name == "product_id":
            cols[name] = pa.array([""] * n, pa.string())
        else:
            cols[name] = pa.nulls(n, RECORD_SCHEMA.field(name).type)
    cols["source"] = pa.array([uri] * n, pa.string())
    cols["row"] = pa.array(rows, pa.int64())
    cols[K.REJECT] = pa.array([reason] * n, pa.string())
    cols[K.DETAIL] = pa.array([detail[:300]] * n, pa.string())
    return pa.table(cols)


def read_segment_rows(catalogue_uri: str, unit: Unit, unit_id: int, start: int, stop: int, epoch: int, seed: int,
                      shuffle: bool, settings: storage.S3Settings | None,
                      columns: list[str] | None = None) -> pa.Table:
    """Rows [start, stop) of the unit's permuted order, with `source`, `row` and reject columns.

    A shard that is damaged, missing or whose columns are wrong does not raise: its rows come back
    as stand-ins with reason `unreadable_shard` (or the schema problem). An outage is not the
    records' fault: reads retry for storage.retry_time_s and then raise `StorageUnavailable`, as do
    errors that make the whole catalogue unreadable (access denied), instead of quarantining records."""
    columns = columns or READ_COLUMNS
    uri = storage.join(catalogue_uri, unit.shard)
    perm = row_permutation(unit_id, unit.num_rows, epoch, seed, shuffle)[start:stop]
    rows = unit.first_row + perm
    try:
        pf = _parquet_file(uri, settings)
        check_table_schema(pf.schema_arrow, uri, columns)
        table = pf.read_row_group(unit.row_group, columns=[c for c in columns if c in pf.schema_arrow.names])
        if table.num_rows != unit.num_rows:
            raise SchemaError(f"{uri} row group {unit.row_group}: {table.num_rows} rows, manifest says {unit.num_rows}")
        table = conform_table(table, columns).take(pa.array(perm))
    except SchemaError as err:
        _parquet_file.cache_clear()
        reason = Reason.MISSING_COLUMN if "is missing" in str(err) else Reason.WRONG_TYPE
        return _bad_rows(uri, rows, reason, str(err), columns)
    except Exception as err:  # noqa: BLE001 - a damaged shard: every error type pyarrow has
        _parquet_file.cache_clear()
        if storage.is_storage_fault(err):
            raise
        return _bad_rows(uri, rows, Reason.UNREADABLE_SHARD, f"{uri} row group {unit.row_group}: "
                         f"{type(err).__name__}: {err}", columns)
    n = table.num_rows
    return (table.append_column("source", pa.array([uri] * n, pa.string()))
            .append_column("row", pa.array(rows, pa.int64()))
            .append_column(K.REJECT, pa.array([""] * n, pa.string()))
            .append_column(K.DETAIL, pa.array([""] * n, pa.string())))


# --------------------------------------------------------------------------------------------
# the Ray Data pipeline of one part


@dataclass
class StreamBatch:
    arrays: dict[str, np.ndarray]  # good rows only, 0..batch_size of them
    consumed: int                  # records of the part consumed through this batch (good + rejected)
    rejected: list[dict]           # quarantine rows covered by this batch

    @property
    def size(self) -> int:
        return len(self.arrays[K.SAMPLE_INDEX]) if self.arrays else 0


@dataclass(frozen=True)
class StreamSpec:
    catalogue_uri: str
    units: tuple[Unit, ...]
    preprocess: PreprocessSpec
    settings: storage.S3Settings | None
    shuffle: bool
    batch_size: int
    preprocess_num_cpus: float
    prefetch_batches: int
    concurrency: int | None = None
    segments_per_task: int = 1      # segments (row groups) fused into one read+preprocess task


def build_dataset(spec: StreamSpec, part: list[Segment]):
    """The Ray Data pipeline for one worker's part: read -> preprocess, order preserved."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    # Ray Data 2.60 reserves half of the resources per operator (half of that for outputs): with one
    # operator on a small machine that leaves one task running where two fit (measured: 2 cores,
    # concurrency 1 most of the time, about half the machine's throughput). One fused operator has
    # nothing to share resources with, so turn the reservation off.
    ctx.op_resource_reservation_enabled = False
    items = [{"unit": s.unit, "start": s.start, "stop": s.stop} for s in part]
    if not items:
        return None
    cat, units, pp = spec.catalogue_uri, spec.units, spec.preprocess
    settings, shuffle = spec.settings, spec.shuffle
    columns = pp.columns
    # pixels travel as uint8 (a quarter of the bytes; float32 blocks cost Ray Data more to build and
    # move than the decode itself) and are normalised by the consumer, batch by batch
    pp = dataclasses.replace(pp, pixels_uint8=True)

    def read_and_preprocess(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # one fused task per segment (or per `segments_per_task`): reading and decoding in separate
        # operators costs an extra hop through the object store and doubles per-task overhead
        tables = [
            read_segment_rows(cat, units[int(u)], int(u), int(a), int(b), pp.epoch, pp.seed, shuffle, settings,
                              columns)
            for u, a, b in zip(batch["unit"], batch["start"], batch["stop"])
        ]
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
        return preprocess_batch(cols, pp, load_tokenizer(pp.tokenizer_uri, settings))

    k = max(1, spec.segments_per_task)
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // k)))
    compute = ray.data.TaskPoolStrategy(size=spec.concurrency) if spec.concurrency else None
    ds = ds.map_batches(read_and_preprocess, batch_size=k, batch_format="numpy", num_cpus=spec.preprocess_num_cpus,
                        compute=compute)
    return ds


class _Pump:
    """Runs a pipeline in a background thread into a bounded queue: the pipeline starts (worker
    processes, the first tasks) before the consumer asks for its first batch."""

    _END = object()

    def __init__(self, spec: StreamSpec, part: list[Segment]):
        import queue
        self.spec, self.part = spec, list(part)
        self.queue: "queue.Queue" = queue.Queue(maxsize=max(1, spec.prefetch_batches))
        self.stop = threading.Event()
        self.produced_all = threading.Event()
        self.on_produced_all: Any = None
        self.thread = threading.Thread(target=self._run, name="gammaray-stream", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            ds = build_dataset(self.spec, self.part)
            if ds is not None:
                for block in ds.iter_batches(batch_size=None, batch_format="numpy",
                                             prefetch_batches=self.spec.prefetch_batches):
                    if not self._put(block):
                        return
            self.produced_all.set()
            cb = self.on_produced_all
            if cb is not None:
                cb()
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(err)

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        try:
            while True:
                item = self.queue.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()


# --------------------------------------------------------------------------------------------
# pipelines started ahead of their `iterate` (the next epoch's), kept per worker process


class _WarmPipelines:
    """Pipelines started by `prefetch`, waiting for the `iterate` call that takes them over. A lock
    guards them: a pump's thread starts the next epoch's pipeline while the loop's thread may close."""

    def __init__(self) -> None:
        self.pumps: list[_Pump] = []
        self.lock = threading.Lock()

    def add(self, pump: _Pump) -> None:
        with self.lock:
            self.pumps.append(pump)

    def close_all(self) -> None:
        with self.lock:
            while self.pumps:
                self.pumps.pop().close()

    def take(self, spec: StreamSpec, part: list[Segment]) -> _Pump | None:
        """The pipeline for exactly (spec, part), if any. Others stay warm (an evaluation pass
        between two epochs must not cancel the next epoch's start); `prefetch` replaces them."""
        with self.lock:
            for i, pump in enumerate(self.pumps):
                if pump.spec == spec and pump.part == list(part):
                    return self.pumps.pop(i)
        return None


_warm = _WarmPipelines()


def prefetch(spec: StreamSpec, part: list[Segment]) -> None:
    """Start the pipeline for (spec, part) now; the next `iterate(spec, part)` takes it over.
    Used to start the next epoch's pipeline while the current epoch's last batches are trained on."""
    close_prefetched()
    if part:
        _warm.add(_Pump(spec, part))


def close_prefetched() -> None:
    _warm.close_all()


# --------------------------------------------------------------------------------------------
# batches of a part


def iterate(spec: StreamSpec, part: list[Segment], start_consumed: int = 0,
            then: tuple[StreamSpec, list[Segment]] | None = None) -> Iterator[StreamBatch]:
    """Batches of exactly `batch_size` good rows (the last may be smaller), with the data position.

    `part` must already exclude the first `start_consumed` records (see `advance`); positions are
    reported relative to the original part so they can be checkpointed as one number.
    `then=(spec, part)`: as soon as this pipeline has produced its last block, start that one
    (the next epoch) in the background, so its start-up overlaps the training on this epoch's tail.
    """
    if not part:
        if then is not None:
            prefetch(*then)
        return
    pump = _warm.take(spec, part) or _Pump(spec, part)
    if then is not None:
        pump.on_produced_all = lambda: prefetch(*then)
        if pump.produced_all.is_set():
            prefetch(*then)
    B = spec.batch_size
    frags: list[dict[str, np.ndarray]] = []
    have = 0
    consumed = start_consumed
    rejects: list[dict] = []
    model_keys = list(MODEL_KEYS)
    for block in pump.blocks():
        n = len(block[K.SAMPLE_INDEX])
        good = block[K.REJECT] == ""
        pos = 0
        while pos < n:
            cum = np.cumsum(good[pos:])
            hit = int(np.searchsorted(cum, B - have))
            end = pos + hit + 1 if hit < n - pos else n
            sel = np.arange(pos, end)
            for i in sel[~good[pos:end]]:
                rejects.append({"product_id": block[K.PRODUCT_ID][i] or None, "source": block[K.SOURCE][i],
                                "row": int(block[K.ROW][i]), "reason": block[K.REJECT][i],
                                "detail": block[K.DETAIL][i], "stage": "stream", "epoch": spec.preprocess.epoch})
            ok = good[pos:end]
            if ok.all():  # the common case: a view into the block, no copy
                frags.append({k: block[k][pos:end] for k in model_keys if k in block})
                have += end - pos
            elif ok.any():
                keep = sel[ok]
                frags.append({k: block[k][keep] for k in model_keys if k in block})
                have += keep.size
            consumed += end - pos
            pos = end
            if have == B:
                yield StreamBatch(_finish(_concat(frags)), consumed, rejects)
                frags, have, rejects = [], 0, []
    if have or rejects:
        yield StreamBatch(_finish(_concat(frags)) if frags else {}, consumed, rejects)


def _finish(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 [B,H,W,3] pixels -> normalised float32 [B,3,H,W] (BatchKeys contract)."""
    for k in PIXEL_KEYS:
        v = arrays.get(k)
        if v is not None and v.dtype == np.uint8:
            arrays[k] = normalise(v)
    return arrays


def _concat(frags: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One batch from fragments; always writable arrays that own their memory (a view would pin the
    block in the object store and hand torch a read-only buffer)."""
    if len(frags) == 1:
        # uint8 pixels need no copy: _finish writes the normalised floats into new arrays
        return {k: v if (v.flags.writeable and v.base is None) or (k in PIXEL_KEYS and v.dtype == np.uint8)
                else v.copy() for k, v in frags[0].items()}
    return {k: np.concatenate([f[k] for f in frags]) for k in frags[0]}


__all__ = ["Unit", "Segment", "StreamBatch", "StreamSpec", "units_from_manifest", "epoch_plan", "advance",
           "reshard", "iterate", "prefetch", "close_prefetched", "part_to_json", "part_from_json"]
