"""The product record and the training batch: the contract between the data path and the workers.

`pipelines/` produces records and batches with these names; `workers/` consumes them. Nothing else
crosses that boundary (docs/design.md section 7).

The record schema is versioned. A prepared catalogue's manifest and every shard's Arrow metadata
carry `gammaray.schema_version`; readers accept every version in `READABLE_VERSIONS` and bring older
shards up to date with `conform_table` (new optional columns are added as nulls). Record-level
validation (`validate_record`) is pure Python over plain values: types, required fields, text limits.
Image bytes are checked by decoding them, which needs PIL and lives in `pipelines/images.py`.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa

# 1: product_id, sample_index, title, description, category, image, locale, attributes
# 2: + titles (other-language titles, locale -> title), + extra_images (more photos of the product)
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
SCHEMA_VERSION_KEY = b"gammaray.schema_version"

# A prepared Parquet row (docs/design.md section 2).
RECORD_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("category", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("locale", pa.string()),
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
        pa.field("titles", pa.map_(pa.string(), pa.string())),
        pa.field("extra_images", pa.list_(pa.binary())),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

# fields added after version 1, all optional (null in older shards)
ADDED_IN = {"titles": 2, "extra_images": 2}

REQUIRED_FIELDS = ("product_id", "title", "image")
TEXT_FIELDS = ("title", "description", "category", "locale")
MAX_PRODUCT_ID_CHARS = 512


# Reason codes of quarantined records. Each bad input gets its own code so counts are meaningful.
class Reason:
    MISSING_FIELD = "missing_field"          # the row has no value for a required field
    MISSING_COLUMN = "missing_column"        # the source file has no column for a required field
    WRONG_TYPE = "wrong_type"
    EMPTY_TEXT = "empty_text"
    OVERSIZED_TEXT = "oversized_text"
    OVERSIZED_RECORD = "oversized_record"    # a source line (JSONL, CSV) over data.max_record_bytes, skipped unread
    UNCLOSED_QUOTE = "unclosed_quote"        # a CSV quote that never closes: the lines after it are read as rows again
    NON_UTF8_TEXT = "non_utf8_text"
    DUPLICATE_ID = "duplicate_product_id"
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_EMPTY = "image_empty"
    IMAGE_UNDECODABLE = "image_undecodable"
    IMAGE_TRUNCATED = "image_truncated"
    IMAGE_TOO_LARGE = "image_too_large"      # over the pixel limit (from the header) or the byte cap (before reading)
    IMAGE_PATH_INVALID = "image_path_invalid"  # a directory, a device, a NUL byte, longer than the OS allows
    IMAGE_OUTSIDE_SOURCE = "image_path_outside_source"  # a local path leaving the source folder
    IMAGE_UNREACHABLE = "image_unreachable"  # access denied, or a web host that does not answer
    FIELD_TOO_LARGE = "field_too_large"      # a CSV field over the field limit
    NESTING_TOO_DEEP = "nesting_too_deep"    # JSON nested deeper than the parser's recursion limit
    INVALID_RECORD = "invalid_record"        # validation failed in a way no other reason covers (detail: the error)
    UNREADABLE_SHARD = "unreadable_shard"
    MISSING_VIEW = "missing_view"            # the configured view pair needs a field this record lacks


ALL_REASONS = tuple(v for k, v in vars(Reason).items() if k.isupper())


QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("epoch", pa.int64()),
        pa.field("record_key", pa.string()),  # prepare: sha256 of the record's content (its identity across runs)
    ]
)


# Keys of a preprocessed training batch (numpy/torch, leading dim = batch).
class BatchKeys:
    SAMPLE_INDEX = "sample_index"            # int64 [B]
    # bool, not a tensor: the batch's sample indices are all different, checked on the host before the
    # copy to the device (the gamma memory's update then skips combining duplicates); absent: not known
    SAMPLE_INDEX_DISTINCT = "sample_index_distinct"
    PIXELS = "pixel_values"                  # float32 [B,3,H,W], normalised
    PIXELS_AUG = "pixel_values_aug"          # second (augmented) image view
    INPUT_IDS = "input_ids"                  # int64 [B,L]
    ATTENTION_MASK = "attention_mask"        # int64 [B,L]
    INPUT_IDS_AUG = "input_ids_aug"          # second (augmented) text view
    ATTENTION_MASK_AUG = "attention_mask_aug"
    PIXELS_PAIR = "pixel_values_pair"        # view pair image_image: another photo of the product
    INPUT_IDS_PAIR = "input_ids_pair"        # view pair text_text: the title in the pair locale
    ATTENTION_MASK_PAIR = "attention_mask_pair"
    IMAGE_FEATURES = "image_features"        # float32 [B,Di]: cached pooled output of a locked image tower
    TEXT_FEATURES = "text_features"          # float32 [B,Dt]: cached pooled output of a locked text tower
    REJECT = "reject_reason"                 # str, "" for a good row
    PRODUCT_ID = "product_id"
    SOURCE = "source"
    ROW = "row"
    DETAIL = "reject_detail"


# View pairs: which two model outputs form the positive pair. The model names its outputs after the
# tower and the view ("image", "text", "image_aug", "text_aug", "image_pair", "text_pair").
VIEW_PAIRS: dict[str, tuple[str, str]] = {
    "image_text": ("image", "text"),        # a product photo <-> its title/description
    "text_text": ("text", "text_pair"),     # its text in the record's locale <-> its title in another
    "image_image": ("image", "image_pair"),  # the main photo <-> another photo of the same product
}


def pair_slots(view_pair: str) -> tuple[str, str]:
    try:
        return VIEW_PAIRS[view_pair]
    except KeyError:
        raise ValueError(f"unknown view pair {view_pair!r}; known: {sorted(VIEW_PAIRS)}") from None


IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


# --------------------------------------------------------------------------------------------
# schema versions


class SchemaError(ValueError):
    """A prepared shard whose columns do not fit any readable schema version."""


def table_version(schema: pa.Schema) -> int:
    meta = schema.metadata or {}
    raw = meta.get(SCHEMA_VERSION_KEY)
    return int(raw) if raw is not None else 1


def check_readable(version: Any, where: str) -> int:
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise SchemaError(f"{where}: schema_version {version!r} is not a number") from None
    if v not in READABLE_VERSIONS:
        newer = " (written by a newer gammaray: upgrade)" if v > SCHEMA_VERSION else ""
        raise SchemaError(f"{where}: schema_version {v} is not readable (readable: {READABLE_VERSIONS}){newer}")
    return v


def check_table_schema(schema: pa.Schema, where: str, columns: list[str] | None = None) -> None:
    """Raise SchemaError naming `where` and the column if a prepared shard's columns are off.

    Columns added in a later version may be absent from an older shard (`conform_table` fills them)."""
    version = check_readable(table_version(schema), where)
    wanted = columns if columns is not None else [f.name for f in RECORD_SCHEMA]
    for name in wanted:
        field = RECORD_SCHEMA.field(name)
        idx = schema.get_field_index(name)
        if idx < 0:
            if ADDED_IN.get(name, 1) > version:
                continue
            raise SchemaError(f"{where}: column '{name}' is missing (schema version {version})")
        got = schema.field(idx).type
        if not got.equals(field.type) and not (pa.types.is_large_string(got) and pa.types.is_string(field.type)):
            raise SchemaError(f"{where}: column '{name}' has type {got}, expected {field.type}")


def conform_table(table: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """A shard table of any readable version with exactly `columns` (default: all) in RECORD_SCHEMA types."""
    wanted = columns if columns is not None else [f.name for f in RECORD_SCHEMA]
    arrays = []
    for name in wanted:
        field = RECORD_SCHEMA.field(name)
        if name in table.column_names:
            arrays.append(table.column(name).cast(field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, names=wanted)


# --------------------------------------------------------------------------------------------
# record validation (everything but decoding the image)


@dataclass(frozen=True)
class Limits:
    max_text_chars: int = 8192
    max_image_bytes: int = 64 * 2**20


class Invalid(Exception):
    """One reason a record cannot be used (a field, its image or its text), raised by validation and
    preprocessing alike; `reason` is the quarantine `Reason` code, `detail` names the field or the fault."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _text(v: Any, name: str, limits: Limits, required: bool = False) -> str | None:
    if v is None:
        if required:
            raise Invalid(Reason.MISSING_FIELD, f"field '{name}' is null")
        return None
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError as err:
            raise Invalid(Reason.NON_UTF8_TEXT, f"field '{name}': byte {err.start} is not UTF-8") from None
    if not isinstance(v, str):
        raise Invalid(Reason.WRONG_TYPE, f"field '{name}' must be a string, got {type(v).__name__}")
    if "\ufffd" in v:
        raise Invalid(Reason.NON_UTF8_TEXT, f"field '{name}' holds undecodable bytes (U+FFFD)")
    _encodable(v, name)
    if len(v) > limits.max_text_chars:
        raise Invalid(Reason.OVERSIZED_TEXT, f"field '{name}' has {len(v)} chars > {limits.max_text_chars}")
    return v


