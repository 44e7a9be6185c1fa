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

Length (about 720 lines): prepare is one pass (read, validate, shard, quarantine, manifest) whose
steps share the shard writer, the manifest and the cleanup of an uncommitted run; readers, images and
faults live in their own modules.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gammaray.config import StorageConfig
from gammaray.schema import (QUARANTINE_SCHEMA, RECORD_SCHEMA, REQUIRED_FIELDS, SCHEMA_VERSION, Invalid, Limits,
                             Reason, validate_record)

from . import storage
from .catalogue import PrepareError, WriterLock, commit_manifest, load_manifest, read_manifest
from .image_refs import ImagePolicy, StorageFault, load_image, source_root
from .images import decode, resized_for_training
from .readers import CSV_FIELD_LIMIT, MAX_RECORD_BYTES, RawRow, read_source, source_files

RECORD_FIELDS = [f.name for f in RECORD_SCHEMA if f.name != "sample_index"]

__all__ = ["PrepareOptions", "PrepareResult", "PrepareError", "prepare", "load_manifest", "read_quarantine",
           "validate_raw", "canonical_uri"]


@dataclass
class PrepareOptions:
    column_map: dict[str, str] = field(default_factory=dict)  # record field -> source column
    max_records_per_shard: int = 1000
    target_shard_bytes: int = 128 * 2**20
    row_group_size: int = 128
    max_image_pixels: int = 25_000_000
    max_image_bytes: int = 64 * 2**20    # checked before an image is read (data.max_image_bytes)
    max_text_chars: int = 8192
    csv_field_limit: int = CSV_FIELD_LIMIT
    max_record_bytes: int = MAX_RECORD_BYTES  # one JSONL/CSV line; longer is oversized_record, skipped unread
    allow_outside_paths: bool = False    # local image paths may leave the source folder (data.allow_outside_paths)
    check_images: bool = True
    check_draft_side: int | None = 256  # JPEGs are checked at a reduced decode scale (every byte still read)
    image_max_side: int | None = None   # store images shrunk to this longer side (the source is untouched)
    io_threads: int = 8
    progress: bool = True


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


# --------------------------------------------------------------------------------------------
# validating one record


@dataclass
class Checked:
    """What validation found for one raw row."""

    rec: dict | None                    # the clean record (without sample_index), or None
    err: tuple[str, str] | None         # (reason, detail), or None
    pid: str | None                     # the product_id the row gives, also for a bad row
    key: str | None = None              # the row's identity across runs (None: already in the catalogue)
    conversions: tuple[str, ...] = ()   # what decoding changed in its images
    known: bool = False                 # its product_id is already in the catalogue: images not read
    row_hash: int | None = None         # what the row says about the record's fields (edits at the source)


def _apply_map(values: dict[str, Any], column_map: dict[str, str]) -> dict[str, Any]:
    out = dict(values)
    for field_name, column in column_map.items():
        out[field_name] = values.get(column)
    return out


def _missing_columns(raw: RawRow, opts: PrepareOptions) -> list[str]:
    if raw.columns is None:
        return []
    return [f for f in REQUIRED_FIELDS if opts.column_map.get(f, f) not in raw.columns]


def _policy(opts: PrepareOptions, root: str | None) -> ImagePolicy:
    return ImagePolicy(root=root, max_bytes=opts.max_image_bytes, allow_outside=opts.allow_outside_paths)


def validate_raw(raw: RawRow, opts: PrepareOptions, storage_cfg: StorageConfig | None,
                 policy: ImagePolicy | None = None, known_ids: frozenset[str] | set[str] = frozenset()) -> Checked:
    """Validate one raw row. A row whose product_id is in `known_ids` gets the cheap checks only (its
    images are not fetched again). A `StorageFault` (the storage, not the record) propagates."""
    policy = policy or _policy(opts, None)
    pid = _raw_product_id(raw, opts)
    images: list[bytes] = []
    conversions: tuple[str, ...] = ()
    rec = err = None
    try:
        rec, conversions, known = _validate(raw, opts, storage_cfg, policy, pid in known_ids, images)
        if known:
            return Checked(None, None, pid, known=True, row_hash=row_hash(raw, opts))
    except Invalid as bad:
        err = (bad.reason, bad.detail)
    except (StorageFault, MemoryError):
        raise
    except RecursionError:
        err = (Reason.NESTING_TOO_DEEP, "the record is nested too deeply to validate")
    except Exception as unexpected:  # noqa: BLE001 - one odd record must not abort a catalogue
        err = (Reason.INVALID_RECORD, f"{type(unexpected).__name__}: {unexpected}"[:300])
    return Checked(rec, err, pid, _content_key(raw, images), conversions, row_hash=row_hash(raw, opts) if rec else None)


