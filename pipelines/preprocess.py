"""Per-record preprocessing: decode, resize, augment, tokenize, for the configured view pair.

Plain functions over numpy batches, so the same code runs inside Ray Data operators, a torch
DataLoader (for the ingest benchmark) and a tight loop. Randomness is keyed by
(seed, epoch, sample_index): a record gets the same augmentation whichever worker decodes it and
however often the run is resumed, which is what makes exact resume possible.

View pairs (`gammaray.schema.VIEW_PAIRS`):
  image_text   the image -> PIXELS, the record text -> INPUT_IDS (the default)
  text_text    the record text -> INPUT_IDS, its title in `pair_locale` (the `titles` map) -> INPUT_IDS_PAIR
  image_image  the image -> PIXELS, one of `extra_images` (chosen per epoch) -> PIXELS_PAIR
A record that lacks the second view stays in the batch with reject reason `missing_view`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from gammaray.config import AugmentConfig, GammarayConfig
from gammaray.schema import IMAGE_MEAN, IMAGE_STD, BatchKeys as K, Invalid, Reason

from .images import WHITE, open_checked

# columns of a prepared shard that preprocessing reads, per view pair
COLUMNS = {
    "image_text": ["product_id", "sample_index", "title", "description", "category", "image"],
    "text_text": ["product_id", "sample_index", "title", "description", "category", "titles"],
    "image_image": ["product_id", "sample_index", "title", "image", "extra_images"],
}


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
    view_pair: str = "image_text"
    pair_locale: str | None = None  # text_text: the locale of the second text view
    jpeg_draft: bool = True         # decode JPEGs at a reduced scale when they are much larger than needed
    pixels_uint8: bool = False      # leave pixels as uint8 [N,H,W,3] (4x less to move); `normalise` later
    image_background: tuple[int, int, int] = WHITE  # transparent pixels are composited onto this (data.image_background)

    @classmethod
    def from_config(cls, cfg: GammarayConfig, *, epoch: int, train: bool, with_aug: bool) -> "PreprocessSpec":
        """The preprocessing of a run's config (data.*, run.seed, the run's tokenizer) for one epoch."""
        from .tokenizer import tokenizer_uri

        d = cfg.data
        return cls(image_size=d.image_size, max_image_pixels=d.max_image_pixels, max_text_tokens=d.max_text_tokens,
                   max_text_chars=d.max_text_chars, augment=d.augment, tokenizer_uri=tokenizer_uri(cfg),
                   seed=cfg.run.seed, epoch=epoch, with_aug_views=with_aug, train=train, view_pair=d.view_pair,
                   pair_locale=d.pair_locale, jpeg_draft=d.jpeg_draft, image_background=tuple(d.image_background))

    @property
    def columns(self) -> list[str]:
        return COLUMNS[self.view_pair]

    @property
    def needs_image(self) -> bool:
        return self.view_pair in ("image_text", "image_image")

    @property
    def needs_text(self) -> bool:
        return self.view_pair in ("image_text", "text_text")


PIXEL_KEYS = (K.PIXELS, K.PIXELS_AUG, K.PIXELS_PAIR)


def record_text(title: str | None, description: str | None, category: str | None = None) -> str:
    """The text view of a record: title first (it survives truncation), then category and description."""
    parts = [(title or "").strip(), (category or "").strip(), (description or "").strip()]
    return ". ".join(p for p in parts if p)


_SCALE = np.float32(1.0 / (255.0 * IMAGE_STD))
_OFFSET = np.float32(-IMAGE_MEAN / IMAGE_STD)


def normalise(u8: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W], (x/255 - mean)/std, in one vectorised pass."""
    out = np.empty((u8.shape[0], 3, u8.shape[1], u8.shape[2]), dtype=np.float32)
    np.multiply(u8.transpose(0, 3, 1, 2), _SCALE, out=out, casting="unsafe")
    out += _OFFSET
    return out


def _to_array(img: Image.Image) -> np.ndarray:
    return normalise(np.asarray(img)[None])[0]


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


def _col(batch: dict[str, Any], name: str, n: int):
    v = batch.get(name)
    return v if v is not None else [None] * n


def _as_map(v: Any) -> dict:
    if v is None:
        return {}
    if isinstance(v, dict):
        return v
    return dict(v)  # Arrow map -> list of (key, value) pairs


def _draft_size(spec: PreprocessSpec) -> tuple[int, int] | None:
    if not spec.jpeg_draft:
        return None
    # a random crop keeps >= crop_scale[0] of the area; keep enough pixels for it to still cover size
    side = spec.image_size * 2 if spec.with_aug_views else spec.image_size
    return (side, side)