def _encodable(v: str, name: str) -> None:
    """Lone surrogates (a JSON `"\\ud800"` escape, a path decoded with surrogateescape) are valid in a
    Python str but have no UTF-8 form: Arrow, Parquet and every tokenizer refuse them."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as err:
        raise Invalid(Reason.NON_UTF8_TEXT, f"field '{name}': character {err.start} is a lone surrogate "
                                            f"(U+{ord(v[err.start]):04X}), which UTF-8 cannot encode") from None


# shown as nothing, yet neither whitespace nor a control character to str.isspace(): a title of only
# these tokenizes to [CLS][SEP]
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: whitespace, format characters (zero-width space/joiners, BOM,
    bidi marks, soft hyphen), controls and the blank fillers."""
    return all(c.isspace() or c in _INVISIBLE or unicodedata.category(c) in ("Cf", "Cc", "Zs", "Zl", "Zp")
               for c in text)


def _str_map(v: Any, name: str, limits: Limits) -> list[tuple[str, str]] | None:
    if v is None:
        return None
    if isinstance(v, str):
        import json

        try:
            v = json.loads(v) if v.strip() else None
        except RecursionError:
            raise Invalid(Reason.NESTING_TOO_DEEP, f"field '{name}' is JSON nested too deeply to parse") from None
        except ValueError:  # JSONDecodeError, or an integer literal too long to convert
            raise Invalid(Reason.WRONG_TYPE, f"field '{name}' must be a mapping, got a non-JSON string") from None
        if v is None:
            return None
    if isinstance(v, (list, tuple)):  # Arrow maps come back as lists of (key, value) pairs
        for i, p in enumerate(v):
            if not (isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], _SCALARS)):
                raise Invalid(Reason.WRONG_TYPE, f"field '{name}' must be a mapping or a list of [key, value] pairs; "
                                                 f"item {i} is a {type(p).__name__}" + (f" of {len(p)}" if isinstance(p, (tuple, list)) else ""))
        v = dict(v)
    if not isinstance(v, Mapping):
        raise Invalid(Reason.WRONG_TYPE, f"field '{name}' must be a mapping, got {type(v).__name__}")
    out = []
    for k, val in v.items():
        if not isinstance(k, _SCALARS):
            raise Invalid(Reason.WRONG_TYPE, f"field '{name}' has a key of type {type(k).__name__}")
        key = _text(str(k), f"{name} key", limits) or ""
        if val is None or (isinstance(val, float) and not math.isfinite(val)):
            continue  # NaN / Infinity carry no value: dropped like a null (docs/data.md, Quarantine)
        if not isinstance(val, _SCALARS):
            raise Invalid(Reason.WRONG_TYPE, f"field '{name}[{key[:80]}]' must be a string, got {type(val).__name__}")
        out.append((key, _text(str(val), f"{name}[{key[:80]}]", limits) or ""))
    return sorted(out) or None


