"""data.*: the catalogue, the stream and the preprocessing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from .base import Section


# --------------------------------------------------------------------------------------------
# data


class AugmentConfig(Section):
    crop_scale: tuple[float, float] = Field((0.6, 1.0), description="Random resized crop area range.")
    flip: bool = True
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="Brightness/contrast/saturation jitter.")
    token_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Probability of dropping a text token.")
    word_swap: float = Field(0.1, ge=0.0, lt=1.0, description="Probability of swapping adjacent words.")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError("crop_scale must satisfy 0 < lo <= hi <= 1")
        return v


class FeatureStoreConfig(Section):
    """Cached pooled features of locked towers (written by `gammaray embed --features`): with
    `train` set, `gammaray pretrain` trains only the heads (and temperature), in one process, from
    these vectors; no tower runs, so it goes at thousands of records/s on a CPU."""

    train: str | None = Field(None, description="Feature store of data.train (local or s3://); None = train the towers live.")
    val: str | None = Field(None, description="Feature store of data.val (held-out evaluation while training heads).")


Channel = Annotated[int, Field(ge=0, le=255)]  # one 8-bit colour channel


class DataConfig(Section):
    train: str | None = Field(None, description="Prepared catalogue (shards + manifest.json), local path or s3://.")
    val: str | None = Field(None, description="Held-out prepared catalogue for evaluation.")
    features: FeatureStoreConfig = FeatureStoreConfig()
    tokenizer: str | None = Field(
        None, description="Hugging Face tokenizer folder (local or s3://); None = <train>/../tokenizer."
    )
    view_pair: Literal["image_text", "text_text", "image_image"] = Field(
        "image_text", description="The positive pair: image_text (photo <-> text), text_text (text <-> its title in "
                                  "data.pair_locale, from the record's `titles`), image_image (photo <-> one of `extra_images`)."
    )
    pair_locale: str | None = Field(None, description="view_pair=text_text: locale of the second text (a key of `titles`).")
    image_size: int = Field(64, ge=8, description="Side of the square image fed to the image tower.")
    max_image_pixels: int = Field(25_000_000, ge=1, description="Larger images are quarantined (decompression bombs).")
    max_image_bytes: int = Field(
        64 * 2**20, ge=1, description="prepare: larger image files are quarantined as image_too_large, from their "
                                      "size before any byte is read (a read never goes past this many bytes)."
    )
    max_record_bytes: int = Field(
        16 * 2**20, ge=1, description="prepare: a JSONL or CSV line longer than this is quarantined as oversized_record "
                                      "while it streams past (never held in memory); a JSON array file is read whole "
                                      "only up to this size."
    )
    allow_outside_paths: bool = Field(
        False, description="prepare: read local image paths that resolve outside the source folder (.., absolute "
                           "paths, symlinks). Off: they are quarantined as image_path_outside_source."
    )
    image_background: tuple[Channel, Channel, Channel] = Field(
        (255, 255, 255), description="RGB colour that transparent pixels (RGBA, LA, palette or tRNS transparency) are "
                                     "composited onto when an image is decoded for training, embedding and evaluation."
    )
    max_text_tokens: int = Field(32, ge=4, description="Token budget per text (truncate/pad).")
    max_text_chars: int = Field(8192, ge=1, description="Longer texts are quarantined as oversized.")
    augment: AugmentConfig = AugmentConfig()
    batch_size: int | Literal["auto"] = Field(
        16, description="Per-device micro-batch of good records; auto = ray.auto.global_batch_size / workers."
    )
    shuffle: bool = Field(True, description="Shuffle row groups and rows within them every epoch (seeded).")
    preprocess_num_cpus: float = Field(
        1.0, gt=0, description="Logical CPUs per Ray Data read+preprocess task (below 1 packs more worker processes per "
                               "core: slower to start, rarely faster)."
    )
    preprocess_concurrency: int | Literal["auto"] | None = Field(
        None, description="Max concurrent read+preprocess tasks per training worker (None = as resources allow, "
                          "auto = the cluster's CPUs left by the training workers, shared among them)."
    )
    tokenizer_sample: int = Field(
        3_000_000, ge=1, description="Texts (titles, descriptions, categories) of a seeded sample of the catalogue that "
                                     "`prepare --build-tokenizer` trains the tokenizer on: its time stops growing "
                                     "with the catalogue beyond this.")
    preprocess_segments_per_task: int = Field(
        4, ge=1, description="Row groups read+preprocessed by one Ray Data task (the task's batch; more = fewer, larger tasks)."
    )
    prefetch_batches: int = Field(4, ge=0, description="Preprocessed blocks (row groups) buffered ahead of each training worker.")
    prefetch_next_epoch: bool = Field(
        True, description="Start the next epoch's pipeline once the current one has produced its last block."
    )
    jpeg_draft: bool = Field(True, description="Decode JPEGs at a reduced scale (libjpeg DCT scaling) when much larger than needed.")
    quarantine_max_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Abort the run if more than this fraction of records is bad."
    )

    @field_validator("batch_size", "preprocess_concurrency")
    @classmethod
    def _positive_or_auto(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


