"""Per-record preprocessing: decode, resize, augment, tokenize.

Plain functions over numpy batches, so the same code runs inside Ray Data operators, a torch
DataLoader (for the ingest benchmark) and a tight loop. Randomness is keyed by
(seed, epoch, sample_index): a record gets the same augmentation whichever worker decodes it and
however often the run is resumed, which is what makes exact resume possible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from gammaray.config import AugmentConfig
from gammaray.schema import IMAGE_MEAN, IMAGE_STD, BatchKeys as K, Reason

from .images import BadImage, open_checked


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int
    max_image_pixels: int
    max_text_tokens: int
    max_text_chars: int
    augment: AugmentConfig
    tokenizer_uri: str
    seed: int
    epoch: int
    with_aug_views: bool
    train: bool  # False: no randomness at all (evaluation)


def record_text(title: str | None, description: str | None, category: str | None = None) -> str:
    """The text view of a record: title first (it survives truncation), then category and description."""
    parts = [(title or "").strip(), (category or "").strip(), (description or "").strip()]
    return ". ".join(p for p in parts if p)


def _to_array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return ((arr - IMAGE_MEAN) / IMAGE_STD).transpose(2, 0, 1).copy()


def resize_view(img: Image.Image, size: int) -> Image.Image:
    return img.resize((size, size), Image.BICUBIC)


def augment_view(img: Image.Image, size: int, aug: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Random resized crop, horizontal flip, colour jitter (the SimCLR/CLIP recipe, on PIL)."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*aug.crop_scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            break
    img = img.resize((size, size), Image.BICUBIC)
    if aug.flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if aug.color_jitter > 0:
        j = aug.color_jitter
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhancer(img).enhance(float(rng.uniform(1 - j, 1 + j)))
    return img


def augment_text(text: str, aug: AugmentConfig, rng: np.random.Generator) -> str:
    """Word-level swap of neighbours; token dropout happens after tokenisation."""
    words = text.split()
    if aug.word_swap > 0 and len(words) > 1:
        for i in range(len(words) - 1):
            if rng.random() < aug.word_swap:
                words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _rng(spec: PreprocessSpec, sample_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, spec.epoch, int(sample_index), stream])


def preprocess_batch(batch: dict[str, Any], spec: PreprocessSpec, tokenizer) -> dict[str, np.ndarray]:
    """Raw record columns -> model-ready arrays. Bad rows stay in the batch with a reject reason
    (and zero tensors) so that the consumer counts them and the data position stays exact."""
    n = len(batch["sample_index"])
    size = spec.image_size
    pixels = np.zeros((n, 3, size, size), dtype=np.float32)
    pixels_aug = np.zeros_like(pixels) if spec.with_aug_views else None
    reasons = [""] * n
    details = [""] * n
    texts, texts_aug = [], []
    for i in range(n):
        idx = int(batch["sample_index"][i])
        title = batch["title"][i]
        try:
            if title is None or not str(title).strip():
                raise BadImage(Reason.EMPTY_TEXT, "title is empty")
            text = record_text(title, batch["description"][i] if "description" in batch else None,
                               batch["category"][i] if "category" in batch else None)
            if len(text) > spec.max_text_chars:
                raise BadImage(Reason.OVERSIZED_TEXT, f"{len(text)} chars > {spec.max_text_chars}")
            img = open_checked(batch["image"][i], spec.max_image_pixels)
            pixels[i] = _to_array(resize_view(img, size))
            if pixels_aug is not None:
                rng = _rng(spec, idx, 0) if spec.train else np.random.default_rng(0)
                pixels_aug[i] = _to_array(augment_view(img, size, spec.augment, rng))
                texts_aug.append(augment_text(text, spec.augment, _rng(spec, idx, 1)))
            texts.append(text)
        except BadImage as bad:
            reasons[i], details[i] = bad.reason, bad.detail[:300]
            texts.append("")
            if pixels_aug is not None:
                texts_aug.append("")

    L = spec.max_text_tokens
    enc = tokenizer(texts, max_length=L, truncation=True, padding="max_length", return_tensors="np")
    out: dict[str, np.ndarray] = {
        K.SAMPLE_INDEX: np.asarray(batch["sample_index"], dtype=np.int64),
        K.PIXELS: pixels,
        K.INPUT_IDS: enc["input_ids"].astype(np.int64),
        K.ATTENTION_MASK: enc["attention_mask"].astype(np.int64),
        K.REJECT: np.asarray(reasons, dtype=object),
        K.DETAIL: np.asarray(details, dtype=object),
        K.PRODUCT_ID: np.asarray(batch["product_id"], dtype=object),
        K.SOURCE: np.asarray(batch.get("source", [""] * n), dtype=object),
        K.ROW: np.asarray(batch.get("row", [-1] * n), dtype=np.int64),
    }
    if pixels_aug is not None:
        enc_a = tokenizer(texts_aug, max_length=L, truncation=True, padding="max_length", return_tensors="np")
        ids_a = enc_a["input_ids"].astype(np.int64)
        mask_a = enc_a["attention_mask"].astype(np.int64)
        special = set(tokenizer.all_special_ids)
        for i in range(n):
            ids_a[i], mask_a[i] = _drop(ids_a[i], mask_a[i], spec, int(batch["sample_index"][i]), special,
                                        tokenizer.pad_token_id or 0)
        out[K.PIXELS_AUG] = pixels_aug
        out[K.INPUT_IDS_AUG] = ids_a
        out[K.ATTENTION_MASK_AUG] = mask_a
    return out


def _drop(ids: np.ndarray, mask: np.ndarray, spec: PreprocessSpec, idx: int, special: set[int], pad_id: int):
    p = spec.augment.token_dropout
    if p <= 0 or not spec.train:
        return ids, mask
    rng = _rng(spec, idx, 2)
    keep = [t for t, m in zip(ids.tolist(), mask.tolist()) if m and (t in special or rng.random() >= p)]
    new_ids = np.full_like(ids, pad_id)
    new_ids[: len(keep)] = keep
    new_mask = np.zeros_like(mask)
    new_mask[: len(keep)] = 1
    return new_ids, new_mask
