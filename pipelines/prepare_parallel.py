"""`gammaray prepare` as a Ray Data job: the per-record work in Ray Data tasks, every decision in the driver and the id partitions.

The source is cut into chunks: a JSON Lines file into byte ranges of about `chunk_bytes` that start
at a line start (the driver finds the cuts and the line number of each while streaming the file
once: counting newlines costs far less than validating), a Parquet file into runs of row groups
of about `chunk_bytes` (its footer read here), every other file (CSV: quoted newlines; a JSON
array; WebDataset tar) is one chunk. The chunks are the rows of a Ray Data dataset, one block
each (`ray.data.from_items`), mapped by a generator UDF (`check_chunk_batches`, `map_batches`, at
most `cpus` tasks at once) that streams its chunk's rows (the readers of pipelines/readers.py: the
same caps, reasons and row numbers; a byte range or row groups read, never the whole file),
validates them, reads and checks their images, hashes them, asks the id partitions which are
catalogued, and yields them in batches of at most `BATCH_RECORDS` rows or `BATCH_BYTES` of images,
each its own block. The driver iterates the blocks in source order (`preserve_order`) and decides
every record (already present, duplicate, changed at the source, quarantined, re-admitted) exactly
as the in-process pass does, asking the id partitions (pipelines/ids.py: P actors, one hash range
each, started and loaded by `start_partitions`) one call per batch per partition, and hands each
decided batch the next contiguous range of sample_index (pipelines/prepare.py, `_numbered`). The
output is the same, byte for byte. Full shards go to a few writer actors (a bounded number of
writes in flight); the manifest is still committed last, by the driver.

Memory: a block is one batch (`target_max_block_size` is set so that the UDF's output is never
buffered into a bigger block), a task holds at most Ray Data's streaming-generator buffer of
blocks ahead of the executor, and the executor stops starting chunk tasks while the driver falls
behind (measured: the driver held for 48 s, 8 chunks of 100,000 records' 21 had started, none
more until it went on). A batch travels pickled in one binary cell: its records carry image
bytes, per-record faults and raw rows, which no Arrow column keeps as they are. A fault of a whole
chunk (its file unreadable, its storage down) comes back as the chunk's last row and is raised by
the driver where the source order reaches it, as the in-process pass raises it.

Why the decisions stay in the driver: first seen wins and sample_index is dense in source order,
so they need one ordered pass over the validated records; the id partitions make each decision a
lookup, so that pass costs little next to the per-record work it no longer does.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Store
from .image_refs import ImagePolicy
from .ids import IdPartition, PartitionedIds
from .prepare_records import (Checked, PrepareOptions, check_unknowing, file_rows, hash_table_bytes, in_order,
                              raw_product_id, scan_shards, shard_slices, validate_raw, write_shard)
from .ray_start import private_tmpdir_for_ray
from .readers import READ_CHUNK, RawRow, is_json_array, read_jsonl_range, read_parquet, read_source

BATCH_RECORDS = 1024        # rows a chunk task yields at once
BATCH_BYTES = 8 * 2**20     # ... or fewer, once their images reach this size
PROBE_ROWS = 32            # rows a chunk task times on one thread (I/O bound or not)
LOOKUP_ROWS = 256           # rows a chunk task asks the id partitions about at once
SCAN_ROWS = 100_000         # catalogued ids one scan task reads (its shards' id files) for the partition owners


@dataclass(frozen=True)
class Chunk:
    uri: str
    start: int = 0
    stop: int | None = None  # None: the whole file, through read_source
    first_line: int = 0
    row_groups: tuple[int, int] | None = None  # a Parquet file's row groups [start, stop)


def source_bytes(files: list[str], store: Store) -> int:
    total = 0
    for f in files:
        fs, path = store.resolve(f)
        total += fs.get_file_info(path).size or 0
    return total


def plan_chunks(files: list[str], chunk_bytes: int, store: Store) -> Iterator[Chunk]:
    for f in files:
        if f.endswith((".jsonl", ".json")):
            yield from file_rows(f, lambda f=f: _jsonl_chunks(f, chunk_bytes, store))
        elif f.endswith(".parquet"):
            yield from _parquet_chunks(f, chunk_bytes, store)
        else:
            yield Chunk(f)


def _jsonl_chunks(uri: str, chunk_bytes: int, store: Store) -> Iterator[Chunk]:
    """Byte ranges of about chunk_bytes, each ending after a newline (or at the end of the file)."""
    with store.open_input(uri) as f:
        block = f.read(READ_CHUNK)
        if is_json_array(block):  # one JSON array: read whole, as read_jsonl does
            yield Chunk(uri)
            return
        start = first_line = 0   # the chunk being cut
        pos = lines = 0          # offset of `block` in the file; newlines before pos + done
        while block:
            done = 0             # bytes of block whose newlines are counted in `lines`
            while True:
                want = start + max(1, chunk_bytes) - 1 - pos  # a cut at the first newline from here on
                i = block.find(b"\n", max(want, done)) if want < len(block) else -1
                if i < 0:
                    break
                lines += block.count(b"\n", done, i + 1)
                done = i + 1
                yield Chunk(uri, start, pos + done, first_line)
                start, first_line = pos + done, lines
            lines += block.count(b"\n", done)
            pos += len(block)
            block = f.read(READ_CHUNK)
        if start < pos:
            yield Chunk(uri, start, pos, first_line)


def _parquet_chunks(uri: str, chunk_bytes: int, store: Store) -> Iterator[Chunk]:
    """Runs of consecutive row groups of about chunk_bytes (uncompressed, as the footer says); the
    whole file as one chunk where its footer cannot be read here (its reader then says why)."""
    try:
        with store.open_random_access(uri) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:  # noqa: BLE001 - a damaged footer is rows with a reason, a fault the task's to raise
        yield Chunk(uri)
        return
    start, size = 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= chunk_bytes or g + 1 == meta.num_row_groups:
            yield Chunk(uri, row_groups=(start, g + 1))
            start, size = g + 1, 0
    if not meta.num_row_groups:
        yield Chunk(uri)


def chunk_rows(chunk: Chunk, opts: PrepareOptions, store: Store):
    if chunk.row_groups is not None:
        return file_rows(chunk.uri, lambda: read_parquet(chunk.uri, store, row_groups=chunk.row_groups))
    if chunk.stop is None:
        return file_rows(chunk.uri, lambda: read_source(chunk.uri, store, opts.csv_field_limit,
                                                        opts.max_record_bytes))

    def ranged():
        with store.open_random_access(chunk.uri) as f:
            yield from read_jsonl_range(chunk.uri, f, chunk.start, chunk.stop, chunk.first_line, opts.max_record_bytes)
    return file_rows(chunk.uri, ranged)


def check_chunk(chunk: Chunk, opts: PrepareOptions, store: Store, policy: ImagePolicy,
                ids: PartitionedIds | None = None) -> Iterator[list[tuple]]:
    """The body of a chunk task: its rows as `check_unknowing` finds them, in batches. Where there
    is a catalogue, the partition owners say which rows' product_ids it holds (one call per
    partition per `LOOKUP_ROWS` rows), so that their images are not read again. The first rows are
    checked on one thread, timed: where they waited on I/O (images on remote storage) the rest get
    `io_threads`; where not, threads would only contend for the GIL (about 40% more CPU)."""
    batch: list[tuple] = []
    size = 0
    check = lambda row: check_unknowing(row[0], opts, store, policy, lambda pid: row[1])  # noqa: E731
    rows = _with_known(chunk_rows(chunk, opts, store), opts, ids)
    first = list(itertools.islice(rows, PROBE_ROWS))
    t, c = time.perf_counter(), time.thread_time()
    probed = [(row, check(row)) for row in first]
    io_bound = time.perf_counter() - t > 2 * (time.thread_time() - c) + 0.01
    for _, found in itertools.chain(probed, in_order(rows, check, opts.io_threads if io_bound else 1)):
        batch.append(found)
        full = found[4]
        if full is not None and full.rec is not None:  # (never a catalogued row's)
            size += len(full.rec["image"]) + sum(len(b) for b in full.rec.get("extra_images") or ())
        if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _with_known(rows: Iterator[RawRow], opts: PrepareOptions, ids: PartitionedIds | None) -> Iterator[tuple]:
    """(raw, whether its product_id is catalogued)."""
    while True:
        group = list(itertools.islice(rows, LOOKUP_ROWS))
        if not group:
            return
        pids = [raw_product_id(raw, opts) for raw in group]
        asked = [i for i, pid in enumerate(pids) if pid is not None]
        known = np.zeros(len(group), bool)
        if ids is not None and ids.num_known and asked:
            known[asked] = ids.known([pids[i] for i in asked])
        yield from zip(group, known.tolist())


def write_shard_files(rows: list[dict], hashes: list, uri: str, hash_uri: str, row_group_size: int,
                      store: Store) -> dict:
    """The body of a writer task: one shard and its id/row-hash file."""
    info = write_shard(rows, uri, row_group_size, store)
    store.write_bytes(hash_uri, hash_table_bytes(rows, hashes))
    return info


class ShardWriter:
    """A Ray actor writing shards (`write_shard_files`): a few live through the whole prepare, so
    no worker process is started (and its imports paid) per shard."""

    def write(self, rows: list[dict], hashes: list, uri: str, hash_uri: str, row_group_size: int,
              store: Store) -> dict:
        return write_shard_files(rows, hashes, uri, hash_uri, row_group_size, store)


_TASKS: dict[str, Any] = {}


def _remote(name: str):
    """The Ray remote functions and classes, made on first use (importing this module imports no Ray)."""
    if not _TASKS:
        import ray

        # writers take no CPU slot: chunk tasks held back by the executor hold theirs, and a writer the
        # driver waits for must still run
        _TASKS["writer"] = ray.remote(num_cpus=0, max_restarts=0)(ShardWriter)
        # the id partitions take no CPU slot either: the chunk tasks and the driver wait on them
        _TASKS["owner"] = ray.remote(num_cpus=0, max_restarts=0)(IdPartition)
        _TASKS["scan"] = ray.remote(num_cpus=1, max_retries=0)(scan_shards)
    return _TASKS[name]


def start_ray(opts: PrepareOptions) -> tuple[int, bool]:
    """(the chunk tasks to run at once, whether Ray was started here). A running instance is used
    as it is; else `opts.address` or $RAY_ADDRESS; else a local instance of `opts.cpus` CPUs (every
    CPU of this machine by default)."""
    import ray

    started = False
    if not ray.is_initialized():
        if opts.address or os.environ.get("RAY_ADDRESS"):  # inside a Ray job RAY_ADDRESS names the cluster
            ray.init(address=opts.address, log_to_driver=False)
        else:
            with private_tmpdir_for_ray():
                # Ray starts its workers at niceness 15; here they do the work the command was run
                # for, so they get its priority (a loaded machine would otherwise starve them)
                ray.init(num_cpus=opts.cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                         _system_config={"worker_niceness": os.nice(0)})
        started = True
    # the CPUs free now: chunk tasks held back by the executor hold theirs, so every task in flight must
    # be able to run at once (a head chunk left waiting for a CPU would stall the run)
    free = max(1, int(ray.available_resources().get("CPU", 1)))
    return max(1, min(opts.cpus or free, free)), started


def unwrap(err: BaseException) -> BaseException:
    """The exception a task raised (a PrepareError, a storage OSError), not Ray's wrapper of it."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, BaseException):
        return err.cause
    return err