def _validate(raw: RawRow, opts: PrepareOptions, storage_cfg: StorageConfig | None, policy: ImagePolicy,
              known: bool, images: list[bytes]) -> tuple[dict | None, tuple[str, ...], bool]:
    if raw.error is not None:
        raise Invalid(*raw.error)
    missing = _missing_columns(raw, opts)
    if missing:
        raise Invalid(Reason.MISSING_COLUMN, f"source has no column for {missing}"
                      + (f" (mapped from {[opts.column_map[m] for m in missing if m in opts.column_map]})"
                         if any(m in opts.column_map for m in missing) else ""))
    v = _apply_map(raw.values or {}, opts.column_map)
    limits = Limits(max_text_chars=opts.max_text_chars, max_image_bytes=opts.max_image_bytes)
    if v.get("image") is None:
        raise Invalid(Reason.MISSING_FIELD, "field 'image' is missing")
    # cheap checks first: no image fetch for a record that is bad anyway, or already in the catalogue
    validate_record({**v, "image": b"x", "extra_images": None}, limits)
    if known:
        return None, (), True
    v["image"] = load_image(v["image"], raw.source, policy, storage_cfg)
    images.append(v["image"])
    extra = v.get("extra_images")
    if extra is not None and isinstance(extra, (list, tuple)):
        v["extra_images"] = [load_image(e, raw.source, policy, storage_cfg) for e in extra]
        images.extend(v["extra_images"])
    rec = validate_record(v, limits)
    conversions: list[str] = []
    draft = (opts.check_draft_side, opts.check_draft_side) if opts.check_draft_side else None
    if opts.image_max_side:  # decoded anyway: this is the check too
        rec["image"], done = resized_for_training(rec["image"], opts.image_max_side, opts.max_image_pixels)
        conversions += done
        if rec["extra_images"]:
            extra = [resized_for_training(b, opts.image_max_side, opts.max_image_pixels) for b in rec["extra_images"]]
            rec["extra_images"] = [b for b, _ in extra]
            conversions += [c for _, done in extra for c in done]
    elif opts.check_images:
        for b in [rec["image"], *(rec["extra_images"] or ())]:
            conversions += decode(b, opts.max_image_pixels, draft)[1]
    return rec, tuple(conversions), False


def _raw_product_id(raw: RawRow, opts: PrepareOptions) -> str | None:
    if raw.values is None:
        return None
    v = raw.values.get(opts.column_map.get("product_id", "product_id"))
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None  # a nested value: validation says what is wrong with it
    return printable(str(v).strip()[:512]) or None


