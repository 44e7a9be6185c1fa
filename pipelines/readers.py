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
import hashlib
import json
import tarfile
from collections import deque
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.config import StorageConfig
from gammaray.schema import Reason

from . import storage
from .storage import Store

SOURCE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".tar")
CSV_FIELD_LIMIT = 131_072  # chars; Python's csv default. A longer field is `field_too_large` (often an unclosed quote)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_RECORD_BYTES = 16 * 2**20  # one JSONL/CSV line (data.max_record_bytes); a longer one is oversized_record
READ_CHUNK = 2**20


@dataclass
class RawRow:
    source: str
    row: int
    values: dict[str, Any] | None  # None when the row itself could not be read
    error: tuple[str, str] | None = None  # (reason, detail) found while reading
    columns: frozenset[str] | None = None  # the source file's columns (tabular files), for missing-column checks
    digest: str | None = None  # sha256 of the raw bytes of a row that could not be read: its identity across runs


def source_files(src: str, storage_cfg: Store | StorageConfig | None = None) -> list[str]:
    """The raw files of a source: the file itself, or every supported file under a folder (sorted)."""
    store = Store.of(storage_cfg)
    if not store.exists(src):
        raise FileNotFoundError(f"prepare: source not found: {src}")
    if not store.is_dir(src):
        if not src.endswith(SOURCE_SUFFIXES):
            raise ValueError(f"prepare: {src}: unsupported source type (want one of {', '.join(SOURCE_SUFFIXES)})")
        return [src]
    files = [f for f in store.list_files(src) if f.endswith(SOURCE_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"prepare: no {'/'.join(SOURCE_SUFFIXES)} files under {src}")
    return files


def read_source(uri: str, storage_cfg: Store | StorageConfig | None = None, csv_field_limit: int = CSV_FIELD_LIMIT,
                max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawRow]:
    store = Store.of(storage_cfg)
    if uri.endswith(".parquet"):
        yield from read_parquet(uri, store)
    elif uri.endswith(".tar"):
        yield from read_webdataset(uri, store)
    else:
        with store.open_input(uri) as f:
            if uri.endswith(".csv"):
                yield from read_csv(uri, f, csv_field_limit, max_record_bytes)
            else:
                yield from read_jsonl(uri, f, max_record_bytes)


# --------------------------------------------------------------------------------------------
# JSONL and CSV: streamed line by line, a line over the cap skipped without being held


@dataclass
class Line:
    number: int            # 0-based physical line
    data: bytes | None     # without its "\n"; None when over the cap (never held whole)
    size: int              # bytes, without the "\n"
    digest: str | None     # sha256 of an over-cap line, computed while it was skipped


def capped_lines(f: BinaryIO, cap: int, chunk: int = READ_CHUNK, first: bytes = b"", first_number: int = 0) -> Iterator[Line]:
    """The lines of a binary stream, read `chunk` bytes at a time. A line longer than `cap` bytes is
    hashed as it streams past and yielded with data=None: memory holds at most cap + chunk bytes.
    Lines are numbered from `first_number` (a byte range of a file that starts at that line)."""
    carry = bytearray()
    over = None  # the hash of the line being skipped
    size = 0
    number = first_number
    block = first or f.read(chunk)
    while block:
        parts = block.split(b"\n")
        for k, part in enumerate(parts):
            size += len(part)
            if over is not None:
                over.update(part)
            elif size > cap:
                over = hashlib.sha256(carry)
                over.update(part)
                carry = bytearray()
            else:
                carry += part
            if k < len(parts) - 1:  # a newline ends this part
                yield Line(number, None if over else bytes(carry), size, over.hexdigest() if over else None)
                carry, over, size = bytearray(), None, 0
                number += 1
        block = f.read(chunk)
    if size or over is not None:
        yield Line(number, None if over else bytes(carry), size, over.hexdigest() if over else None)


def _oversized(uri: str, line: Line, cap: int, where: str) -> RawRow:
    return RawRow(uri, line.number, None, (Reason.OVERSIZED_RECORD, f"{where} has {line.size} bytes > {cap} "
                                           "(data.max_record_bytes); skipped unread"), digest=line.digest)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_jsonl(uri: str, f: BinaryIO, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawRow]:
    """JSON Lines, streamed; a `.json` file holding one array of objects is read whole, up to
    `max_record_bytes` (a larger array is one oversized_record: convert it to JSON Lines)."""
    head = f.read(READ_CHUNK)
    if is_json_array(head):
        yield from _read_json_array(uri, f, head, max_record_bytes)
        return
    yield from jsonl_rows(uri, capped_lines(f, max_record_bytes, first=head), max_record_bytes)


def is_json_array(head: bytes) -> bool:
    """Whether a .json/.jsonl file whose first READ_CHUNK bytes are `head` is one JSON array (read whole)."""
    return head.lstrip()[:1] == b"["


def read_jsonl_range(uri: str, f: BinaryIO, start: int, stop: int, first_line: int,
                     max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawRow]:
    """The JSON Lines of bytes [start, stop) of a file (a range that starts at a line start, line
    `first_line`, and ends after a newline or at the end): the rows `read_jsonl` gives for them."""
    f.seek(start)
    yield from jsonl_rows(uri, capped_lines(_Bounded(f, stop - start), max_record_bytes, first_number=first_line),
                          max_record_bytes)


class _Bounded:
    """At most `left` bytes of a stream."""

    def __init__(self, f: BinaryIO, left: int):
        self.f, self.left = f, left

    def read(self, n: int) -> bytes:
        data = self.f.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


def jsonl_rows(uri: str, lines: Iterator[Line], max_record_bytes: int) -> Iterator[RawRow]:
    for line in lines:
        if line.data is None:
            yield _oversized(uri, line, max_record_bytes, f"line {line.number + 1}")
            continue
        if not line.data.strip():
            continue
        yield _jsonl_row(uri, line.number, line.data)


def _jsonl_row(uri: str, i: int, line: bytes) -> RawRow:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        loose = _loads_or_none(line.decode("utf-8", errors="replace"))
        return RawRow(uri, i, loose if isinstance(loose, dict) else None,
                      (Reason.NON_UTF8_TEXT, f"line {i + 1}, byte {err.start}: {err.reason}"), digest=_digest(line))
    try:
        obj = json.loads(text)
    except RecursionError:
        return RawRow(uri, i, None, (Reason.NESTING_TOO_DEEP, f"line {i + 1} is JSON nested too deeply to parse"),
                      digest=_digest(line))
    except ValueError as err:  # JSONDecodeError, or an integer literal too long to convert
        return RawRow(uri, i, None, (Reason.WRONG_TYPE, f"line {i + 1} is not a JSON object: {err}"[:300]),
                      digest=_digest(line))
    if not isinstance(obj, dict):
        return RawRow(uri, i, None, (Reason.WRONG_TYPE, f"line {i + 1} is not a JSON object"), digest=_digest(line))
    return RawRow(uri, i, obj)


def _read_json_array(uri: str, f: BinaryIO, head: bytes, cap: int) -> Iterator[RawRow]:
    data = bytearray(head)
    h = None
    block = b""
    while True:
        if h is None and len(data) + len(block) > cap:
            h = hashlib.sha256(data)
            data = bytearray()
        if h is None:
            data += block
        else:
            h.update(block)
        block = f.read(READ_CHUNK)
        if not block:
            break
    if h is not None:
        yield RawRow(uri, -1, None, (Reason.OVERSIZED_RECORD, f"a JSON array file over {cap} bytes "
                                     "(data.max_record_bytes) is not read whole: write it as JSON Lines"),
                     digest=h.hexdigest())
        return
    try:
        items = json.loads(bytes(data).decode("utf-8"))
    except RecursionError:
        yield RawRow(uri, -1, None, (Reason.NESTING_TOO_DEEP, "the JSON array is nested too deeply to parse"),
                     digest=_digest(data))
        return
    except (UnicodeDecodeError, ValueError) as err:
        yield RawRow(uri, -1, None, (Reason.WRONG_TYPE, f"not a JSON array of objects: {err}"[:300]), digest=_digest(data))
        return
    del data
    for i, obj in enumerate(items):
        if isinstance(obj, dict):
            yield RawRow(uri, i, obj)
        else:
            yield RawRow(uri, i, None, (Reason.WRONG_TYPE, f"item {i} is not a JSON object"),
                         digest=_digest(json.dumps(obj, sort_keys=True).encode("utf-8", "surrogatepass")))


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


class _OverCap(Exception):
    pass


class _CsvLines:
    """csv.reader's input: decoded physical lines, each record's lines remembered (`taken`) so a
    record that went wrong can give back all but its first line to be read again (`again`)."""

    def __init__(self, lines: Iterator[Line]):
        self._lines = lines
        self.again: deque[Line] = deque()
        self.taken: list[Line] = []
        self.eof = False
        self.bad_bytes = False

    def __iter__(self) -> "_CsvLines":
        return self

    def __next__(self) -> str:
        if self.again:
            line = self.again.popleft()
        else:
            try:
                line = next(self._lines)
            except StopIteration:
                self.eof = True
                raise
        self.taken.append(line)
        if line.data is None:
            raise _OverCap
        data = line.data[3:] if line.number == 0 and line.data.startswith(b"\xef\xbb\xbf") else line.data
        try:
            return data.decode("utf-8") + "\n"
        except UnicodeDecodeError:
            self.bad_bytes = True
            return data.decode("utf-8", errors="replace") + "\n"

    def start(self) -> None:
        self.taken, self.eof, self.bad_bytes = [], False, False

    def give_back(self) -> None:
        """The record's first line was the fault: its other lines are read again as rows of their own."""
        self.again.extendleft(reversed(self.taken[1:]))


def read_csv(uri: str, f: BinaryIO, field_limit: int = CSV_FIELD_LIMIT,
             max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawRow]:
    """Streamed line by line. Headers are stripped (they are often space-padded); each line is decoded
    on its own so one non-UTF-8 row does not sink the file. A row's number is its first physical line
    (the header is row 0). A row with a field longer than `field_limit` characters is
    `field_too_large`; a quote that never closes (the record runs to the end of the file, over the
    field limit, or gets the wrong number of fields over several lines) is `unclosed_quote` for its
    first line, and the lines it swallowed are read again as rows of their own."""
    src = _CsvLines(capped_lines(f, max_record_bytes))
    csv.field_size_limit(field_limit)  # process-wide; set per file so each source gets its own limit
    header: list[str] | None = None
    cols: frozenset[str] | None = None
    while True:
        src.start()
        try:
            vals = next(csv.reader(src))
            err = None
        except StopIteration:
            if not src.taken:
                return
            vals, err = None, "eof"
        except _OverCap:
            vals, err = None, "over"
        except csv.Error as e:
            vals, err = None, ("field" if "field limit" in str(e) else str(e))
        first = src.taken[0]
        row = first.number
        spans = len(src.taken) > 1
        if err == "over" and not spans:
            yield _oversized(uri, first, max_record_bytes, f"row {row}" if header is not None else "the header")
            if header is None:
                return
            continue
        if header is None:
            if err is not None:
                reason = Reason.FIELD_TOO_LARGE if err == "field" else Reason.OVERSIZED_RECORD if err == "over" \
                    else Reason.WRONG_TYPE
                yield RawRow(uri, -1, None, (reason, f"CSV header: {err}"))
                return
            header = [c.strip() for c in vals]
            cols = frozenset(header)
            continue
        malformed = spans and (err is not None or src.eof or len(vals) != len(header))
        if malformed:
            yield RawRow(uri, row, None, (Reason.UNCLOSED_QUOTE, f"row {row}: a quote opened here never closes "
                                          f"properly (it swallowed {len(src.taken) - 1} line(s), read again as rows)"),
                         cols, digest=_digest(first.data or b""))
            src.give_back()
            continue
        if err is not None:
            detail = (f"row {row} has a field longer than {field_limit} characters (an unclosed quote?)" if err == "field"
                      else f"row {row}: {err}")
            yield RawRow(uri, row, None, (Reason.FIELD_TOO_LARGE if err == "field" else Reason.WRONG_TYPE, detail), cols,
                         digest=_digest(b"\n".join(ln.data or b"" for ln in src.taken)))
            continue
        if not any(v.strip() for v in vals):
            continue
        values = {k: v.strip() for k, v in zip(header, vals)}
        bad = (Reason.NON_UTF8_TEXT, f"row {row} holds bytes that are not UTF-8") if src.bad_bytes else None
        yield RawRow(uri, row, values, bad, cols)


# --------------------------------------------------------------------------------------------
# Parquet: row groups streamed, a damaged file quarantined record by record where possible


def read_parquet(uri: str, storage_cfg: Store | StorageConfig | None = None, batch_rows: int = 256,
                 row_groups: tuple[int, int] | None = None) -> Iterator[RawRow]:
    """The rows of a Parquet file, or of its row groups [start, stop) (numbered as in the whole file)."""
    try:
        pf = pq.ParquetFile(Store.of(storage_cfg).open_random_access(uri))
        n_rows = pf.metadata.num_rows
        cols = frozenset(pf.schema_arrow.names)
    except Exception as err:  # noqa: BLE001 - a corrupt footer shows up as many error types
        if storage.is_not_found(err):
            raise
        yield RawRow(uri, -1, None, (Reason.UNREADABLE_SHARD, f"{type(err).__name__}: {err}"[:500]))
        return
    groups = range(pf.metadata.num_row_groups) if row_groups is None else range(*row_groups)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start))
    for g in groups:
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
    assert row == n_rows or row_groups is not None


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


def read_webdataset(uri: str, storage_cfg: Store | StorageConfig | None = None) -> Iterator[RawRow]:
    row = 0
    current_key: str | None = None
    sample: dict[str, Any] = {}

    def finish() -> RawRow:
        return _webdataset_row(uri, row, current_key or "", sample)

    try:
        with Store.of(storage_cfg).open_input(uri) as f:
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
