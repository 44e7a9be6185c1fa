"""Queries through a checkpoint's towers with the preprocessing of training (evaluation mode: no
augmentation): texts and image bytes -> L2-normalised vectors in the embedding space that
`gammaray embed` writes. Used by `gammaray search` (and any service that embeds requests).

A text query is the text view of a record whose title is the query (pipelines.preprocess.record_text),
an image query is decoded, checked and resized exactly as a catalogue image. A query that the
preprocessing rejects raises QueryError with the reason (empty_text, image_undecodable, ...).
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import torch

from gammaray.config import StorageConfig
from gammaray.schema import BatchKeys as K
from pipelines import storage
from pipelines.preprocess import preprocess_batch
from pipelines.tokenizer import load as load_tokenizer
from workers.evaluation.embed import model_fingerprint
from workers.evaluation.export import open_checkpoint
from workers.models.registry import load_model
from workers.runtime import stream_spec


class QueryError(ValueError):
    """A query the preprocessing rejects; `reason` is one of gammaray.schema.Reason."""

    def __init__(self, what: str, reason: str, detail: str):
        super().__init__(f"{what}: {reason} ({detail})" if detail else f"{what}: {reason}")
        self.reason, self.detail = reason, detail


@lru_cache(maxsize=1)
def _placeholder_image() -> bytes:
    """Stands in for the image of a text-only query (preprocess_batch reads both views); never embedded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


class QueryEncoder:
    """A checkpoint's model, loaded once, with its tokenizer and preprocessing."""

    def __init__(self, checkpoint_uri: str, storage_cfg: StorageConfig | None = None, device: str = "cpu"):
        self.ckpt = open_checkpoint(checkpoint_uri, storage_cfg)
        self.cfg = self.ckpt.cfg
        self.fingerprint = model_fingerprint(self.ckpt.model_dir)
        self.device = torch.device(device)
        self.model = load_model(self.ckpt.model_dir).to(self.device).eval()
        self.spec = stream_spec(self.cfg, "unused", [], epoch=0, train=False, with_aug=False, batch_size=1).preprocess
        self.tokenizer = load_tokenizer(self.spec.tokenizer_uri, storage.S3Settings.from_config(self.cfg.storage))

    def _prepare(self, texts: list[str] | None, images: list[bytes] | None) -> dict[str, np.ndarray]:
        n = len(texts or images or [])
        batch = {"sample_index": np.arange(n, dtype=np.int64), "product_id": np.asarray([f"query-{i}" for i in range(n)], dtype=object),
                 "title": np.asarray(texts if texts is not None else ["query"] * n, dtype=object),
                 "description": np.asarray([None] * n, dtype=object), "category": np.asarray([None] * n, dtype=object),
                 "image": np.asarray(images if images is not None else [_placeholder_image()] * n, dtype=object)}
        arr = preprocess_batch(batch, self.spec, self.tokenizer)
        for i, reason in enumerate(arr[K.REJECT]):
            if reason:
                what = f"query {i + 1} ({'text' if texts is not None else 'image'})"
                raise QueryError(what, str(reason), str(arr[K.DETAIL][i]))
        return arr

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """[n, d] normalised text embeddings (the model's `text` output)."""
        arr = self._prepare([str(t) for t in texts], None)
        out = self.model({K.INPUT_IDS: torch.from_numpy(arr[K.INPUT_IDS]).to(self.device),
                          K.ATTENTION_MASK: torch.from_numpy(arr[K.ATTENTION_MASK]).to(self.device)})
        return out["text"].float().cpu().numpy()

    @torch.no_grad()
    def encode_images(self, images: list[bytes]) -> np.ndarray:
        """[n, d] normalised image embeddings (the model's `image` output) of encoded image files."""
        arr = self._prepare(None, list(images))
        out = self.model({K.PIXELS: torch.from_numpy(arr[K.PIXELS]).to(self.device)})
        return out["image"].float().cpu().numpy()

    def encode_query(self, text: str | None = None, image: bytes | None = None) -> np.ndarray:
        """One query vector: the text's, the image's, or (both given) their normalised mean."""
        if text is None and image is None:
            raise ValueError("a query needs a text, an image or both")
        parts = []
        if text is not None:
            parts.append(self.encode_texts([text])[0])
        if image is not None:
            parts.append(self.encode_images([image])[0])
        v = np.sum(parts, axis=0)
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