def printable(text: str) -> str:
    """`text` as UTF-8 can hold it: a lone surrogate becomes its escape (a quarantine entry must be writable)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def row_hash(raw: RawRow, opts: PrepareOptions) -> int | None:
    """The record fields as the (mapped) row gives them, hashed (sha256 cut to a signed 64 bits: one
    small int per catalogued record in memory): images by reference (or by the hash of inline bytes),
    so a known record is compared without reading its images."""
    if raw.values is None:
        return None
    v = _apply_map(raw.values, opts.column_map)
    try:
        text = json.dumps({f: v.get(f) for f in RECORD_FIELDS}, sort_keys=True, default=_jsonable)
        return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little", signed=True)
    except (ValueError, TypeError, RecursionError):
        return None


def _content_key(raw: RawRow, images: list[bytes]) -> str:
    """sha256 of what the row says (all its columns) and of the bytes of the images it names. A row
    that could not be parsed is keyed by its raw bytes (`digest`), so a renamed copy of the source
    names the same record; only a row with neither (a damaged Parquet row group or tar) is keyed by
    its place in the (canonically named) source."""
    h = hashlib.sha256()
    try:
        if raw.values is None:
            if raw.digest is not None:
                return hashlib.sha256(f"raw\0{raw.digest}".encode()).hexdigest()
            raise ValueError("no values")
        h.update(json.dumps(raw.values, sort_keys=True, default=_jsonable).encode("utf-8", "surrogatepass"))
    except (ValueError, TypeError, RecursionError):
        h = hashlib.sha256(f"row\0{canonical_uri(raw.source)}\0{raw.row}".encode("utf-8", "surrogatepass"))
    for b in images:
        h.update(hashlib.sha256(b).digest())
    return h.hexdigest()


def _jsonable(obj: Any) -> str:
    if isinstance(obj, (bytes, bytearray)):
        return "sha256:" + hashlib.sha256(obj).hexdigest()
    return repr(obj)


def canonical_uri(uri: str) -> str:
    """One spelling per location: a local path (relative, absolute, file://, via symlinks) becomes
    its real absolute path; s3:// and other URIs lose duplicate and trailing slashes."""
    proto = storage.protocol(uri)
    if proto == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return os.path.realpath(os.path.abspath(path))
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{re.sub('/+', '/', rest).rstrip('/')}"


# --------------------------------------------------------------------------------------------
# writing


def _write_shard(rows: list[dict], uri: str, row_group_size: int, storage_cfg: StorageConfig | None,
                 write=None) -> dict:
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd", write_statistics=True)
    data = buf.getvalue()
    if write is None:
        storage.write_bytes(uri, data, storage_cfg)
    else:
        write(uri, data)
    groups = [min(row_group_size, len(rows) - s) for s in range(0, len(rows), row_group_size)]
    return {"num_rows": len(rows), "row_groups": groups, "sha256": hashlib.sha256(data).hexdigest(),
            "first_sample_index": rows[0]["sample_index"], "bytes": len(data)}


def _record_bytes(rec: dict) -> int:
    n = len(rec["image"]) + sum(len(b) for b in rec.get("extra_images") or ())
    return n + sum(len(rec.get(k) or "") for k in ("title", "description", "category")) + 64


def _validated(rows: Iterator[RawRow], opts: PrepareOptions, storage_cfg: StorageConfig | None,
               policy: ImagePolicy, known_ids: set[str]) -> Iterator[tuple[RawRow, Checked]]:
    """(raw, checked) in source order; a bounded window of records validated in parallel threads
    (image fetches are I/O; decoding releases the GIL)."""
    window = max(1, opts.io_threads) * 16
    pool = ThreadPoolExecutor(max_workers=max(1, opts.io_threads))
    try:
        while True:
            chunk = list(itertools.islice(rows, window))
            if not chunk:
                return
            yield from zip(chunk, pool.map(lambda r: validate_raw(r, opts, storage_cfg, policy, known_ids), chunk))
    finally:  # on a fault, drop the rest of the window instead of fetching it first
        pool.shutdown(wait=True, cancel_futures=True)


def _source_rows(files: list[str], opts: PrepareOptions, storage_cfg: StorageConfig | None) -> Iterator[RawRow]:
    for f in files:
        try:
            yield from read_source(f, storage_cfg, opts.csv_field_limit, opts.max_record_bytes)
        except PrepareError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged file is rows with reasons; this is the file itself
            raise PrepareError(f"cannot read source file {f}: {type(err).__name__}: {err}"[:600]) from err


def new_manifest() -> dict:
    return {"schema_version": SCHEMA_VERSION, "num_records": 0, "next_sample_index": 0, "shards": [],
            "sources": [], "categories": [], "locales": [], "quarantine": {"count": 0, "by_reason": {}, "files": []}}


def prepare(
    src: str,
    dst: str,
    options: PrepareOptions | None = None,
    storage_cfg: StorageConfig | None = None,
) -> PrepareResult:
    t0 = time.perf_counter()
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
    try:
        files = source_files(src, storage_cfg)
        src_is_dir = storage.is_dir(src, storage_cfg)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # noqa: BLE001 - the source's storage itself
        raise PrepareError(f"cannot list source {src}: {type(err).__name__}: {err}"[:600]) from err
    _refuse_destination_inside_source(src, dst, src_is_dir)
    with WriterLock(dst, storage_cfg) as lock:
        return _prepare_locked(src, src_is_dir, files, dst, opts, storage_cfg, lock, t0)


def _prepare_locked(src: str, src_is_dir: bool, files: list[str], dst: str, opts: PrepareOptions,
                    storage_cfg: StorageConfig | None, lock: WriterLock, t0: float) -> PrepareResult:
    manifest, etag = read_manifest(dst, storage_cfg)
    if manifest is not None:
        version = int(manifest["schema_version"])
        if version != SCHEMA_VERSION:
            raise ValueError(f"{storage.join(dst, 'manifest.json')}: catalogue has schema version {version}; appending "
                             f"needs version {SCHEMA_VERSION}: prepare into a new destination")
        manifest.setdefault("locales", [])
    orphans = _remove_uncommitted(dst, manifest, storage_cfg)
    if manifest is None:
        manifest = new_manifest()
        known, old_quarantine = {}, []
    else:
        known = _known_records(dst, manifest, storage_cfg)
        old_quarantine = _read_quarantine_entries(dst, manifest, storage_cfg)
    run = _Run(dst, manifest, opts, storage_cfg, lock)
    try:
        res = _prepare_pass(src, src_is_dir, files, run, known, old_quarantine, etag, t0)
    except OSError as err:
        if not _storage_full(err):
            raise
        run.discard()
        raise PrepareError(f"storage full at {run.writing or dst} ({_os_text(err)}); nothing of this run was committed "
                           "and its partial files were removed: free space and run the same command again") from None
    except BaseException:
        run.discard()
        raise
    res.num_orphans_removed = orphans
    return res


class _Run:
    """The files one prepare writes before its commit: removed again if it does not commit."""

    def __init__(self, dst: str, manifest: dict, opts: PrepareOptions, storage_cfg: StorageConfig | None,
                 lock: WriterLock):
        self.dst, self.manifest, self.opts, self.storage_cfg, self.lock = dst, manifest, opts, storage_cfg, lock
        self.first_part = len(manifest["shards"])
        self.shard_uris: list[str] = []
        self.uncommitted: list[str] = []
        self.writing: str | None = None
        self.committed = False

    def write(self, uri: str, data: bytes) -> None:
        self.lock.check()
        self.writing = uri
        self.uncommitted.append(uri)
        storage.write_bytes(uri, data, self.storage_cfg)
        self.writing = None

    def write_shard(self, rows: list[dict], hashes: list[int | None]) -> None:
        rel = f"shards/part-{self.first_part + len(self.shard_uris):05d}.parquet"
        uri = storage.join(self.dst, rel)
        info = _write_shard(rows, uri, self.opts.row_group_size, self.storage_cfg, self.write)
        self.write(storage.join(self.dst, _hashes_path(rel)), _hash_table_bytes(rows, hashes))
        self.manifest["shards"].append({"path": rel, **info})
        self.shard_uris.append(uri)

    def discard(self) -> None:
        try:
            self.lock.check()
        except PrepareError:
            return  # another prepare holds DST now: the same file names may be its files
        if not self.committed:
            for uri in self.uncommitted:
                _remove_quietly(uri, self.storage_cfg)


def _prepare_pass(src: str, src_is_dir: bool, files: list[str], run: _Run, known: dict[str, int | None], old_quarantine: list[dict],
                  etag: str | None, t0: float) -> PrepareResult:
    dst, manifest, opts, storage_cfg = run.dst, run.manifest, run.opts, run.storage_cfg
    policy = _policy(opts, source_root(src, src_is_dir))
    rows = _source_rows(files, opts, storage_cfg)

    new_ids: set[str] = set()             # product_ids this run wrote (the catalogue's are in `known`)
    known_seen: set[str] = set()          # product_ids of the catalogue this run met in the source
    old_keys = {e["record_key"] for e in old_quarantine}
    new_quarantine: dict[str, dict] = {}  # record_key -> entry, this run's findings
    first_seen: list[dict] = []           # entries whose record was not quarantined before
    decided_bad: set[str] = set()         # product_ids this run quarantined (the ones it wrote are in new_ids)
    read_sources: set[str] = set()
    changed: list[str] = []
    conversions: Counter = Counter()
    num_input = already = written = repeated = 0
    next_index = int(manifest["next_sample_index"])
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
    for raw, checked in _validated(rows, opts, storage_cfg, policy, known):
        num_input += 1
        bar.update(1)
        read_sources.add(canonical_uri(raw.source))
        if checked.known:
            if checked.pid not in known_seen:
                known_seen.add(checked.pid)
                already += 1
                stored = known[checked.pid]
                if stored is not None and checked.row_hash is not None and stored != checked.row_hash:
                    changed.append(checked.pid)
                continue
            # the same catalogued product_id again in the source: the duplicate the first run quarantined
            checked = validate_raw(raw, opts, storage_cfg, policy)
        rec, err = checked.rec, checked.err
        if err is None and rec is not None:
            if rec["product_id"] in new_ids or rec["product_id"] in known:
                err = (Reason.DUPLICATE_ID, f"product_id {printable(rec['product_id'])!r} appears earlier in the source")
            else:
                new_ids.add(rec["product_id"])
                conversions.update(checked.conversions)
                rec["sample_index"] = next_index
                next_index += 1
                written += 1
                if rec.get("category"):
                    cats.add(rec["category"])
                if rec.get("locale"):
                    locales.add(rec["locale"])
                for loc, _ in rec.get("titles") or ():
                    locales.add(loc)
                buffer.append(rec)
                hashes.append(checked.row_hash)
                buffer_bytes += _record_bytes(rec)
                if len(buffer) >= opts.max_records_per_shard or buffer_bytes >= opts.target_shard_bytes:
                    flush()
                bar.set_postfix(shards=len(run.shard_uris), bad=len(new_quarantine), refresh=False)
                continue
        if checked.pid:
            decided_bad.add(checked.pid)
        entry = {"product_id": checked.pid, "source": printable(raw.source), "row": raw.row, "reason": err[0],
                 "detail": printable(str(err[1])[:500]), "stage": "prepare", "epoch": None, "record_key": checked.key}
        if checked.key in new_quarantine or checked.key in old_keys:
            repeated += 1  # the same record (same content) as one quarantined before
        else:
            first_seen.append(entry)
        new_quarantine[checked.key] = entry
    flush()
    bar.close()

    # this run's findings replace earlier entries of the records it decided, and of unreadable rows of
    # the files it read again; entries of records it did not see stay
    kept, readmitted = [], 0
    for e in old_quarantine:
        if e["record_key"] in new_quarantine:
            continue
        if e["product_id"] is not None and (e["product_id"] in new_ids or e["product_id"] in decided_bad):
            readmitted += e["product_id"] in new_ids
            continue
        if e["product_id"] is None and canonical_uri(e["source"]) in read_sources:
            continue
        kept.append(e)
    current = kept + list(new_quarantine.values())
    quarantine_changed = _signature(current) != _signature(old_quarantine)
    source = canonical_uri(src)
    result = dict(num_input=num_input, written=written, already=already, first_seen=first_seen, repeated=repeated,
                  readmitted=readmitted, shard_uris=run.shard_uris, conversions=conversions, changed=changed, t0=t0)
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
    manifest["next_sample_index"] = next_index
    if source not in manifest["sources"]:
        manifest["sources"].append(source)
    manifest["categories"] = sorted(cats)
    manifest["locales"] = sorted(locales)
    run.lock.check()
    run.writing = storage.join(dst, "manifest.json")
    commit_manifest(dst, manifest, etag, storage_cfg)
    run.committed, run.writing = True, None
    for rel in old_files:  # superseded by the new quarantine file; readers only follow the manifest
        if rel not in manifest["quarantine"]["files"]:
            _remove_quietly(storage.join(dst, rel), storage_cfg)
    return _result(dst, manifest, **result)


def _result(dst, manifest, *, num_input, written, already, first_seen, repeated, readmitted, shard_uris, conversions,
            changed, t0) -> PrepareResult:
    return PrepareResult(dst=dst, num_input=num_input, num_written=written, num_already_present=already,
                         num_quarantined=len(first_seen),
                         quarantine_by_reason=dict(Counter(e["reason"] for e in first_seen)),
                         shards_written=shard_uris, manifest=manifest, wall_s=time.perf_counter() - t0,
                         image_conversions=dict(sorted(conversions.items())), num_already_quarantined=repeated,
                         num_readmitted=readmitted, changed_ids=changed)


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


def _remove_quietly(uri: str, storage_cfg: StorageConfig | None) -> None:
    try:
        fs, path = storage.resolve(uri, storage_cfg)
        fs.delete_file(path)
    except Exception:  # noqa: BLE001 - an orphan file is harmless: the manifest no longer names it
        pass


HASHES_SCHEMA = pa.schema([pa.field("product_id", pa.string(), nullable=False), pa.field("row_hash", pa.int64())])
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXT = ("no space left", "disk quota exceeded", "file too large", "quotaexceeded", "entitytoolarge")


def _hashes_path(shard_rel: str) -> str:
    """Beside each shard, what its rows said at the source (product_id, row_hash): edits are found
    without reading images. Written before the commit, like the shard."""
    return "record_hashes/" + shard_rel.rsplit("/", 1)[-1]


def _hash_table_bytes(rows: list[dict], hashes: list[int | None]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"product_id": [r["product_id"] for r in rows], "row_hash": hashes}, schema=HASHES_SCHEMA),
                   buf, compression="zstd")
    return buf.getvalue()