def start_partitions(dst: str, shards: list[dict], store: Store, count: int,
                     hash_fn: Callable[[str], int]) -> PartitionedIds:
    """`count` partition owners (Ray actors), the catalogue's ids loaded into them: scan tasks read
    the shards' id files, about SCAN_ROWS ids each, at most `count` at once, and split them by
    partition; each owner takes its part straight from the object store (the driver passes refs)."""
    import ray

    owners = [_remote("owner").remote(j, count, hash_fn) for j in range(count)]
    ids = PartitionedIds(owners, hash_fn, remote=True)
    scan = _remote("scan").options(num_returns=count) if count > 1 else _remote("scan")
    loading: deque = deque()
    try:
        for group in shard_slices(shards, SCAN_ROWS):
            parts = scan.remote(dst, group, store, hash_fn, count)
            parts = parts if count > 1 else [parts]  # one return: a ref, not a list
            loading.append([owner.load_scanned.remote(part) for owner, part in zip(owners, parts)])
            if len(loading) > count:
                ray.get(loading.popleft())
        while loading:
            ray.get(loading.popleft())
        if shards:  # (a new catalogue: the chunk tasks start while the owners do)
            ids.num_known = sum(ray.get([owner.finish_load.remote() for owner in owners]))
    except ray.exceptions.RayTaskError as err:
        ids.close()
        raise unwrap(err) from None
    except BaseException:
        ids.close()
        raise
    return ids


