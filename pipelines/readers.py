"""Raw catalogue readers: JSONL, CSV, Parquet and WebDataset tar shards, on any storage.

Every reader yields `RawRow`s in file order: the values of one source record (or None when the
record itself could not be read) plus a (reason, detail) found while reading. A damaged file never
raises: what cannot be read becomes quarantine rows, one per record when the record count is known
(a Parquet footer that survived), else one for the file (row = -1).

WebDataset shards follow img2dataset's layout: `<key>.jpg|.png|.webp` (the image), `<key>.txt` (the
caption) and `<key>.json` (metadata, any extra columns) per sample, members of one sample adjacent in
the tar. A sample becomes {**json, "key": key, "caption": txt, "image": bytes}; `title` defaults to
the caption and `product_id` to the key (override with a column map).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.config import StorageConfig
from gammaray.schema import Reason

from . import storage

SOURCE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".tar")
CSV_FIELD_LIMIT = 131_072  # chars; Python's csv default. A longer field is `field_too_large` (often an unclosed quote)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class RawRow:
    source: str
    row: int
    values: dict[str, Any] | None  # None when the row itself could not be read
    error: tuple[str, str] | None = None  # (reason, detail) found while reading
    columns: frozenset[str] | None = None  # the source file's columns (tabular files), for missing-column checks


def source_files(src: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """The raw files of a source: the file itself, or every supported file under a folder (sorted)."""
    if not storage.exists(src, storage_cfg):
        raise FileNotFoundError(f"prepare: source not found: {src}")
    if not storage.is_dir(src, storage_cfg):
        if not src.endswith(SOURCE_SUFFIXES):
            raise ValueError(f"prepare: {src}: unsupported source type (want one of {', '.join(SOURCE_SUFFIXES)})")
        return [src]
    files = [f for f in storage.list_files(src, storage=storage_cfg) if f.endswith(SOURCE_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"prepare: no {'/'.join(SOURCE_SUFFIXES)} files under {src}")
    return files


def read_source(uri: str, storage_cfg: StorageConfig | None = None,
                csv_field_limit: int = CSV_FIELD_LIMIT) -> Iterator[RawRow]:
    if uri.endswith(".parquet"):
        yield from read_parquet(uri, storage_cfg)
    elif uri.endswith(".tar"):
        yield from read_webdataset(uri, storage_cfg)
    else:
        data = storage.read_bytes(uri, storage_cfg)
        if uri.endswith(".csv"):
            yield from read_csv(uri, data, csv_field_limit)
        else:
            yield from read_jsonl(uri, data)


# --------------------------------------------------------------------------------------------
# JSONL and CSV: small text files, read whole


def read_jsonl(uri: str, data: bytes) -> Iterator[RawRow]:
    """JSON Lines; a `.json` file holding one array of objects is read as well."""
    if data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data.decode("utf-8"))
        except RecursionError:
            yield RawRow(uri, -1, None, (Reason.NESTING_TOO_DEEP, "the JSON array is nested too deeply to parse"))
            return
        except (UnicodeDecodeError, ValueError) as err:
            yield RawRow(uri, -1, None, (Reason.WRONG_TYPE, f"not a JSON array of objects: {err}"[:300]))
            return
        for i, obj in enumerate(items):
            if isinstance(obj, dict):
                yield RawRow(uri, i, obj)
            else:
                yield RawRow(uri, i, None, (Reason.WRONG_TYPE, f"item {i} is not a JSON object"))
        return
    for i, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            loose = _loads_or_none(line.decode("utf-8", errors="replace"))
            yield RawRow(uri, i, loose if isinstance(loose, dict) else None,
                         (Reason.NON_UTF8_TEXT, f"line {i + 1}, byte {err.start}: {err.reason}"))
            continue
        try:
            obj = json.loads(text)
        except RecursionError:
            yield RawRow(uri, i, None, (Reason.NESTING_TOO_DEEP, f"line {i + 1} is JSON nested too deeply to parse"))
            continue
        except ValueError as err:  # JSONDecodeError, or an integer literal too long to convert
            yield RawRow(uri, i, None, (Reason.WRONG_TYPE, f"line {i + 1} is not a JSON object: {err}"[:300]))
            continue
        if not isinstance(obj, dict):
            yield RawRow(uri, i, None, (Reason.WRONG_TYPE, f"line {i + 1} is not a JSON object"))
            continue
        yield RawRow(uri, i, obj)


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def read_csv(uri: str, data: bytes, field_limit: int = CSV_FIELD_LIMIT) -> Iterator[RawRow]:
    """Headers are stripped (they are often space-padded); each line is decoded on its own so one
    non-UTF-8 row does not sink the file. Rows are numbered from 1 (the header is row 0). A row with
    a field longer than `field_limit` characters is `field_too_large` (the csv module stops there and
    goes on at the next line)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.decode("utf-8", errors="replace")
    csv.field_size_limit(field_limit)  # process-wide; set per file so each source gets its own limit
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [c.strip() for c in next(reader)]
    except StopIteration:
        return
    except csv.Error as err:
        yield RawRow(uri, -1, None, (Reason.FIELD_TOO_LARGE if "field limit" in str(err) else Reason.WRONG_TYPE,
                                     f"CSV header: {err}"))
        return
    cols = frozenset(header)
    strict_ok = b"\xef\xbf\xbd" not in data  # no U+FFFD in the file: any we see came from bad bytes
    i = 0
    while True:
        i += 1
        try:
            vals = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            too_large = "field limit" in str(err)
            detail = (f"row {i} has a field longer than {field_limit} characters (an unclosed quote?)" if too_large
                      else f"row {i}: {err}")
            yield RawRow(uri, i, None, (Reason.FIELD_TOO_LARGE if too_large else Reason.WRONG_TYPE, detail), cols)
            continue
        if not any(v.strip() for v in vals):
            continue
        row = {k: v.strip() for k, v in zip(header, vals)}
        err = None
        if any("\ufffd" in v for v in vals) and strict_ok:
            err = (Reason.NON_UTF8_TEXT, f"row {i} holds bytes that are not UTF-8")
        yield RawRow(uri, i, row, err, cols)