def _known_records(dst: str, manifest: dict, storage_cfg: StorageConfig | None) -> dict[str, int | None]:
    """product_id -> row_hash of every record in the catalogue (None where the shard predates hashes)."""
    known: dict[str, int | None] = {}
    for shard in manifest["shards"]:
        try:
            with storage.open_random_access(storage.join(dst, _hashes_path(shard["path"])), storage_cfg) as f:
                table = pq.read_table(f)
            if table.num_rows == shard["num_rows"]:
                known.update(zip(table.column("product_id").to_pylist(), table.column("row_hash").to_pylist()))
                continue
        except Exception as err:  # noqa: BLE001 - missing (an older catalogue) or unreadable: use the shard
            if storage.is_storage_fault(err):
                raise
        with storage.open_random_access(storage.join(dst, shard["path"]), storage_cfg) as f:
            table = pq.read_table(f, columns=["product_id"])
        known.update(dict.fromkeys(table.column("product_id").to_pylist()))
    return known


def _remove_uncommitted(dst: str, manifest: dict | None, storage_cfg: StorageConfig | None) -> int:
    """Under the lock, a shard, hash, quarantine or shard-index file the manifest does not name was left by
    a prepare that died before its commit: nobody will ever read it."""
    named = set()
    for shard in (manifest or {}).get("shards", []):
        named.update((shard["path"], _hashes_path(shard["path"])))
    named.update((manifest or {}).get("quarantine", {}).get("files", []))
    if (manifest or {}).get("index"):
        named.add(manifest["index"]["path"])  # the shard index the header names (pipelines/catalogue.py)
    removed = 0
    for folder, pattern in (("shards", r"part-\d+\.parquet"), ("record_hashes", r"part-\d+\.parquet"),
                            ("quarantine", r"prepare-\d+\.parquet"), ("index", r"shards-[0-9a-f]+\.parquet")):
        base = storage.join(dst, folder)
        try:
            found = storage.list_files(base, storage=storage_cfg)
        except FileNotFoundError:
            continue
        for uri in found:
            name = uri.rsplit("/", 1)[-1]
            if re.fullmatch(pattern, name) and f"{folder}/{name}" not in named:
                _remove_quietly(uri, storage_cfg)
                removed += 1
    return removed