def _chunk_item(index: int, chunk: Chunk) -> dict:
    """A chunk as a row of the Ray Data source (plain columns: no pickled object in the plan)."""
    rg = chunk.row_groups or (-1, -1)
    return {"index": index, "uri": chunk.uri, "start": chunk.start, "stop": -1 if chunk.stop is None else chunk.stop,
            "first_line": chunk.first_line, "rg_start": rg[0], "rg_stop": rg[1]}


def _chunk_of(row: dict) -> Chunk:
    stop, rg = int(row["stop"]), (int(row["rg_start"]), int(row["rg_stop"]))
    return Chunk(str(row["uri"]), int(row["start"]), None if stop < 0 else stop, int(row["first_line"]),
                 None if rg[0] < 0 else rg)


def check_chunk_batches(items: pa.Table, opts: PrepareOptions, store: Store,
                        policy: ImagePolicy, ids: PartitionedIds | None) -> Iterator[pa.Table]:
    """The Ray Data UDF: for its chunk (one row), what `check_chunk` yields, one output row per
    batch (the batch pickled: records hold image bytes, faults and raw rows, which no Arrow column
    keeps as they are). A fault of the chunk (a PrepareError naming its file, a storage OSError)
    comes back as a last row, for the driver to raise where the source order reaches it, exactly
    as the in-process pass would (the batches before it are still decided)."""
    for row in items.to_pylist():
        chunk, seq = _chunk_of(row), 0
        try:
            for batch in check_chunk(chunk, opts, store, policy, ids):
                yield _out_row(row["index"], seq, pickle.dumps(batch, protocol=5), None)
                seq += 1
        except Exception as err:  # noqa: BLE001 - raised by the driver, in source order
            yield _out_row(row["index"], seq, None, pickle.dumps(err, protocol=5))


