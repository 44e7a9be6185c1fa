"""`gammaray prepare SRC DST`: raw catalogue -> validated Parquet shards with a dense sample_index.

SRC is a JSONL, CSV, Parquet or WebDataset (.tar, img2dataset layout) file, or a folder of them, on
any storage (local path, file://, s3://, any fsspec URL). Images are inline bytes, paths relative to
the source file, or URIs on any of those filesystems (pipelines/image_refs.py: what may be read). A
column map renames source columns to record fields. DST receives

    DST/shards/part-00000.parquet ...   RECORD_SCHEMA rows, row groups of `row_group_size`
    DST/manifest.json                    counts, schema version, sources, shards and their row groups
    DST/quarantine/prepare-00000.parquet every record currently rejected: product_id, source, row, reason
    DST/record_hashes/part-00000.parquet per shard: product_id, row_hash (what the source row said: edits)

Shards are cut at `max_records_per_shard` records or `target_shard_bytes` bytes, whichever comes
first. The source is streamed: memory holds one shard plus the validation window, not the catalogue.

Idempotent: re-running on the same source writes nothing (same shards, same indices); preparing the
same source into an empty destination writes byte-identical shards. Append-safe: records whose
product_id is new get the next free sample_index and go to new shards; old shards are never
rewritten, so old indices (the keys of the per-sample loss state) never move.

Every per-record fault is a quarantine reason; only a fault of the whole source or destination (its
storage down, the source file unreadable, another prepare writing DST) stops the run, with one
message (`PrepareError`), before anything is committed: the manifest is the commit
(pipelines/catalogue.py: atomic, one writer at a time).

Quarantined records are identified by product_id + a hash of their content (the source row and the
bytes of the images it names), never by how the source path was spelled: naming the same file as
absolute, relative or file:// does not grow the count, and the count is of distinct bad records. A
record validated again in a later run replaces its earlier entries: fixed in place (its row or its
image file), it is admitted and leaves the quarantine.

A prepare that does not commit removes what it wrote (a full disk is one line: "storage full at
PATH"); what a killed one left is removed by the next prepare, under the lock. A record in the
catalogue whose source row changed is listed as changed, never re-admitted (docs/data.md, Identity).

With more than one CPU (`PrepareOptions.cpus`) and a source of at least `parallel_min_bytes`, the
per-record work runs as a Ray Data job and the shard writes in Ray actors
(pipelines/prepare_parallel.py), and this module's pass only decides, in source order, handing
each decided batch the next contiguous range of sample_index: the same catalogue, byte for byte. The ids of the
catalogue and of the run are held by hash partitions (pipelines/ids.py: Ray actors with Ray, one
local partition here), never by this process, never as a set of strings.

Length (about 580 lines): prepare is one pass (read, validate, shard, quarantine, manifest) whose
steps share the shard writer, the manifest and the cleanup of an uncommitted run; one record's
validation (pipelines/prepare_records.py), readers, images and faults live in their own modules.
"""

from __future__ import annotations

import errno
import hashlib
import io
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gammaray.config import StorageConfig
from gammaray.schema import QUARANTINE_SCHEMA, SCHEMA_VERSION, Reason

from . import ids as id_hashing
from . import prepare_parallel, storage
from .storage import Store
from .catalogue import PrepareError, WriterLock, commit_manifest, load_manifest, read_manifest
from .ids import AGAIN, ALREADY, CHANGED, DUPLICATE, NEW, NOT_KNOWN, IdPartition, PartitionedIds
from .image_refs import ImagePolicy, source_root
from .prepare_records import (RECORD_FIELDS, Checked, PrepareOptions, canonical_uri, hash_table_bytes, hashes_path,
                              image_policy, in_order, printable, record_bytes, scan_shards, shard_slices, source_rows,
                              validate_raw, write_shard)
from .readers import source_files

__all__ = ["PrepareOptions", "PrepareResult", "PrepareError", "prepare", "load_manifest", "read_quarantine",
           "validate_raw", "canonical_uri"]


