"""One record of `gammaray prepare`: its options, its validation, and the files a shard becomes.

Shared by the in-process pass (pipelines/prepare.py) and the Ray tasks of the parallel one
(pipelines/prepare_parallel.py), so that both decide every record the same way.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.schema import RECORD_SCHEMA, REQUIRED_FIELDS, Invalid, Limits, Reason, validate_record

from . import storage
from .storage import Store
from .catalogue import PrepareError
from .ids import partition_bounds
from .image_refs import ImagePolicy, StorageFault, load_image
from .images import decode, resized_for_training
from .readers import CSV_FIELD_LIMIT, MAX_RECORD_BYTES, RawRow, read_source

T = TypeVar("T")
PARALLEL_MIN_BYTES = 2 * 2**20  # about 4,000 records of text: below it Ray's start-up (2-4 s) costs more than it buys
CHUNK_BYTES = 2 * 2**20

RECORD_FIELDS = [f.name for f in RECORD_SCHEMA if f.name != "sample_index"]


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
    cpus: int | None = None              # Ray tasks at once (None: every local CPU, or the cluster's); 1: in this process
    address: str | None = None           # a Ray cluster to run on (None: a running instance, $RAY_ADDRESS, or a local one)
    parallel_min_bytes: int = PARALLEL_MIN_BYTES  # smaller sources are prepared in this process (no Ray start-up)
    chunk_bytes: int = CHUNK_BYTES       # JSON Lines split into byte ranges, Parquet into row-group runs, of about this size: one Ray task each


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


def image_policy(opts: PrepareOptions, root: str | None) -> ImagePolicy:
    return ImagePolicy(root=root, max_bytes=opts.max_image_bytes, allow_outside=opts.allow_outside_paths)


def validate_raw(raw: RawRow, opts: PrepareOptions, store: Store,
                 policy: ImagePolicy | None = None, known_ids: Container[str | None] = frozenset()) -> Checked:
    """Validate one raw row. A row whose product_id is in `known_ids` gets the cheap checks only (its
    images are not fetched again). A `StorageFault` (the storage, not the record) propagates."""
    policy = policy or image_policy(opts, None)
    pid = raw_product_id(raw, opts)
    images: list[bytes] = []
    conversions: tuple[str, ...] = ()
    rec = err = None
    try:
        rec, conversions, known = _validate(raw, opts, store, policy, pid in known_ids, images)
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


def check_unknowing(raw: RawRow, opts: PrepareOptions, store: Store, policy: ImagePolicy,
                    maybe_known: Callable[[str | None], bool] = lambda pid: False) -> tuple:
    """What a Ray task that does not hold the catalogue's ids finds for one row, so that the driver
    decides it exactly as `validate_raw` with the ids would: (row, pid, cheap_ok, known_row_hash,
    full, fault, raw). cheap_ok: the row passes the checks a catalogued product_id gets (it is then
    already present, with known_row_hash); full: the whole validation, images read (None where a
    storage fault stopped it: `fault`, raised by the driver only if the record is not catalogued).
    A row `maybe_known` says is catalogued (the id partitions' answer) gets the cheap checks only,
    as validate_raw gives a catalogued one: full is None and raw comes back, for the driver to
    validate whole if the record is met again in the source."""
    pid = raw_product_id(raw, opts)
    if pid is not None and maybe_known(pid):
        as_known = validate_raw(raw, opts, store, policy, known_ids=(pid,))
        if as_known.known:
            return raw.row, pid, True, as_known.row_hash, None, None, raw
        return raw.row, pid, False, None, as_known, None, None  # the cheap checks fail: the full validation's finding
    try:
        full, fault = validate_raw(raw, opts, store, policy), None
    except StorageFault as err:
        full, fault = None, err
    if pid is None:
        return raw.row, pid, False, None, full, fault, None
    if full is not None and full.err is None:
        return raw.row, pid, True, full.row_hash, full, None, None
    # rejected, or stopped: whether the cheap checks alone pass (rare, so checked again)
    as_known = validate_raw(raw, opts, store, policy, known_ids=(pid,))
    return raw.row, pid, as_known.known, as_known.row_hash, full, fault, None


def _validate(raw: RawRow, opts: PrepareOptions, store: Store, policy: ImagePolicy,
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
    v["image"] = load_image(v["image"], raw.source, policy, store)
    images.append(v["image"])
    extra = v.get("extra_images")
    if extra is not None and isinstance(extra, (list, tuple)):
        v["extra_images"] = [load_image(e, raw.source, policy, store) for e in extra]
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


def raw_product_id(raw: RawRow, opts: PrepareOptions) -> str | None:
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


def write_shard(rows: list[dict], uri: str, row_group_size: int, store: Store,
                 write=None) -> dict:
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd", write_statistics=True)
    data = buf.getvalue()
    if write is None:
        store.write_bytes(uri, data)
    else:
        write(uri, data)
    groups = [min(row_group_size, len(rows) - s) for s in range(0, len(rows), row_group_size)]
    return {"num_rows": len(rows), "row_groups": groups, "sha256": hashlib.sha256(data).hexdigest(),
            "first_sample_index": rows[0]["sample_index"], "bytes": len(data)}


def record_bytes(rec: dict) -> int:
    n = len(rec["image"]) + sum(len(b) for b in rec.get("extra_images") or ())
    return n + sum(len(rec.get(k) or "") for k in ("title", "description", "category")) + 64


def in_order(rows: Iterator[RawRow], check: Callable[[RawRow], T], threads: int) -> Iterator[tuple[RawRow, T]]:
    """(raw, check(raw)) in source order; a bounded window of records checked in parallel threads
    (image fetches are I/O; decoding releases the GIL), each thread taking a run of consecutive rows
    (one future per row costs about a fifth of the CPU time of a row whose images are local)."""
    threads = max(1, threads)
    window, per_thread = threads * 16, 16
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        while True:
            chunk = list(itertools.islice(rows, window))
            if not chunk:
                return
            runs = [chunk[i:i + per_thread] for i in range(0, len(chunk), per_thread)]
            for run, found in zip(runs, pool.map(lambda run: [check(r) for r in run], runs)):
                yield from zip(run, found)
    finally:  # on a fault, drop the rest of the window instead of fetching it first
        pool.shutdown(wait=True, cancel_futures=True)


def file_rows(f: str, read: Callable[[], Iterator[RawRow]]) -> Iterator[RawRow]:
    """The rows `read()` gives of source file f; a fault of the file itself is one PrepareError naming it."""
    try:
        yield from read()
    except PrepareError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file is rows with reasons; this is the file itself
        raise PrepareError(f"cannot read source file {f}: {type(err).__name__}: {err}"[:600]) from err


def source_rows(files: list[str], opts: PrepareOptions, store: Store) -> Iterator[RawRow]:
    for f in files:
        yield from file_rows(f, lambda f=f: read_source(f, store, opts.csv_field_limit, opts.max_record_bytes))


HASHES_SCHEMA = pa.schema([pa.field("product_id", pa.string(), nullable=False), pa.field("row_hash", pa.int64())])


def hashes_path(shard_rel: str) -> str:
    """Beside each shard, what its rows said at the source (product_id, row_hash): edits are found
    without reading images. Written before the commit, like the shard."""
    return "record_hashes/" + shard_rel.rsplit("/", 1)[-1]


def hash_table_bytes(rows: list[dict], hashes: list[int | None]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"product_id": [r["product_id"] for r in rows], "row_hash": hashes}, schema=HASHES_SCHEMA),
                   buf, compression="zstd")
    return buf.getvalue()



def shard_id_rows(dst: str, shard: dict, store: Store) -> tuple[list[str], list[int | None]]:
    """The product_ids of one shard and their row hashes (None where the shard predates hashes)."""
    try:
        with store.open_random_access(storage.join(dst, hashes_path(shard["path"]))) as f:
            table = pq.read_table(f)
        if table.num_rows == shard["num_rows"]:
            return table.column("product_id").to_pylist(), table.column("row_hash").to_pylist()
    except Exception as err:  # noqa: BLE001 - missing (an older catalogue) or unreadable: use the shard
        if storage.is_storage_fault(err):
            raise
    with store.open_random_access(storage.join(dst, shard["path"])) as f:
        table = pq.read_table(f, columns=["product_id"])
    return table.column("product_id").to_pylist(), [None] * table.num_rows


def scan_shards(dst: str, shards: list[dict], store: Store, hash_fn: Callable[[str], int],
                count: int) -> list[tuple]:
    """The catalogued ids of `shards`, split into the `count` hash partitions: per partition
    (hashes, ids, row hashes, has a row hash), the arguments of `IdPartition.load`."""
    ids: list[str] = []
    rows: list[int | None] = []
    for shard in shards:
        i, r = shard_id_rows(dst, shard, store)
        ids += i
        rows += r
    hashes = np.fromiter((hash_fn(p) for p in ids), np.int64, len(ids))
    row_hash = np.fromiter((0 if h is None else h for h in rows), np.int64, len(rows))
    has = np.fromiter((h is not None for h in rows), bool, len(rows))
    part = np.searchsorted(np.asarray(partition_bounds(count), np.int64), hashes, "right")
    out = []
    for j in range(count):
        pos = np.flatnonzero(part == j)
        out.append((hashes[pos], [ids[i] for i in pos], row_hash[pos], has[pos]))
    return out


def shard_slices(shards: list[dict], rows: int) -> list[list[dict]]:
    """Consecutive shards in groups of about `rows` records (one scan each)."""
    out: list[list[dict]] = []
    size = rows
    for shard in shards:
        if size >= rows:
            out.append([])
            size = 0
        out[-1].append(shard)
        size += int(shard["num_rows"])
    return out