def _out_row(index: int, seq: int, batch: bytes | None, fault: bytes | None) -> pa.Table:
    return pa.table({"chunk": pa.array([index], pa.int64()), "seq": pa.array([seq], pa.int64()),
                     "batch": pa.array([batch], pa.large_binary()), "fault": pa.array([fault], pa.large_binary())})


@contextmanager
def _data_context(cpus: int):
    """Ray Data settings for the prepare job, the caller's restored after it: order preserved (the
    decisions are one ordered pass), `cpus` chunk tasks at once, blocks of about one batch (a
    generator UDF's output is buffered up to `target_max_block_size` before it becomes a block: at
    Ray Data's 128 MiB that would be a whole chunk held by its task), no progress bars, stats or
    log lines on the console (the command prints its own progress)."""
    import ray.data
    from ray.data import DataContext

    before = DataContext.get_current()
    ctx = before.copy()
    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(cpu=cpus)
    ctx.target_max_block_size = 1  # every batch a block of its own, as soon as it is yielded
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.enable_auto_log_stats = False
    ctx.print_on_execution_start = False
    # one operator: no other to keep a reservation for (pipelines/stream.py: half the CPUs idle otherwise)
    ctx.op_resource_reservation_enabled = False
    DataContext._set_current(ctx)
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield ctx
    finally:
        logger.setLevel(level)
        DataContext._set_current(before)


