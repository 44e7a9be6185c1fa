"""Realistic bad inputs, one per quarantine reason: for tests, the benchmark and the docs.

Each builder returns what a broken catalogue really contains (bytes, rows, files), never a mock.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gammaray.schema import Reason


def good_jpeg(side: int = 48, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, size=(side, side, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def truncated_jpeg(side: int = 48) -> bytes:
    data = good_jpeg(side)
    return data[: len(data) * 2 // 3]


def undecodable_bytes(n: int = 600, seed: int = 1) -> bytes:
    return bytes(np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def decompression_bomb(side: int = 100_000) -> bytes:
    """A 1-bit PNG whose header claims side x side pixels (10 gigapixels by default) in a few hundred
    bytes: decoding it would need gigabytes. Only the header is ever read by `open_checked`."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    idat = zlib.compress(row * 4, 9)  # a few rows: the header is what matters
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def non_utf8_line(record: dict) -> bytes:
    """A JSONL line whose title holds Latin-1 bytes (\xe9) instead of UTF-8."""
    import json

    line = json.dumps({**record, "title": "Caf__PLACEHOLDER__ mug"}, ensure_ascii=False).encode("utf-8")
    return line.replace(b"__PLACEHOLDER__", b"\xe9")


def corrupt_row_group(parquet_bytes: bytes, row_group: int = 0) -> bytes:
    """The file with the pages of one row group overwritten by garbage; footer intact, so the
    reader knows how many records it lost."""
    pf = pq.ParquetFile(pa.BufferReader(parquet_bytes))
    rg = pf.metadata.row_group(row_group)
    starts = [rg.column(c).dictionary_page_offset or rg.column(c).data_page_offset for c in range(rg.num_columns)]
    lo = min(s for s in starts if s is not None)
    hi = lo + sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
    junk = bytes(np.random.default_rng(7).integers(0, 256, size=hi - lo, dtype=np.uint8))
    return parquet_bytes[:lo] + junk + parquet_bytes[hi:]


def garbage_parquet(n: int = 2048) -> bytes:
    """Not a Parquet file at all (no footer): the record count is unknowable."""
    return b"PAR1" + undecodable_bytes(n, seed=3)


# the reason each fault must be quarantined with (the test contract)
EXPECTED = {
    "undecodable_image": Reason.IMAGE_UNDECODABLE,
    "truncated_jpeg": Reason.IMAGE_TRUNCATED,
    "decompression_bomb": Reason.IMAGE_TOO_LARGE,
    "zero_byte_image": Reason.IMAGE_EMPTY,
    "missing_column": Reason.MISSING_COLUMN,
    "wrong_type": Reason.WRONG_TYPE,
    "null_title": Reason.EMPTY_TEXT,
    "empty_title": Reason.EMPTY_TEXT,
    "duplicate_id": Reason.DUPLICATE_ID,
    "missing_image_uri": Reason.IMAGE_NOT_FOUND,
    "corrupt_parquet": Reason.UNREADABLE_SHARD,
    "non_utf8": Reason.NON_UTF8_TEXT,
    "oversized_text": Reason.OVERSIZED_TEXT,
}