@dataclass
class PrepareResult:
    dst: str
    num_input: int
    num_written: int
    num_already_present: int
    num_quarantined: int                 # rows quarantined for the first time by this run
    quarantine_by_reason: dict[str, int]
    shards_written: list[str]
    manifest: dict
    wall_s: float = 0.0
    image_conversions: dict[str, int] = field(default_factory=dict)  # what decoding changed in valid images
    num_already_quarantined: int = 0     # bad rows whose record was quarantined before (or earlier in this run)
    num_readmitted: int = 0              # records quarantined by an earlier run, written by this one
    changed_ids: list[str] = field(default_factory=list)  # in the catalogue, edited at the source since (kept as first prepared)
    num_orphans_removed: int = 0         # uncommitted files of an earlier prepare that did not finish
    id_partitions: list[dict] = field(default_factory=list)  # what each id partition held (IdPartition.stats)

    def summary(self) -> str:
        lines = [
            f"prepared {self.dst}",
            f"  input records      {self.num_input}",
            f"  written            {self.num_written}  ({len(self.shards_written)} new shard(s))",
            f"  already present    {self.num_already_present}",
            f"  quarantined        {self.num_quarantined}",
        ]
        for reason, n in sorted(self.quarantine_by_reason.items()):
            lines.append(f"    {reason:<22} {n}")
        if self.num_already_quarantined:
            lines.append(f"  already quarantined {self.num_already_quarantined}  (the same record as before)")
        if self.num_readmitted:
            lines.append(f"  re-admitted        {self.num_readmitted}  (quarantined before, good now)")
        if self.changed_ids:
            shown = ", ".join(repr(p) for p in self.changed_ids[:5]) + (", ..." if len(self.changed_ids) > 5 else "")
            lines.append(f"  changed at source  {len(self.changed_ids)}  ({shown}: the catalogue keeps the version first "
                         "prepared; see docs/data.md, Identity)")
        if self.num_orphans_removed:
            lines.append(f"  removed            {self.num_orphans_removed} uncommitted file(s) of an earlier prepare that "
                         "did not finish")
        if self.image_conversions:
            lines.append("  images converted   (decoded as the stream will: see docs/data.md, Images)")
            for name, n in sorted(self.image_conversions.items()):
                lines.append(f"    {name:<22} {n}")
        lines.append(f"  total in catalogue {self.manifest['num_records']}  (schema version {self.manifest['schema_version']})")
        q = self.manifest["quarantine"]["count"]
        if q:
            lines.append(f"  quarantine total   {q}  (distinct bad records, what the training gate counts)")
        if self.wall_s:
            lines.append(f"  time               {self.wall_s:.1f} s")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"num_input": self.num_input, "num_written": self.num_written,
                "num_already_present": self.num_already_present, "num_quarantined": self.num_quarantined,
                "num_already_quarantined": self.num_already_quarantined, "num_readmitted": self.num_readmitted,
                "quarantine_by_reason": self.quarantine_by_reason, "shards_written": self.shards_written,
                "num_records": self.manifest["num_records"],
                "quarantine_total": self.manifest["quarantine"]["count"],
                "quarantine_total_by_reason": self.manifest["quarantine"]["by_reason"],
                "image_conversions": self.image_conversions, "wall_s": round(self.wall_s, 2),
                "num_changed": len(self.changed_ids), "changed_ids": self.changed_ids,
                "num_orphans_removed": self.num_orphans_removed}



def new_manifest() -> dict:
    return {"schema_version": SCHEMA_VERSION, "num_records": 0, "next_sample_index": 0, "shards": [],
            "sources": [], "categories": [], "locales": [], "quarantine": {"count": 0, "by_reason": {}, "files": []}}