def _storage_full(err: OSError) -> bool:
    return getattr(err, "errno", None) in _FULL_ERRNOS or any(t in str(err).lower() for t in _FULL_TEXT)


def _os_text(err: OSError) -> str:
    return str(err).splitlines()[0][:300]


def _read_quarantine_entries(dst: str, manifest: dict, storage_cfg: StorageConfig | None) -> list[dict]:
    """The current quarantine as entries with a record_key (entries of catalogues prepared before
    keys existed get one from their place in the source)."""
    entries = read_quarantine(dst, manifest, storage_cfg).to_pylist()
    for e in entries:
        if not e.get("record_key"):
            where = f"row\0{canonical_uri(e['source'] or '')}\0{e['row']}"
            e["record_key"] = hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()
    return list({e["record_key"]: e for e in entries}.values())


def read_quarantine(uri: str, manifest: dict | None = None, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """Every record `prepare` currently holds in quarantine for the catalogue at uri, as one table."""
    manifest = manifest or load_manifest(uri, storage_cfg)
    tables = []
    for rel in manifest["quarantine"]["files"]:
        with storage.open_random_access(storage.join(uri, rel), storage_cfg) as f:
            t = pq.read_table(f)
        tables.append(pa.table({n: t.column(n) if n in t.column_names else pa.nulls(t.num_rows, QUARANTINE_SCHEMA.field(n).type)
                                for n in QUARANTINE_SCHEMA.names}, schema=QUARANTINE_SCHEMA))
    return pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()
