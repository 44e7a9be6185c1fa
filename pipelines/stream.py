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

import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.config import GammarayConfig
from gammaray.schema import RECORD_SCHEMA, BatchKeys as K, Reason, SchemaError, check_table_schema, conform_table

from . import storage
from .plan import (Segment, Unit, UnitTable, advance, epoch_part, epoch_plan, part_from_json, part_to_json,  # noqa: F401
                   reshard, row_permutation, split_sequence, total_rows, unit_order)
from .preprocess import PIXEL_KEYS, PreprocessSpec, normalise, preprocess_batch
from .tokenizer import load_fast as load_tokenizer

MODEL_KEYS = (K.SAMPLE_INDEX, K.PIXELS, K.PIXELS_AUG, K.INPUT_IDS, K.ATTENTION_MASK, K.INPUT_IDS_AUG,
              K.ATTENTION_MASK_AUG, K.PIXELS_PAIR, K.INPUT_IDS_PAIR, K.ATTENTION_MASK_PAIR)
READ_COLUMNS = ["product_id", "sample_index", "title", "description", "category", "image"]


# --------------------------------------------------------------------------------------------
# the epoch plan (pipelines/plan.py) and the catalogue's units


def units_from_manifest(manifest: dict) -> UnitTable:
    """Every row group of the catalogue (a manifest from `catalogue.load_manifest`: read from the
    catalogue's Parquet index without building a Python object per shard, or from an old manifest's
    list of shards)."""
    from .catalogue import unit_table

    return unit_table(manifest)


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
    # pixels handed over as the preprocessing made them (uint8 [B,H,W,3]): the trainer normalises them
    # on its device (workers/training/step.prepare_batch), a quarter of the bytes to copy there
    device_pixels: bool = False

    @classmethod
    def from_config(cls, cfg: GammarayConfig, catalogue_uri: str, units, *, epoch: int, train: bool,
                    with_aug: bool, batch_size: int, device_pixels: bool = False) -> "StreamSpec":
        """The stream of a run's config (data.*, storage.*) over `units` of `catalogue_uri` for one epoch;
        shuffled only for training."""
        d = cfg.data
        units = units if isinstance(units, UnitTable) else UnitTable.from_units(units)  # numpy columns, pickled as such
        return cls(catalogue_uri=catalogue_uri, units=units,
                   preprocess=PreprocessSpec.from_config(cfg, epoch=epoch, train=train, with_aug=with_aug),
                   settings=storage.S3Settings.from_config(cfg.storage), shuffle=d.shuffle and train,
                   batch_size=batch_size, preprocess_num_cpus=d.preprocess_num_cpus,
                   prefetch_batches=d.prefetch_batches, concurrency=d.preprocess_concurrency,
                   segments_per_task=d.preprocess_segments_per_task, device_pixels=device_pixels)