def prepare(
    src: str,
    dst: str,
    options: PrepareOptions | None = None,
    storage_cfg: Store | StorageConfig | None = None,
) -> PrepareResult:
    t0 = time.perf_counter()
    store = Store.of(storage_cfg)  # bound once: the Ray tasks get it too
    opts = options or PrepareOptions()
    if opts.row_group_size < 1 or opts.max_records_per_shard < 1 or opts.target_shard_bytes < 1:
        raise ValueError("prepare: row_group_size, max_records_per_shard and target_shard_bytes must be >= 1")
    if opts.image_max_side is not None and opts.image_max_side < 8:
        raise ValueError("prepare: image_max_side must be >= 8 pixels")
    if opts.max_image_bytes < 1 or opts.csv_field_limit < 1 or opts.max_record_bytes < 1:
        raise ValueError("prepare: max_image_bytes, csv_field_limit and max_record_bytes must be >= 1")
    unknown = sorted(set(opts.column_map) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"prepare: --map names unknown record field(s) {unknown}; fields: {RECORD_FIELDS}")
    if opts.cpus is not None and opts.cpus < 1:
        raise ValueError("prepare: cpus must be >= 1")
    try:
        files = source_files(src, store)
        src_is_dir = store.is_dir(src)
        parallel = opts.cpus != 1 and prepare_parallel.source_bytes(files, store) >= opts.parallel_min_bytes
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # noqa: BLE001 - the source's storage itself
        raise PrepareError(f"cannot list source {src}: {type(err).__name__}: {err}"[:600]) from err
    _refuse_destination_inside_source(src, dst, src_is_dir)
    with WriterLock(dst, store) as lock:
        return _prepare_locked(src, src_is_dir, files, dst, opts, store, lock, t0, parallel)


def _prepare_locked(src: str, src_is_dir: bool, files: list[str], dst: str, opts: PrepareOptions,
                    store: Store, lock: WriterLock, t0: float, parallel: bool) -> PrepareResult:
    manifest, etag = read_manifest(dst, store)
    if manifest is not None:
        version = int(manifest["schema_version"])
        if version != SCHEMA_VERSION:
            raise ValueError(f"{storage.join(dst, 'manifest.json')}: catalogue has schema version {version}; appending "
                             f"needs version {SCHEMA_VERSION}: prepare into a new destination")
        manifest.setdefault("locales", [])
    orphans = _remove_uncommitted(dst, manifest, store)
    manifest = manifest if manifest is not None else new_manifest()
    # a source under parallel_min_bytes stays in this process: Ray's start-up would cost more than it buys
    cpus, started = prepare_parallel.start_ray(opts) if parallel else (1, False)
    run = _Run(dst, manifest, opts, store, lock, cpus)
    ids = None
    try:
        # the ids by hash partition: P Ray actors with Ray (the driver holds none), else one here
        if cpus > 1:
            ids = prepare_parallel.start_partitions(dst, manifest["shards"], store, cpus, id_hashing.id_hash)
        else:
            ids = _local_partition(dst, manifest["shards"], store, id_hashing.id_hash)
        old_quarantine = _read_quarantine_entries(dst, manifest, store) if manifest["shards"] or \
            manifest["quarantine"]["files"] else []
        res = _prepare_pass(src, src_is_dir, files, run, ids, old_quarantine, etag, t0)
    except OSError as err:
        if not _storage_full(err):
            run.discard()
            raise
        run.discard()
        raise PrepareError(f"storage full at {run.writing or dst} ({_os_text(err)}); nothing of this run was committed "
                           "and its partial files were removed: free space and run the same command again") from None
    except BaseException:
        run.discard()
        raise
    finally:
        if ids is not None:
            ids.close()
        if started:
            prepare_parallel.stop_ray()
    res.num_orphans_removed = orphans
    return res


