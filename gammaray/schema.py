"""The product record and the training batch: the contract between the data path and the workers.

`pipelines/` produces records and batches with these names; `workers/` consumes them. Nothing else
crosses that boundary (DESIGN.md section 7).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# A prepared Parquet row (DESIGN.md section 2).
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
    ],
    metadata={b"gammaray.schema_version": str(SCHEMA_VERSION).encode()},
)

REQUIRED_FIELDS = ("product_id", "title", "image")

# Reason codes of quarantined records. Each bad input gets its own code so counts are meaningful.
class Reason:
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_TEXT = "empty_text"
    OVERSIZED_TEXT = "oversized_text"
    NON_UTF8_TEXT = "non_utf8_text"
    DUPLICATE_ID = "duplicate_product_id"
    IMAGE_NOT_FOUND = "image_not_found"
    IMAGE_EMPTY = "image_empty"
    IMAGE_UNDECODABLE = "image_undecodable"
    IMAGE_TRUNCATED = "image_truncated"
    IMAGE_TOO_LARGE = "image_too_large"
    UNREADABLE_SHARD = "unreadable_shard"


QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("epoch", pa.int64()),
    ]
)

# Keys of a preprocessed training batch (numpy/torch, leading dim = batch).
class BatchKeys:
    SAMPLE_INDEX = "sample_index"            # int64 [B]
    PIXELS = "pixel_values"                  # float32 [B,3,H,W], normalised
    PIXELS_AUG = "pixel_values_aug"          # second (augmented) image view
    INPUT_IDS = "input_ids"                  # int64 [B,L]
    ATTENTION_MASK = "attention_mask"        # int64 [B,L]
    INPUT_IDS_AUG = "input_ids_aug"          # second (augmented) text view
    ATTENTION_MASK_AUG = "attention_mask_aug"
    REJECT = "reject_reason"                 # str, "" for a good row
    PRODUCT_ID = "product_id"
    SOURCE = "source"
    ROW = "row"
    DETAIL = "reject_detail"


IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
