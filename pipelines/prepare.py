"""`gammaray prepare SRC DST`: raw catalogue -> validated Parquet shards with a dense sample_index.

SRC is a JSONL, CSV, Parquet or WebDataset (.tar, img2dataset layout) file, or a folder of them, on
any storage (local path, file://, s3://, any fsspec URL). Images are inline bytes, paths relative to
the source file, or URIs on any of those filesystems. A column map renames source columns to record
fields. DST receives

    DST/shards/part-00000.parquet ...   RECORD_SCHEMA rows, row groups of `row_group_size`
    DST/manifest.json                    counts, schema version, sources, shards and their row groups
    DST/quarantine/prepare-00000.parquet every rejected record: product_id, source, row, reason

Shards are cut at `max_records_per_shard` records or `target_shard_bytes` bytes, whichever comes
first. The source is streamed: memory holds one shard plus the validation window, not the catalogue.

Idempotent: re-running on the same source writes nothing (same shards, same indices); preparing the
same source into an empty destination writes byte-identical shards. Append-safe: records whose
product_id is new get the next free sample_index and go to new shards; old shards are never
rewritten, so old indices (the keys of the per-sample loss state) never move.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gammaray.config import StorageConfig
from gammaray.schema import (QUARANTINE_SCHEMA, RECORD_SCHEMA, REQUIRED_FIELDS, SCHEMA_VERSION, Invalid, Limits,
                             Reason, check_readable, validate_record)

from . import storage
from .images import BadImage, open_checked
from .readers import RawRow, read_source, source_files

RECORD_FIELDS = [f.name for f in RECORD_SCHEMA if f.name != "sample_index"]


@dataclass
class PrepareOptions:
    column_map: dict[str, str] = field(default_factory=dict)  # record field -> source column
    max_records_per_shard: int = 1000
    target_shard_bytes: int = 128 * 2**20
    row_group_size: int = 128
    max_image_pixels: int = 25_000_000
    max_text_chars: int = 8192
    check_images: bool = True
    check_draft_side: int | None = 256  # JPEGs are checked at a reduced decode scale (every byte still read)
    io_threads: int = 8
    progress: bool = True


@dataclass
class PrepareResult:
    dst: str
    num_input: int
    num_written: int
    num_already_present: int
    num_quarantined: int
    quarantine_by_reason: dict[str, int]
    shards_written: list[str]
    manifest: dict
    wall_s: float = 0.0

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
        lines.append(f"  total in catalogue {self.manifest['num_records']}  (schema version {self.manifest['schema_version']})")
        if self.wall_s:
            lines.append(f"  time               {self.wall_s:.1f} s")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"num_input": self.num_input, "num_written": self.num_written,
                "num_already_present": self.num_already_present, "num_quarantined": self.num_quarantined,
                "quarantine_by_reason": self.quarantine_by_reason, "shards_written": self.shards_written,
                "num_records": self.manifest["num_records"], "wall_s": round(self.wall_s, 2)}


# --------------------------------------------------------------------------------------------
# validating one record


def _apply_map(values: dict[str, Any], column_map: dict[str, str]) -> dict[str, Any]:
    out = dict(values)
    for field_name, column in column_map.items():
        out[field_name] = values.get(column)
    return out


def _missing_columns(raw: RawRow, opts: PrepareOptions) -> list[str]:
    if raw.columns is None:
        return []
    return [f for f in REQUIRED_FIELDS if opts.column_map.get(f, f) not in raw.columns]


def _load_image(value: Any, source_uri: str, storage_cfg: StorageConfig | None) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and "bytes" in value:  # HF datasets / parquet struct style
        return bytes(value["bytes"] or b"")
    if not isinstance(value, str):
        raise Invalid(Reason.WRONG_TYPE, f"field 'image' must be bytes or a path/URI, got {type(value).__name__}")
    ref = value.strip()
    if not ref:
        raise Invalid(Reason.MISSING_FIELD, "field 'image' is an empty path")
    if not storage.is_absolute(ref):
        ref = storage.join(storage.parent(source_uri), ref)
    try:
        return storage.read_bytes(ref, storage_cfg)
    except Exception as err:  # noqa: BLE001 - classify: a missing file is data, anything else is not
        if storage.is_not_found(err):
            raise Invalid(Reason.IMAGE_NOT_FOUND, ref) from None
        raise RuntimeError(f"prepare: cannot read image {ref} (record {source_uri}): {type(err).__name__}: {err}") from err


def validate_raw(raw: RawRow, opts: PrepareOptions, storage_cfg: StorageConfig | None) -> tuple[dict | None, tuple[str, str] | None]:
    """(clean record without sample_index, None) or (None, (reason, detail))."""
    if raw.error is not None:
        return None, raw.error
    missing = _missing_columns(raw, opts)
    if missing:
        return None, (Reason.MISSING_COLUMN, f"source has no column for {missing}"
                      + (f" (mapped from {[opts.column_map[m] for m in missing if m in opts.column_map]})"
                         if any(m in opts.column_map for m in missing) else ""))
    v = _apply_map(raw.values or {}, opts.column_map)
    limits = Limits(max_text_chars=opts.max_text_chars)
    try:
        if v.get("image") is None:
            raise Invalid(Reason.MISSING_FIELD, "field 'image' is missing")
        # cheap checks first: no image fetch for a record that is bad anyway
        validate_record({**v, "image": b"x", "extra_images": None}, limits)
        v["image"] = _load_image(v["image"], raw.source, storage_cfg)
        extra = v.get("extra_images")
        if extra is not None and isinstance(extra, (list, tuple)):
            v["extra_images"] = [_load_image(e, raw.source, storage_cfg) for e in extra]
        rec = validate_record(v, limits)
        if opts.check_images:
            draft = (opts.check_draft_side, opts.check_draft_side) if opts.check_draft_side else None
            open_checked(rec["image"], opts.max_image_pixels, draft)
            for b in rec["extra_images"] or ():
                open_checked(b, opts.max_image_pixels, draft)
    except (Invalid, BadImage) as bad:
        return None, (bad.reason, bad.detail)
    return rec, None


# --------------------------------------------------------------------------------------------
# writing


def _write_shard(rows: list[dict], uri: str, row_group_size: int, storage_cfg: StorageConfig | None) -> dict:
    table = pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd", write_statistics=True)
    data = buf.getvalue()
    storage.write_bytes(uri, data, storage_cfg)
    groups = [min(row_group_size, len(rows) - s) for s in range(0, len(rows), row_group_size)]
    return {"num_rows": len(rows), "row_groups": groups, "sha256": hashlib.sha256(data).hexdigest(),
            "first_sample_index": rows[0]["sample_index"], "bytes": len(data)}


def _record_bytes(rec: dict) -> int:
    n = len(rec["image"]) + sum(len(b) for b in rec.get("extra_images") or ())
    return n + sum(len(rec.get(k) or "") for k in ("title", "description", "category")) + 64


def _validated(rows: Iterator[RawRow], opts: PrepareOptions, storage_cfg: StorageConfig | None):
    """(raw, (rec, err)) in source order; a bounded window of records validated in parallel threads
    (image fetches are I/O; decoding releases the GIL)."""
    window = max(1, opts.io_threads) * 16
    with ThreadPoolExecutor(max_workers=max(1, opts.io_threads)) as pool:
        while True:
            chunk = list(itertools.islice(rows, window))
            if not chunk:
                return
            yield from zip(chunk, pool.map(lambda r: validate_raw(r, opts, storage_cfg), chunk))


def new_manifest() -> dict:
    return {"schema_version": SCHEMA_VERSION, "num_records": 0, "next_sample_index": 0, "shards": [],
            "sources": [], "categories": [], "locales": [], "quarantine": {"count": 0, "by_reason": {}, "files": []}}


def prepare(
    src: str,
    dst: str,
    options: PrepareOptions | None = None,
    storage_cfg: StorageConfig | None = None,
) -> PrepareResult:
    import time

    t0 = time.perf_counter()
    opts = options or PrepareOptions()
    if opts.row_group_size < 1 or opts.max_records_per_shard < 1 or opts.target_shard_bytes < 1:
        raise ValueError("prepare: row_group_size, max_records_per_shard and target_shard_bytes must be >= 1")
    unknown = sorted(set(opts.column_map) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"prepare: --map names unknown record field(s) {unknown}; fields: {RECORD_FIELDS}")
    manifest_uri = storage.join(dst, "manifest.json")
    if storage.exists(manifest_uri, storage_cfg):
        manifest = storage.read_json(manifest_uri, storage_cfg)
        version = check_readable(manifest.get("schema_version"), manifest_uri)
        if version != SCHEMA_VERSION:
            raise ValueError(f"{manifest_uri}: catalogue has schema version {version}; appending needs version "
                             f"{SCHEMA_VERSION}: prepare into a new destination")
        manifest.setdefault("locales", [])
        known_ids = _known_ids(dst, manifest, storage_cfg)
        known_bad = _known_quarantine(dst, manifest, storage_cfg)
    else:
        manifest = new_manifest()
        known_ids, known_bad = set(), set()

    files = source_files(src, storage_cfg)
    rows = (r for f in files for r in read_source(f, storage_cfg))

    seen: set[str] = set(known_ids)
    quarantined: list[dict] = []
    num_input = already = written = 0
    next_index = int(manifest["next_sample_index"])
    first_part = len(manifest["shards"])
    shard_uris: list[str] = []
    buffer: list[dict] = []
    buffer_bytes = 0
    cats = set(manifest.get("categories", []))
    locales = set(manifest.get("locales", []))

    def flush() -> None:
        nonlocal buffer, buffer_bytes
        if not buffer:
            return
        rel = f"shards/part-{first_part + len(shard_uris):05d}.parquet"
        info = _write_shard(buffer, storage.join(dst, rel), opts.row_group_size, storage_cfg)
        manifest["shards"].append({"path": rel, **info})
        shard_uris.append(storage.join(dst, rel))
        buffer, buffer_bytes = [], 0

    bar = tqdm(desc="prepare", unit="rec", disable=not opts.progress, dynamic_ncols=True)
    for raw, (rec, err) in _validated(rows, opts, storage_cfg):
        num_input += 1
        bar.update(1)
        pid = _raw_product_id(raw, opts)
        if (raw.source, raw.row) in known_bad:
            already += 1  # quarantined by an earlier run: keep the run idempotent
            continue
        if err is None and rec is not None:
            if rec["product_id"] in known_ids:
                already += 1
                continue
            if rec["product_id"] in seen:
                err = (Reason.DUPLICATE_ID, f"product_id {rec['product_id']!r} appears earlier in the source")
            else:
                seen.add(rec["product_id"])
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
                buffer_bytes += _record_bytes(rec)
                if len(buffer) >= opts.max_records_per_shard or buffer_bytes >= opts.target_shard_bytes:
                    flush()
                bar.set_postfix(shards=len(shard_uris), bad=len(quarantined), refresh=False)
                continue
        quarantined.append({"product_id": pid, "source": raw.source, "row": raw.row, "reason": err[0],
                            "detail": str(err[1])[:500], "stage": "prepare", "epoch": None})
    flush()
    bar.close()

    by_reason = Counter(q["reason"] for q in quarantined)
    if quarantined:
        qrel = f"quarantine/prepare-{len(manifest['quarantine']['files']):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA), buf)
        storage.write_bytes(storage.join(dst, qrel), buf.getvalue(), storage_cfg)
        manifest["quarantine"]["files"].append(qrel)
        manifest["quarantine"]["count"] += len(quarantined)
        for reason, n in sorted(by_reason.items()):
            manifest["quarantine"]["by_reason"][reason] = manifest["quarantine"]["by_reason"].get(reason, 0) + n

    if written or quarantined or src not in manifest["sources"]:
        manifest["num_records"] = int(manifest["num_records"]) + written
        manifest["next_sample_index"] = next_index
        if src not in manifest["sources"]:
            manifest["sources"].append(src)
        manifest["categories"] = sorted(cats)
        manifest["locales"] = sorted(locales)
        storage.write_json(manifest_uri, manifest, storage_cfg)

    return PrepareResult(dst=dst, num_input=num_input, num_written=written, num_already_present=already,
                         num_quarantined=len(quarantined), quarantine_by_reason=dict(by_reason),
                         shards_written=shard_uris, manifest=manifest, wall_s=time.perf_counter() - t0)


def _raw_product_id(raw: RawRow, opts: PrepareOptions) -> str | None:
    if raw.values is None:
        return None
    v = raw.values.get(opts.column_map.get("product_id", "product_id"))
    return None if v is None else str(v)[:512]


def _known_ids(dst: str, manifest: dict, storage_cfg: StorageConfig | None) -> set[str]:
    ids: set[str] = set()
    for shard in manifest["shards"]:
        with storage.open_random_access(storage.join(dst, shard["path"]), storage_cfg) as f:
            table = pq.read_table(f, columns=["product_id"])
        ids.update(table.column("product_id").to_pylist())
    return ids


def _known_quarantine(dst: str, manifest: dict, storage_cfg: StorageConfig | None) -> set[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    for rel in manifest["quarantine"]["files"]:
        with storage.open_random_access(storage.join(dst, rel), storage_cfg) as f:
            t = pq.read_table(f, columns=["source", "row"])
        out.update(zip(t.column("source").to_pylist(), t.column("row").to_pylist()))
    return out


def load_manifest(uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    manifest_uri = storage.join(uri, "manifest.json")
    if not storage.exists(manifest_uri, storage_cfg):
        raise FileNotFoundError(f"no manifest.json under {uri}: run `gammaray prepare` first")
    manifest = storage.read_json(manifest_uri, storage_cfg)
    check_readable(manifest.get("schema_version"), manifest_uri)
    return manifest


def read_quarantine(uri: str, manifest: dict | None = None, storage_cfg: StorageConfig | None = None) -> pa.Table:
    """Every record `prepare` rejected for the catalogue at uri (all runs), as one table."""
    manifest = manifest or load_manifest(uri, storage_cfg)
    tables = []
    for rel in manifest["quarantine"]["files"]:
        with storage.open_random_access(storage.join(uri, rel), storage_cfg) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else QUARANTINE_SCHEMA.empty_table()

