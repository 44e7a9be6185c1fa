"""`gammaray prepare SRC DST`: raw catalogue -> validated Parquet shards with a dense sample_index.

SRC is a JSONL, CSV or Parquet file (or a directory of them) on any fsspec filesystem; images are
inline bytes, paths relative to the source file, or URIs. DST receives

    DST/shards/part-00000.parquet ...   RECORD_SCHEMA rows, row groups of `row_group_size`
    DST/manifest.json                    counts, schema version, source, shards and their row groups
    DST/quarantine/prepare-00000.parquet every rejected record: product_id, source, row, reason

Re-running on the same source writes nothing new (byte-identical shards, same indices); records
whose product_id is new get the next free sample_index and go to new shards (append-safe).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gammaray.config import StorageConfig
from gammaray.schema import QUARANTINE_SCHEMA, RECORD_SCHEMA, SCHEMA_VERSION, Reason

from . import storage
from .images import BadImage, open_checked

RECORD_FIELDS = [f.name for f in RECORD_SCHEMA if f.name != "sample_index"]
TEXT_FIELDS = ("title", "description", "category", "locale")


@dataclass
class PrepareOptions:
    column_map: dict[str, str] = field(default_factory=dict)  # record field -> source column
    max_records_per_shard: int = 1000
    row_group_size: int = 128
    max_image_pixels: int = 25_000_000
    max_text_chars: int = 8192
    check_images: bool = True
    io_threads: int = 8
    progress: bool = True


@dataclass
class RawRow:
    source: str
    row: int
    values: dict[str, Any] | None  # None when the row itself could not be read
    error: tuple[str, str] | None = None  # (reason, detail) found while reading


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
        lines.append(f"  total in catalogue {self.manifest['num_records']}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# reading raw sources


def _source_files(src: str, storage_cfg: StorageConfig | None) -> list[str]:
    fs, path = storage.resolve(src, storage_cfg)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"prepare: source not found: {src}")
    if info.type == pafs.FileType.File:
        return [src]
    files = [f for f in storage.list_files(src, storage=storage_cfg) if f.endswith((".jsonl", ".json", ".csv", ".parquet"))]
    if not files:
        raise FileNotFoundError(f"prepare: no .jsonl/.csv/.parquet files under {src}")
    return files


def _read_source(uri: str, storage_cfg: StorageConfig | None) -> Iterator[RawRow]:
    if uri.endswith(".parquet"):
        yield from _read_parquet(uri, storage_cfg)
        return
    data = storage.read_bytes(uri, storage_cfg)
    if uri.endswith(".csv"):
        yield from _read_csv(uri, data)
    else:
        yield from _read_jsonl(uri, data)


def _read_jsonl(uri: str, data: bytes) -> Iterator[RawRow]:
    for i, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            loose = _loads_or_none(line.decode("utf-8", errors="replace"))
            yield RawRow(uri, i, loose, (Reason.NON_UTF8_TEXT, f"byte {err.start}: {err.reason}"))
            continue
        obj = _loads_or_none(text)
        if not isinstance(obj, dict):
            yield RawRow(uri, i, None, (Reason.WRONG_TYPE, "line is not a JSON object"))
            continue
        yield RawRow(uri, i, obj)


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _read_csv(uri: str, data: bytes) -> Iterator[RawRow]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None:
        # decode line by line so one bad row does not sink the file
        lines = data.splitlines(keepends=True)
        header = lines[0].decode("utf-8-sig", errors="replace")
        reader = csv.reader([header])
        cols = [c.strip() for c in next(reader)]
        for i, raw in enumerate(lines[1:], start=1):
            try:
                vals = next(csv.reader([raw.decode("utf-8")]))
                yield RawRow(uri, i, dict(zip(cols, vals)))
            except UnicodeDecodeError as err:
                vals = next(csv.reader([raw.decode("utf-8", errors="replace")]))
                yield RawRow(uri, i, dict(zip(cols, vals)), (Reason.NON_UTF8_TEXT, f"byte {err.start}"))
        return
    reader = csv.DictReader(io.StringIO(text))
    reader.fieldnames = [c.strip() for c in (reader.fieldnames or [])]  # headers are often space-padded
    for i, row in enumerate(reader, start=1):
        yield RawRow(uri, i, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()})


def _read_parquet(uri: str, storage_cfg: StorageConfig | None) -> Iterator[RawRow]:
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
        n_rows = pf.metadata.num_rows
    except Exception as err:  # noqa: BLE001 - a corrupt footer shows up as many error types
        yield RawRow(uri, -1, None, (Reason.UNREADABLE_SHARD, f"{type(err).__name__}: {err}"))
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield RawRow(uri, row, rec)
                row += 1
    except Exception as err:  # noqa: BLE001
        # the footer was readable, so we know how many records the damaged part held
        detail = f"{type(err).__name__}: {err}"
        for r in range(row, n_rows):
            yield RawRow(uri, r, None, (Reason.UNREADABLE_SHARD, detail))


# --------------------------------------------------------------------------------------------
# validating one record


def _apply_map(values: dict[str, Any], column_map: dict[str, str]) -> dict[str, Any]:
    out = dict(values)
    for field_name, column in column_map.items():
        out[field_name] = values.get(column)
    return out


def _load_image(value: Any, source_uri: str, storage_cfg: StorageConfig | None) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict) and "bytes" in value:  # HF datasets / parquet struct style
        return bytes(value["bytes"] or b"")
    if not isinstance(value, str):
        raise BadImage(Reason.WRONG_TYPE, f"image must be bytes or a path/URI, got {type(value).__name__}")
    ref = value.strip()
    if "://" not in ref and not os.path.isabs(ref):
        base = source_uri.rsplit("/", 1)[0] if "/" in source_uri else "."
        ref = storage.join(base, ref)
    try:
        return storage.read_bytes(ref, storage_cfg)
    except (FileNotFoundError, OSError) as err:
        if isinstance(err, FileNotFoundError) or "not found" in str(err).lower() or "no such" in str(err).lower():
            raise BadImage(Reason.IMAGE_NOT_FOUND, f"{ref}") from None
        raise


def _validate(raw: RawRow, opts: PrepareOptions, storage_cfg: StorageConfig | None) -> tuple[dict | None, tuple[str, str] | None]:
    """(clean record without sample_index, None) or (None, (reason, detail))."""
    if raw.error is not None:
        return None, raw.error
    v = _apply_map(raw.values or {}, opts.column_map)
    for name in ("product_id", "title", "image"):
        if v.get(name) is None or (isinstance(v.get(name), str) and name == "image" and not v[name].strip()):
            return None, (Reason.MISSING_FIELD, f"field '{name}' is missing")
    if isinstance(v["product_id"], (int,)) and not isinstance(v["product_id"], bool):
        v["product_id"] = str(v["product_id"])
    for name in ("product_id",) + TEXT_FIELDS:
        if v.get(name) is not None and not isinstance(v[name], str):
            return None, (Reason.WRONG_TYPE, f"field '{name}' must be a string, got {type(v[name]).__name__}")
    if not v["title"].strip():
        return None, (Reason.EMPTY_TEXT, "title is empty")
    for name in ("title", "description"):
        text = v.get(name)
        if text is not None:
            if "\ufffd" in text:
                return None, (Reason.NON_UTF8_TEXT, f"field '{name}' holds undecodable bytes")
            if len(text) > opts.max_text_chars:
                return None, (Reason.OVERSIZED_TEXT, f"field '{name}' has {len(text)} chars > {opts.max_text_chars}")
    attrs = v.get("attributes")
    if attrs is not None and not isinstance(attrs, dict):
        if isinstance(attrs, str):
            try:
                attrs = json.loads(attrs)
            except json.JSONDecodeError:
                attrs = None
        if not isinstance(attrs, dict):
            return None, (Reason.WRONG_TYPE, "field 'attributes' must be a mapping")
    try:
        image = _load_image(v["image"], raw.source, storage_cfg)
        if opts.check_images:
            open_checked(image, opts.max_image_pixels)
        elif not image:
            raise BadImage(Reason.IMAGE_EMPTY, "zero-byte image")
    except BadImage as bad:
        return None, (bad.reason, bad.detail)
    rec = {
        "product_id": v["product_id"].strip(),
        "title": " ".join(v["title"].split()),
        "description": v.get("description"),
        "category": v.get("category"),
        "image": image,
        "locale": v.get("locale"),
        "attributes": sorted((str(k), str(val)) for k, val in attrs.items()) if attrs else None,
    }
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


def prepare(
    src: str,
    dst: str,
    options: PrepareOptions | None = None,
    storage_cfg: StorageConfig | None = None,
) -> PrepareResult:
    opts = options or PrepareOptions()
    manifest_uri = storage.join(dst, "manifest.json")
    manifest: dict[str, Any]
    if storage.exists(manifest_uri, storage_cfg):
        manifest = storage.read_json(manifest_uri, storage_cfg)
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{manifest_uri}: schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}")
        known_ids = _known_ids(dst, manifest, storage_cfg)
        known_bad = _known_quarantine(dst, manifest, storage_cfg)
    else:
        manifest = {"schema_version": SCHEMA_VERSION, "num_records": 0, "next_sample_index": 0, "shards": [],
                    "sources": [], "categories": [], "quarantine": {"count": 0, "by_reason": {}, "files": []}}
        known_ids = set()
        known_bad = set()

    files = _source_files(src, storage_cfg)
    raw_rows = [r for f in files for r in _read_source(f, storage_cfg)]

    seen: set[str] = set(known_ids)
    accepted: list[dict] = []
    quarantined: list[dict] = []
    already = 0

    def check(raw: RawRow):
        return raw, _validate(raw, opts, storage_cfg)

    bar = tqdm(total=len(raw_rows), desc="prepare: validate", unit="rec", disable=not opts.progress)
    with ThreadPoolExecutor(max_workers=opts.io_threads) as pool:
        # map keeps input order: sample indices follow the source order on every run
        for raw, (rec, err) in pool.map(check, raw_rows):
            bar.update(1)
            pid = None if raw.values is None else raw.values.get(opts.column_map.get("product_id", "product_id"))
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
                    accepted.append(rec)
                    continue
            quarantined.append({"product_id": None if pid is None else str(pid), "source": raw.source,
                                "row": raw.row, "reason": err[0], "detail": err[1][:500], "stage": "prepare",
                                "epoch": None})
    bar.close()

    next_index = int(manifest["next_sample_index"])
    for k, rec in enumerate(accepted):
        rec["sample_index"] = next_index + k

    shard_uris = []
    first_part = len(manifest["shards"])
    chunks = [accepted[s : s + opts.max_records_per_shard] for s in range(0, len(accepted), opts.max_records_per_shard)]
    for j, chunk in enumerate(tqdm(chunks, desc="prepare: write shards", unit="shard", disable=not opts.progress)):
        rel = f"shards/part-{first_part + j:05d}.parquet"
        info = _write_shard(chunk, storage.join(dst, rel), opts.row_group_size, storage_cfg)
        manifest["shards"].append({"path": rel, **info})
        shard_uris.append(storage.join(dst, rel))

    by_reason = Counter(q["reason"] for q in quarantined)
    if quarantined:
        qrel = f"quarantine/prepare-{len(manifest['quarantine']['files']):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA), buf)
        storage.write_bytes(storage.join(dst, qrel), buf.getvalue(), storage_cfg)
        manifest["quarantine"]["files"].append(qrel)
        manifest["quarantine"]["count"] += len(quarantined)
        for reason, n in by_reason.items():
            manifest["quarantine"]["by_reason"][reason] = manifest["quarantine"]["by_reason"].get(reason, 0) + n

    if accepted or quarantined or src not in manifest["sources"]:
        manifest["num_records"] = int(manifest["num_records"]) + len(accepted)
        manifest["next_sample_index"] = next_index + len(accepted)
        if src not in manifest["sources"]:
            manifest["sources"].append(src)
        cats = set(manifest.get("categories", [])) | {r["category"] for r in accepted if r.get("category")}
        manifest["categories"] = sorted(cats)
        storage.write_json(manifest_uri, manifest, storage_cfg)

    return PrepareResult(
        dst=dst,
        num_input=len(raw_rows),
        num_written=len(accepted),
        num_already_present=already,
        num_quarantined=len(quarantined),
        quarantine_by_reason=dict(by_reason),
        shards_written=shard_uris,
        manifest=manifest,
    )


def _known_ids(dst: str, manifest: dict, storage_cfg: StorageConfig | None) -> set[str]:
    ids: set[str] = set()
    for shard in manifest["shards"]:
        fs, path = storage.resolve(storage.join(dst, shard["path"]), storage_cfg)
        table = pq.read_table(path, filesystem=fs, columns=["product_id"])
        ids.update(table.column("product_id").to_pylist())
    return ids


def _known_quarantine(dst: str, manifest: dict, storage_cfg: StorageConfig | None) -> set[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    for rel in manifest["quarantine"]["files"]:
        fs, path = storage.resolve(storage.join(dst, rel), storage_cfg)
        t = pq.read_table(path, filesystem=fs, columns=["source", "row"])
        out.update(zip(t.column("source").to_pylist(), t.column("row").to_pylist()))
    return out


def load_manifest(uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    manifest_uri = storage.join(uri, "manifest.json")
    if not storage.exists(manifest_uri, storage_cfg):
        raise FileNotFoundError(f"no manifest.json under {uri}: run `gammaray prepare` first")
    return storage.read_json(manifest_uri, storage_cfg)