class _Run:
    """The files one prepare writes before its commit: removed again if it does not commit. With
    cpus > 1 shards are written by Ray tasks, at most `cpus` at once."""

    def __init__(self, dst: str, manifest: dict, opts: PrepareOptions, store: Store,
                 lock: WriterLock, cpus: int = 1):
        self.dst, self.manifest, self.opts, self.store, self.lock = dst, manifest, opts, store, lock
        self.cpus = cpus
        self.writers = prepare_parallel.ShardWriters(cpus) if cpus > 1 else None
        self.first_part = len(manifest["shards"])
        self.shard_uris: list[str] = []
        self.uncommitted: list[str] = []
        self.writing: str | None = None
        self.committed = False

    def write(self, uri: str, data: bytes) -> None:
        self.lock.check()
        self.writing = uri
        self.uncommitted.append(uri)
        self.store.write_bytes(uri, data)
        self.writing = None

    def write_shard(self, rows: list[dict], hashes: list[int | None]) -> None:
        rel = f"shards/part-{self.first_part + len(self.shard_uris):05d}.parquet"
        uri, hash_uri = storage.join(self.dst, rel), storage.join(self.dst, hashes_path(rel))
        if self.writers is None:
            info = write_shard(rows, uri, self.opts.row_group_size, self.store, self.write)
            self.write(hash_uri, hash_table_bytes(rows, hashes))
            self.manifest["shards"].append({"path": rel, **info})
        else:
            self.lock.check()
            self.uncommitted += [uri, hash_uri]
            self.manifest["shards"].append({"path": rel})  # the rest when its task is done
            self._settled(lambda: self.writers.submit(len(self.manifest["shards"]) - 1, rows, hashes, uri, hash_uri,
                                                      self.opts.row_group_size, self.store))
        self.shard_uris.append(uri)

    def _settled(self, step) -> None:
        try:
            step()
        finally:
            self.writing = self.writers.failed_uri
            for k, info in self.writers.done.items():
                self.manifest["shards"][k].update(info)
            self.writers.done.clear()

    def finish_writes(self) -> None:
        if self.writers is not None:
            self._settled(self.writers.drain)

    def discard(self) -> None:
        if self.writers is not None:
            self.writers.abandon()  # no write may land after the removal below
        try:
            self.lock.check()
        except PrepareError:
            return  # another prepare holds DST now: the same file names may be its files
        if not self.committed:
            for uri in self.uncommitted:
                _remove_quietly(uri, self.store)


def _local_partition(dst: str, shards: list[dict], store: Store,
                     hash_fn: Callable[[str], int]) -> PartitionedIds:
    part = IdPartition(0, 1, hash_fn)
    for group in shard_slices(shards, prepare_parallel.SCAN_ROWS):
        part.load(*scan_shards(dst, group, store, hash_fn, 1)[0])
    ids = PartitionedIds([part], hash_fn)
    ids.num_known = part.finish_load()
    return ids


def _in_process_items(files: list[str], opts: PrepareOptions, store: Store, policy: ImagePolicy,
                      ids: PartitionedIds) -> Iterator[list[tuple[str, int, Checked, Callable[[], Checked]]]]:
    check = lambda raw: validate_raw(raw, opts, store, policy, ids)  # noqa: E731
    batch = []
    for raw, checked in in_order(source_rows(files, opts, store), check, opts.io_threads):
        batch.append((raw.source, raw.row, checked, lambda raw=raw: validate_raw(raw, opts, store, policy)))
        if len(batch) >= DECIDE_RECORDS:
            yield batch
            batch = []
    if batch:
        yield batch


DECIDE_RECORDS = 256  # records of one batch of questions to the id partitions (in one process)


def _decided(batches: Iterator[list[tuple]], ids: PartitionedIds) -> Iterator[list[tuple]]:
    """Batches of (source, row, checked, full, verdict), in source order. The verdicts of a batch are asked of
    the id partitions (one call each) as soon as it arrives and gathered once the next one has been
    asked too: the partitions answer in the order asked, so first-seen-wins holds, while the driver
    and the partitions work at once. A record that is neither catalogued nor valid is not asked
    about (NOT_KNOWN)."""
    asked: deque = deque()
    try:
        for batch in batches:
            ops = [i for i, (_, _, c, _) in enumerate(batch) if c.known or (c.err is None and c.rec is not None)]
            pids = [batch[i][2].pid if batch[i][2].known else batch[i][2].rec["product_id"] for i in ops]
            add = np.fromiter((not batch[i][2].known for i in ops), bool, len(ops))
            row_hash = np.fromiter((batch[i][2].row_hash or 0 for i in ops), np.int64, len(ops))
            has = np.fromiter((batch[i][2].known and batch[i][2].row_hash is not None for i in ops), bool, len(ops))
            asked.append((batch, ops, ids.decide(pids, add, row_hash, has)))
            if len(asked) > 1:
                yield list(_verdicts(*asked.popleft()))
        while asked:
            yield list(_verdicts(*asked.popleft()))
    finally:
        batches.close()