def parallel_items(files: list[str], opts: PrepareOptions, store: Store, policy: ImagePolicy,
                   ids: PartitionedIds, cpus: int) -> Iterator[list[tuple[str, int, Checked, Callable[[], Checked]]]]:
    """Batches of (source, row, checked, full) in source order, as the in-process pass makes them:
    `checked` is what validate_raw with the catalogue's ids says, full() the validation without
    them (for a catalogued record met twice; its images are read here then).

    A Ray Data job: the chunks (one block each) -> `check_chunk_batches` (a generator UDF, at most
    `cpus` tasks at once), iterated in source order (`preserve_order`); the streaming executor's
    backpressure bounds what is in flight (the module's docstring: Memory)."""
    import ray.data

    chunks = [_chunk_item(i, c) for i, c in enumerate(plan_chunks(files, opts.chunk_bytes, store))]
    if not chunks:
        return
    validate_here = lambda raw: validate_raw(raw, opts, store, policy)  # noqa: E731
    sources = [c["uri"] for c in chunks]
    with _data_context(cpus):
        ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
            check_chunk_batches, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            fn_kwargs={"opts": opts, "store": store, "policy": policy, "ids": ids},
            num_cpus=1, compute=ray.data.TaskPoolStrategy(size=min(cpus, len(chunks))))
        blocks = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))
        try:
            for block in blocks:
                for index, batch, fault in zip(*(block.column(c).to_pylist() for c in ("chunk", "batch", "fault"))):
                    if fault is not None:
                        raise pickle.loads(fault)
                    items = []
                    for row, pid, cheap_ok, known_row_hash, full, fault, raw in pickle.loads(batch):
                        if raw is not None:  # catalogued (the partitions said so): images not read
                            full = lambda raw=raw: validate_here(raw)  # noqa: E731
                            checked = Checked(None, None, pid, known=True, row_hash=known_row_hash)
                        else:
                            full = _full(full, fault)
                            checked = full()
                        items.append((sources[index], row, checked, full))
                    yield items
        finally:  # stops the job (its tasks) where the pass stopped early
            close = getattr(blocks, "close", None)
            if close is not None:
                close()


def _full(full: Checked | None, fault: BaseException | None) -> Callable[[], Checked]:
    def get() -> Checked:
        if fault is not None:
            raise fault
        return full
    return get


class ShardWriters:
    """Shard writes on `max(1, min(4, cpus // 2))` writer actors, round robin, at most two a writer in
    flight; `done` gathers their manifest entries."""

    def __init__(self, cpus: int):
        self.num_writers = max(1, min(4, cpus // 2))
        self.in_flight = 2 * self.num_writers
        self.writers: list = []
        self.pending: dict[int, tuple[Any, str]] = {}  # shard number -> (task, uri)
        self.done: dict[int, dict] = {}
        self.failed_uri: str | None = None

    def submit(self, key: int, rows: list[dict], hashes: list, uri: str, hash_uri: str, row_group_size: int,
               store: Store) -> None:
        if not self.writers:
            self.writers = [_remote("writer").remote() for _ in range(self.num_writers)]
        writer = self.writers[key % self.num_writers]
        self.pending[key] = (writer.write.remote(rows, hashes, uri, hash_uri, row_group_size, store), uri)
        while len(self.pending) > self.in_flight:
            self.wait(min(self.pending))

    def wait(self, key: int) -> None:
        """Until shard `key` is written (raises what its task raised)."""
        import ray

        if key not in self.pending:
            return
        ref, uri = self.pending[key]
        try:
            self.done[key] = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            self.failed_uri = uri
            raise unwrap(err) from None
        del self.pending[key]

    def drain(self) -> None:
        for key in sorted(self.pending):
            self.wait(key)
        self.close()

    def abandon(self) -> None:
        """Wait out every write still running (their files are then removed by the caller)."""
        import ray

        refs = [ref for ref, _ in self.pending.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=300)
        self.pending.clear()
        self.close()

    def close(self) -> None:
        import ray

        for w in self.writers:
            ray.kill(w)
        self.writers = []


def stop_ray() -> None:
    import ray

    ray.shutdown()