def preprocess_batch(batch: dict[str, Any], spec: PreprocessSpec, tokenizer) -> dict[str, np.ndarray]:
    """Raw record columns -> model-ready arrays. Bad rows stay in the batch with a reject reason
    (and zero tensors) so that the consumer counts them and the data position stays exact.

    Rows whose `reject_reason` is already set (an unreadable shard) pass through untouched."""
    n = len(batch["sample_index"])
    size = spec.image_size
    pair = spec.view_pair
    draft = _draft_size(spec)
    aug = spec.with_aug_views and pair == "image_text"
    img_u8 = np.zeros((n, size, size, 3), dtype=np.uint8) if spec.needs_image else None
    aug_u8 = np.zeros_like(img_u8) if aug else None
    pair_u8 = np.zeros_like(img_u8) if pair == "image_image" else None
    prior = batch.get(K.REJECT)
    reasons = [str(r) for r in prior] if prior is not None else [""] * n
    details = [str(d) for d in batch[K.DETAIL]] if K.DETAIL in batch else [""] * n
    texts = [""] * n
    texts_aug = [""] * n if aug else None
    texts_pair = [""] * n if pair == "text_text" else None
    titles, descs, cats = _col(batch, "title", n), _col(batch, "description", n), _col(batch, "category", n)
    for i in range(n):
        if reasons[i]:
            continue
        idx = int(batch["sample_index"][i])
        try:
            if spec.needs_text:
                title = titles[i]
                if title is None or not str(title).strip():
                    raise Invalid(Reason.EMPTY_TEXT, "title is empty")
                text = record_text(title, descs[i], cats[i])
                if len(text) > spec.max_text_chars:
                    raise Invalid(Reason.OVERSIZED_TEXT, f"{len(text)} chars > {spec.max_text_chars}")
                texts[i] = text
                if texts_pair is not None:
                    other = _as_map(batch["titles"][i]).get(spec.pair_locale or "")
                    if not other or not str(other).strip():
                        raise Invalid(Reason.MISSING_VIEW, f"no title for locale {spec.pair_locale!r}")
                    texts_pair[i] = str(other)
                if texts_aug is not None:
                    texts_aug[i] = augment_text(text, spec.augment, _rng(spec, idx, 1))
            if img_u8 is not None:
                img = open_checked(batch["image"][i], spec.max_image_pixels, draft, spec.image_background)
                img_u8[i] = np.asarray(resize_view(img, size))
                if aug_u8 is not None:
                    rng = _rng(spec, idx, 0) if spec.train else np.random.default_rng(0)
                    aug_u8[i] = np.asarray(augment_view(img, size, spec.augment, rng))
                if pair_u8 is not None:
                    extra = [b for b in (batch["extra_images"][i] or []) if b]
                    if not extra:
                        raise Invalid(Reason.MISSING_VIEW, "no extra image")
                    k = int(_rng(spec, idx, 3).integers(len(extra))) if spec.train and len(extra) > 1 else 0
                    extra_img = open_checked(extra[k], spec.max_image_pixels, draft, spec.image_background)
                    pair_u8[i] = np.asarray(resize_view(extra_img, size))
        except Invalid as bad:
            reasons[i], details[i] = bad.reason, bad.detail[:300]
            texts[i] = ""
            if img_u8 is not None:
                img_u8[i] = 0

    L = spec.max_text_tokens
    out: dict[str, np.ndarray] = {
        K.SAMPLE_INDEX: np.array(batch["sample_index"], dtype=np.int64),  # a writable copy
        K.REJECT: np.asarray(reasons, dtype=object),
        K.DETAIL: np.asarray(details, dtype=object),
        K.PRODUCT_ID: np.asarray(batch["product_id"], dtype=object),
        K.SOURCE: np.asarray(batch.get("source", [""] * n), dtype=object),
        K.ROW: np.asarray(batch.get("row", [-1] * n), dtype=np.int64),
    }
    finish = (lambda a: a) if spec.pixels_uint8 else normalise
    if img_u8 is not None:
        out[K.PIXELS] = finish(img_u8)
    if spec.needs_text:
        out[K.INPUT_IDS], out[K.ATTENTION_MASK] = _tokenize(tokenizer, texts, L)
    if pair_u8 is not None:
        out[K.PIXELS_PAIR] = finish(pair_u8)
    if texts_pair is not None:
        out[K.INPUT_IDS_PAIR], out[K.ATTENTION_MASK_PAIR] = _tokenize(tokenizer, texts_pair, L)
    if aug_u8 is not None and texts_aug is not None:
        ids_a, mask_a = _tokenize(tokenizer, texts_aug, L)
        special = set(tokenizer.all_special_ids)
        for i in range(n):
            ids_a[i], mask_a[i] = _drop(ids_a[i], mask_a[i], spec, int(batch["sample_index"][i]), special,
                                        tokenizer.pad_token_id or 0)
        out[K.PIXELS_AUG] = finish(aug_u8)
        out[K.INPUT_IDS_AUG] = ids_a
        out[K.ATTENTION_MASK_AUG] = mask_a
    return out


def _tokenize(tokenizer, texts: list[str], L: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(texts, max_length=L, truncation=True, padding="max_length", return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


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