def _numbered(decided: Iterator[list[tuple]], first_index: int) -> Iterator[tuple]:
    """(source, row, checked, full, verdict, sample_index) in source order: each decided batch (a
    chunk task's batch on Ray) is handed the next contiguous range of sample_index, as many as it
    has NEW records, before its records are looked at; sample_index is None for every other verdict.
    The ranges follow the source order, so the catalogue is dense and the same whatever the CPUs."""
    try:
        for batch in decided:
            new = sum(1 for item in batch if item[4] == NEW)
            indices = iter(range(first_index, first_index + new))
            first_index += new
            for item in batch:
                yield (*item, next(indices) if item[4] == NEW else None)
    finally:  # (the pass stopping early stops the job behind it)
        decided.close()


def _verdicts(batch: list[tuple], ops: list[int], gather) -> Iterator[tuple]:
    verdicts = np.full(len(batch), NOT_KNOWN, np.int8)
    verdicts[ops] = gather()
    for item, verdict in zip(batch, verdicts.tolist()):
        if verdict == NOT_KNOWN and item[2].known:
            raise RuntimeError(f"product_id {item[2].pid!r}: the id partitions disagree on whether it is catalogued")
        yield (*item, verdict)


def _prepare_pass(src: str, src_is_dir: bool, files: list[str], run: _Run, ids: PartitionedIds, old_quarantine: list[dict],
                  etag: str | None, t0: float) -> PrepareResult:
    dst, manifest, opts, store = run.dst, run.manifest, run.opts, run.store
    policy = image_policy(opts, source_root(src, src_is_dir))
    if run.cpus > 1:
        batches = prepare_parallel.parallel_items(files, opts, store, policy, ids, run.cpus)
    else:
        batches = _in_process_items(files, opts, store, policy, ids)
    first_index = int(manifest["next_sample_index"])
    items = _numbered(_decided(batches, ids), first_index)

    # the product_ids of the catalogue and of this run's writes are held by the id partitions,
    # which say what each record is (`verdict`); this pass keeps only the bad ones' ids
    old_keys = {e["record_key"] for e in old_quarantine}
    new_quarantine: dict[str, dict] = {}  # record_key -> entry, this run's findings
    first_seen: list[dict] = []           # entries whose record was not quarantined before
    decided_bad: set[str] = set()         # product_ids this run quarantined (as many as the quarantine holds)
    read_sources: dict[str, str] = {}     # source as the rows name it -> canonical
    changed: list[str] = []
    conversions: Counter = Counter()
    num_input = already = written = repeated = 0
    buffer: list[dict] = []
    hashes: list[int | None] = []
    buffer_bytes = 0
    cats = set(manifest.get("categories", []))
    locales = set(manifest.get("locales", []))

    def flush() -> None:
        nonlocal buffer, hashes, buffer_bytes
        if buffer:
            run.write_shard(buffer, hashes)
        buffer, hashes, buffer_bytes = [], [], 0

    bar = tqdm(desc="prepare", unit="rec", disable=not opts.progress, dynamic_ncols=True)
    try:
        for source, row, checked, full, verdict, sample_index in items:
            num_input += 1
            bar.update(1)
            if source not in read_sources:
                read_sources[source] = canonical_uri(source)
            if verdict in (ALREADY, CHANGED):
                already += 1
                if verdict == CHANGED:
                    changed.append(checked.pid)
                continue
            if verdict == AGAIN:
                # the same catalogued product_id again in the source: the duplicate the first run quarantined
                checked = full()
                verdict = DUPLICATE if checked.err is None and checked.rec is not None else NOT_KNOWN
            rec, err = checked.rec, checked.err
            if verdict == NEW:
                conversions.update(checked.conversions)
                rec["sample_index"] = sample_index
                written += 1
                if rec.get("category"):
                    cats.add(rec["category"])
                if rec.get("locale"):
                    locales.add(rec["locale"])
                for loc, _ in rec.get("titles") or ():
                    locales.add(loc)
                buffer.append(rec)
                hashes.append(checked.row_hash)
                buffer_bytes += record_bytes(rec)
                if len(buffer) >= opts.max_records_per_shard or buffer_bytes >= opts.target_shard_bytes:
                    flush()
                if not bar.disable:
                    bar.set_postfix(shards=len(run.shard_uris), bad=len(new_quarantine), refresh=False)
                continue
            if verdict == DUPLICATE:
                err = (Reason.DUPLICATE_ID, f"product_id {printable(rec['product_id'])!r} appears earlier in the source")
            if checked.pid:
                decided_bad.add(checked.pid)
            entry = {"product_id": checked.pid, "source": printable(source), "row": row, "reason": err[0],
                     "detail": printable(str(err[1])[:500]), "stage": "prepare", "epoch": None, "record_key": checked.key}
            if checked.key in new_quarantine or checked.key in old_keys:
                repeated += 1  # the same record (same content) as one quarantined before
            else:
                first_seen.append(entry)
            new_quarantine[checked.key] = entry
    finally:  # a fault stops the chunk tasks still running
        items.close()
    flush()
    run.finish_writes()
    bar.close()
    read_canonical = set(read_sources.values())

    # this run's findings replace earlier entries of the records it decided, and of unreadable rows of
    # the files it read again; entries of records it did not see stay
    kept, readmitted = [], 0
    named = [e["product_id"] for e in old_quarantine if e["product_id"] is not None]
    added = dict(zip(named, ids.is_new(named).tolist()))  # (as many as the quarantine holds)
    for e in old_quarantine:
        if e["record_key"] in new_quarantine:
            continue
        is_new = e["product_id"] is not None and added[e["product_id"]]
        if is_new or e["product_id"] in decided_bad:
            readmitted += is_new
            continue
        if e["product_id"] is None and canonical_uri(e["source"]) in read_canonical:
            continue
        kept.append(e)
    current = kept + list(new_quarantine.values())
    quarantine_changed = _signature(current) != _signature(old_quarantine)
    source = canonical_uri(src)
    result = dict(num_input=num_input, written=written, already=already, first_seen=first_seen, repeated=repeated,
                  readmitted=readmitted, shard_uris=run.shard_uris, conversions=conversions, changed=changed, t0=t0,
                  id_partitions=ids.stats())
    if not (written or quarantine_changed or source not in manifest["sources"]):
        return _result(dst, manifest, **result)

    old_files = list(manifest["quarantine"]["files"])
    if quarantine_changed:
        manifest["quarantine"] = {"count": len(current), "by_reason": dict(sorted(Counter(e["reason"] for e in current).items())),
                                  "files": []}
        if current:
            qrel = f"quarantine/prepare-{_next_file_number(old_files):05d}.parquet"
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(current, schema=QUARANTINE_SCHEMA), buf)
            run.write(storage.join(dst, qrel), buf.getvalue())
            manifest["quarantine"]["files"] = [qrel]
    manifest["num_records"] = int(manifest["num_records"]) + written
    manifest["next_sample_index"] = first_index + written
    if source not in manifest["sources"]:
        manifest["sources"].append(source)
    manifest["categories"] = sorted(cats)
    manifest["locales"] = sorted(locales)
    run.lock.check()
    run.writing = storage.join(dst, "manifest.json")
    commit_manifest(dst, manifest, etag, store)
    run.committed, run.writing = True, None
    for rel in old_files:  # superseded by the new quarantine file; readers only follow the manifest
        if rel not in manifest["quarantine"]["files"]:
            _remove_quietly(storage.join(dst, rel), store)
    return _result(dst, manifest, **result)