# --------------------------------------------------------------------------------------------
# Parquet: row groups streamed, a damaged file quarantined record by record where possible


def read_parquet(uri: str, storage_cfg: StorageConfig | None = None, batch_rows: int = 256) -> Iterator[RawRow]:
    try:
        pf = pq.ParquetFile(storage.open_random_access(uri, storage_cfg))
        n_rows = pf.metadata.num_rows
        cols = frozenset(pf.schema_arrow.names)
    except Exception as err:  # noqa: BLE001 - a corrupt footer shows up as many error types
        if storage.is_not_found(err):
            raise
        yield RawRow(uri, -1, None, (Reason.UNREADABLE_SHARD, f"{type(err).__name__}: {err}"[:500]))
        return
    row = 0
    for g in range(pf.metadata.num_row_groups):
        n_g = pf.metadata.row_group(g).num_rows
        try:
            table = pf.read_row_group(g)
            rows = _table_rows(table)
        except Exception as err:  # noqa: BLE001 - damaged pages, bad UTF-8 in a string column
            detail = f"row group {g}: {type(err).__name__}: {err}"[:500]
            for r in range(row, row + n_g):
                yield RawRow(uri, r, None, (Reason.UNREADABLE_SHARD, detail), cols)
            row += n_g
            continue
        for rec in rows:
            yield RawRow(uri, row, rec[0], rec[1], cols)
            row += 1
    assert row == n_rows


def _table_rows(table: pa.Table) -> list[tuple[dict | None, tuple[str, str] | None]]:
    """Rows as dicts; a string column with invalid UTF-8 fails only its own rows (non_utf8_text)."""
    try:
        return [(r, None) for r in table.to_pylist()]
    except UnicodeDecodeError:
        pass
    out: list[tuple[dict | None, tuple[str, str] | None]] = []
    string_cols = [n for n, t in zip(table.column_names, table.schema.types) if pa.types.is_string(t)]
    safe = table.drop_columns(string_cols)
    as_binary = {n: table.column(n).cast(pa.binary()).to_pylist() for n in string_cols}
    for i, rec in enumerate(safe.to_pylist()):
        err = None
        for n in string_cols:
            raw = as_binary[n][i]
            if raw is None:
                rec[n] = None
                continue
            try:
                rec[n] = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rec[n] = raw.decode("utf-8", errors="replace")
                err = err or (Reason.NON_UTF8_TEXT, f"column '{n}': byte {e.start} is not UTF-8")
        out.append((rec, err))
    return out


# --------------------------------------------------------------------------------------------
# WebDataset (img2dataset) tar shards, streamed


def read_webdataset(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[RawRow]:
    row = 0
    current_key: str | None = None
    sample: dict[str, Any] = {}

    def finish() -> RawRow:
        return _webdataset_row(uri, row, current_key or "", sample)

    try:
        with storage.open_input(uri, storage_cfg) as f:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    if name.startswith(".") or "." not in name:
                        continue
                    key, ext = name.split(".", 1)
                    if key != current_key:
                        if current_key is not None:
                            yield finish()
                            row += 1
                        current_key, sample = key, {}
                    fobj = tar.extractfile(member)
                    sample[ext.lower()] = fobj.read() if fobj is not None else b""
    except Exception as err:  # noqa: BLE001 - truncated or corrupt tar
        if storage.is_not_found(err):
            raise
        if current_key is not None and sample:
            yield finish()
            row += 1
        yield RawRow(uri, -1, None, (Reason.UNREADABLE_SHARD, f"after {row} samples: {type(err).__name__}: {err}"[:500]))
        return
    if current_key is not None:
        yield finish()


def _webdataset_row(uri: str, row: int, key: str, parts: dict[str, Any]) -> RawRow:
    values: dict[str, Any] = {}
    error = None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            if isinstance(meta, dict):
                values.update(meta)
            else:
                error = (Reason.WRONG_TYPE, f"sample {key}: .json is not an object")
        except UnicodeDecodeError as err:
            error = (Reason.NON_UTF8_TEXT, f"sample {key}: .json byte {err.start} is not UTF-8")
        except json.JSONDecodeError as err:
            error = (Reason.WRONG_TYPE, f"sample {key}: .json does not parse: {err}")
    values["key"] = key
    if "txt" in parts:
        try:
            values["caption"] = parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            values["caption"] = parts["txt"].decode("utf-8", errors="replace").strip()
            error = error or (Reason.NON_UTF8_TEXT, f"sample {key}: .txt byte {err.start} is not UTF-8")
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in parts:
            values["image"] = parts[ext]
            break
    values.setdefault("title", values.get("caption"))
    values.setdefault("product_id", key)
    return RawRow(uri, row, values, error)