WINDOW_TASKS = 512  # read tasks (blocks) of one pipeline's source; a longer part runs as several windows


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
    if not part:
        return None
    units = spec.units
    # each item carries its unit's fields (shard, row group, rows, first row): the tasks need nothing
    # else of the catalogue, so no unit table is pickled into the job, whatever the catalogue's size
    ids = np.fromiter((s.unit for s in part), dtype=np.int64, count=len(part))
    if isinstance(units, UnitTable):
        shard_of, row_group = units.shard_of[ids], units.row_group[ids]
        num_rows, first_row = units.num_rows[ids], units.first_row[ids]
        shard_paths = units.shards
    else:
        picked = [units[int(u)] for u in ids]
        shard_paths = sorted({u.shard for u in picked})
        where = {p: i for i, p in enumerate(shard_paths)}
        shard_of = np.array([where[u.shard] for u in picked], np.int64)
        row_group = np.array([u.row_group for u in picked], np.int64)
        num_rows = np.array([u.num_rows for u in picked], np.int64)
        first_row = np.array([u.first_row for u in picked], np.int64)
    items = [{"unit": int(u), "start": s.start, "stop": s.stop, "shard": shard_paths[int(sh)], "row_group": int(g),
              "num_rows": int(n), "first_row": int(f)}
             for u, s, sh, g, n, f in zip(ids, part, shard_of, row_group, num_rows, first_row)]
    cat, pp = spec.catalogue_uri, spec.preprocess
    settings, shuffle = spec.settings, spec.shuffle
    columns = pp.columns
    # pixels travel as uint8 (a quarter of the bytes; float32 blocks cost Ray Data more to build and
    # move than the decode itself) and are normalised by the consumer, batch by batch
    pp = dataclasses.replace(pp, pixels_uint8=True)

    def read_and_preprocess(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # one fused task per segment (or per `segments_per_task`): reading and decoding in separate
        # operators costs an extra hop through the object store and doubles per-task overhead
        tables = [
            read_segment_rows(cat, Unit(str(sh), int(g), int(n), int(f)), int(u), int(a), int(b), pp.epoch, pp.seed,
                              shuffle, settings, columns)
            for u, a, b, sh, g, n, f in zip(batch["unit"], batch["start"], batch["stop"], batch["shard"],
                                            batch["row_group"], batch["num_rows"], batch["first_row"])
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


def windows(spec: StreamSpec, part: list[Segment]) -> list[list[Segment]]:
    """The part in consecutive windows of at most `WINDOW_TASKS` read tasks: one Ray Data pipeline
    per window, so a pipeline's source has a bounded number of blocks however long the part is
    (building a source costs the driver about 0.1 ms per block)."""
    n = WINDOW_TASKS * max(1, spec.segments_per_task)
    return [part[i:i + n] for i in range(0, len(part), n)] or [[]]


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
            parts = windows(self.spec, self.part)
            if len(parts) == 1:
                self._iterate(parts[0], self._put)
            else:
                self._run_windows(parts)
            self.produced_all.set()
            cb = self.on_produced_all
            if cb is not None:
                cb()
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(err)

    def _iterate(self, window: list[Segment], put) -> None:
        ds = build_dataset(self.spec, window)
        if ds is not None:
            for block in ds.iter_batches(batch_size=None, batch_format="numpy",
                                         prefetch_batches=self.spec.prefetch_batches):
                if not put(block):
                    return

    def _run_windows(self, parts: list[list[Segment]]) -> None:
        """One pipeline per window, in order; window i+1's pipeline starts once window i's has
        produced its last block, so its start-up overlaps the consumption of window i's tail."""
        import queue

        feeds: list[tuple[queue.Queue, threading.Event]] = []

        def start(window: list[Segment]) -> None:
            q: queue.Queue = queue.Queue(maxsize=max(1, self.spec.prefetch_batches))
            done = threading.Event()

            def put(item) -> bool:
                while not self.stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        return True
                    except queue.Full:
                        continue
                return False

            def run() -> None:
                try:
                    self._iterate(window, put)
                    done.set()
                    put(self._END)
                except BaseException as err:  # noqa: BLE001 - handed on by the pump
                    done.set()
                    put(err)

            threading.Thread(target=run, name="gammaray-stream-window", daemon=True).start()
            feeds.append((q, done))

        start(parts[0])
        for i in range(len(parts)):
            q, done = feeds[i]
            while True:
                if done.is_set() and len(feeds) == i + 1 and i + 1 < len(parts):
                    start(parts[i + 1])
                try:
                    item = q.get(timeout=0.2)
                except queue.Empty:
                    if self.stop.is_set():
                        return
                    continue
                if item is self._END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if not self._put(item):
                    return
            if len(feeds) == i + 1 and i + 1 < len(parts):
                start(parts[i + 1])

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
                yield StreamBatch(_finish(_concat(frags, spec.device_pixels), spec.device_pixels), consumed, rejects)
                frags, have, rejects = [], 0, []
    if have or rejects:
        arrays = _finish(_concat(frags, spec.device_pixels), spec.device_pixels) if frags else {}
        yield StreamBatch(arrays, consumed, rejects)


def _finish(arrays: dict[str, np.ndarray], device_pixels: bool = False) -> dict[str, np.ndarray]:
    """uint8 [B,H,W,3] pixels -> normalised float32 [B,3,H,W] (BatchKeys contract), unless the
    trainer normalises them on its device."""
    if device_pixels:
        return arrays
    for k in PIXEL_KEYS:
        v = arrays.get(k)
        if v is not None and v.dtype == np.uint8:
            arrays[k] = normalise(v)
    return arrays


def _concat(frags: list[dict[str, np.ndarray]], device_pixels: bool = False) -> dict[str, np.ndarray]:
    """One batch from fragments; always writable arrays that own their memory (a view would pin the
    block in the object store and hand torch a read-only buffer)."""
    if len(frags) == 1:
        # uint8 pixels normalised on the host need no copy: _finish writes the floats into new arrays
        return {k: v if (v.flags.writeable and v.base is None)
                or (not device_pixels and k in PIXEL_KEYS and v.dtype == np.uint8)
                else v.copy() for k, v in frags[0].items()}
    return {k: np.concatenate([f[k] for f in frags]) for k in frags[0]}


__all__ = ["Unit", "UnitTable", "Segment", "StreamBatch", "StreamSpec", "units_from_manifest", "epoch_plan",
           "epoch_part", "advance",
           "reshard", "iterate", "prefetch", "close_prefetched", "part_to_json", "part_from_json"]