def _result(dst, manifest, *, num_input, written, already, first_seen, repeated, readmitted, shard_uris, conversions,
            changed, t0, id_partitions) -> PrepareResult:
    return PrepareResult(dst=dst, num_input=num_input, num_written=written, num_already_present=already,
                         num_quarantined=len(first_seen),
                         quarantine_by_reason=dict(Counter(e["reason"] for e in first_seen)),
                         shards_written=shard_uris, manifest=manifest, wall_s=time.perf_counter() - t0,
                         image_conversions=dict(sorted(conversions.items())), num_already_quarantined=repeated,
                         num_readmitted=readmitted, changed_ids=changed, id_partitions=id_partitions)


def _refuse_destination_inside_source(src: str, dst: str, src_is_dir: bool) -> None:
    if not src_is_dir:
        return
    s, d = canonical_uri(src), canonical_uri(dst)
    if storage.protocol(s) == storage.protocol(d) and (d == s or d.startswith(s.rstrip("/") + "/")):
        raise PrepareError(f"the destination {dst} is inside the source folder {src}: prepare would read its own "
                           "shards and quarantine back as input on the next run; choose a destination outside it")


def _signature(entries: list[dict]) -> list[tuple]:
    return sorted((e["record_key"], e["reason"], e["product_id"] or "") for e in entries)