_SCALARS = (str, int, float, bool)


def validate_record(values: Mapping[str, Any], limits: Limits = Limits()) -> dict[str, Any]:
    """A raw record (image already as bytes) -> a clean record without sample_index, or `Invalid`.

    Clean means: product_id a non-empty string, title non-empty with collapsed whitespace, texts
    UTF-8 and within `limits`, maps as sorted (key, value) pairs (deterministic shards), image bytes
    non-empty. The image's content is checked separately (pipelines.images.open_checked)."""
    pid = values.get("product_id")
    if pid is None or (isinstance(pid, str) and is_blank(pid)):
        raise Invalid(Reason.MISSING_FIELD, "field 'product_id' is missing or empty")
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise Invalid(Reason.WRONG_TYPE, f"field 'product_id' must be a string, got {type(pid).__name__}")
    pid = str(pid).strip()
    _encodable(pid, "product_id")
    if len(pid) > MAX_PRODUCT_ID_CHARS:
        raise Invalid(Reason.OVERSIZED_TEXT, f"field 'product_id' has {len(pid)} chars > {MAX_PRODUCT_ID_CHARS}")
    title = _text(values.get("title"), "title", limits)
    if title is None or is_blank(title):
        raise Invalid(Reason.EMPTY_TEXT, "field 'title' is null, empty or only invisible characters")
    rec: dict[str, Any] = {"product_id": pid, "title": " ".join(title.split())}
    for name in ("description", "category", "locale"):
        rec[name] = _text(values.get(name), name, limits)
    rec["attributes"] = _str_map(values.get("attributes"), "attributes", limits)
    rec["titles"] = _str_map(values.get("titles"), "titles", limits)
    image = values.get("image")
    if image is None:
        raise Invalid(Reason.MISSING_FIELD, "field 'image' is null")
    if not isinstance(image, (bytes, bytearray)):
        raise Invalid(Reason.WRONG_TYPE, f"field 'image' must be bytes here, got {type(image).__name__}")
    if len(image) == 0:
        raise Invalid(Reason.IMAGE_EMPTY, "zero-byte image")
    if len(image) > limits.max_image_bytes:
        raise Invalid(Reason.IMAGE_TOO_LARGE, f"{len(image)} bytes > {limits.max_image_bytes}")
    rec["image"] = bytes(image)
    extra = values.get("extra_images")
    if extra is not None:
        if not isinstance(extra, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in extra):
            raise Invalid(Reason.WRONG_TYPE, "field 'extra_images' must be a list of bytes")
        extra = [bytes(b) for b in extra if len(b)] or None
    rec["extra_images"] = extra
    return rec