def _next_file_number(files: list[str]) -> int:
    numbers = [int(m.group(1)) for f in files if (m := re.search(r"(\d+)\.parquet$", f))]
    return max(numbers, default=-1) + 1


def _remove_quietly(uri: str, store: Store) -> None:
    try:
        fs, path = store.resolve(uri)
        fs.delete_file(path)
    except Exception:  # noqa: BLE001 - an orphan file is harmless: the manifest no longer names it
        pass


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXT = ("no space left", "disk quota exceeded", "file too large", "quotaexceeded", "entitytoolarge")



def _remove_uncommitted(dst: str, manifest: dict | None, store: Store) -> int:
    """Under the lock, a shard, hash, quarantine or shard-index file the manifest does not name was left by
    a prepare that died before its commit: nobody will ever read it."""
    named = set()
    for shard in (manifest or {}).get("shards", []):
        named.update((shard["path"], hashes_path(shard["path"])))
    named.update((manifest or {}).get("quarantine", {}).get("files", []))
    if (manifest or {}).get("index"):
        named.add(manifest["index"]["path"])  # the shard index the header names (pipelines/catalogue.py)
    removed = 0
    for folder, pattern in (("shards", r"part-\d+\.parquet"), ("record_hashes", r"part-\d+\.parquet"),
                            ("quarantine", r"prepare-\d+\.parquet"), ("index", r"shards-[0-9a-f]+\.parquet")):
        base = storage.join(dst, folder)
        try:
            found = store.list_files(base)
        except FileNotFoundError:
            continue
        for uri in found:
            name = uri.rsplit("/", 1)[-1]
            if re.fullmatch(pattern, name) and f"{folder}/{name}" not in named:
                _remove_quietly(uri, store)
                removed += 1
    return removed


def _storage_full(err: OSError) -> bool:
    return getattr(err, "errno", None) in _FULL_ERRNOS or any(t in str(err).lower() for t in _FULL_TEXT)


def _os_text(err: OSError) -> str:
    return str(err).splitlines()[0][:300]


def _read_quarantine_entries(dst: str, manifest: dict, store: Store) -> list[dict]:
    """The current quarantine as entries with a record_key (entries of catalogues prepared before
    keys existed get one from their place in the source)."""
    entries = read_quarantine(dst, manifest, store).to_pylist()
    for e in entries:
        if not e.get("record_key"):
            where = f"row\0{canonical_uri(e['source'] or '')}\0{e['row']}"
            e["record_key"] = hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()
    return list({e["record_key"]: e for e in entries}.values())


def read_quarantine(uri: str, manifest: dict | None = None, storage_cfg: Store | StorageConfig | None = None) -> pa.Table:
    """Every record `prepare` currently holds in quarantine for the catalogue at uri, as one table."""
    store = Store.of(storage_cfg)
    manifest = manifest or load_manifest(uri, store)
    tables = []
    for rel in manifest["quarantine"]["files"]:
        with store.open_random_access(storage.join(uri, rel)) as f:
            t = pq.read_table(f)
        tables.append(pa.table({n: t.column(n) if n in t.column_names else pa.nulls(t.num_rows, QUARANTINE_SCHEMA.field(n).type)
                                for n in QUARANTINE_SCHEMA.names}, schema=QUARANTINE_SCHEMA))
    return pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()
