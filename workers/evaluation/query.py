"""Queries through a checkpoint's towers with the preprocessing of training (evaluation mode: no
augmentation): texts and image bytes -> L2-normalised vectors in the embedding space that
`gammaray embed` writes. Used by `gammaray search` (and any service that embeds requests).

A text query is the text view of a record whose title is the query (pipelines.preprocess.record_text),
an image query is decoded, checked and resized exactly as a catalogue image, and a whole record
(title, description, category, image) gets the vectors `gammaray embed` writes for it. A query that
the preprocessing rejects raises QueryError with the reason (empty_text, image_undecodable, ...);
`encode_items` returns it per item instead, so that one bad item does not fail a batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from gammaray.config import StorageConfig
from gammaray.schema import BatchKeys as K
from pipelines.storage import Store
from pipelines.preprocess import PreprocessSpec, preprocess_batch
from pipelines.tokenizer import load as load_tokenizer
from workers.evaluation.embed import model_fingerprint
from workers.evaluation.evaluate import embedding_outputs
from workers.evaluation.export import open_checkpoint
from workers.models.registry import load_model


class QueryError(ValueError):
    """A query the preprocessing (or the service) rejects; `reason` is one of gammaray.schema.Reason, or a
    request-level reason of the service (malformed_json, request_too_large, unknown_field)."""

    def __init__(self, what: str, reason: str, detail: str):
        super().__init__(f"{what}: {reason} ({detail})" if detail else f"{what}: {reason}")
        self.what, self.reason, self.detail = what, reason, detail


@lru_cache(maxsize=1)
def _placeholder_image() -> bytes:
    """Stands in for the image of a text-only query (preprocess_batch reads both views); never embedded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Item:
    """One thing to embed. `text`: a query text (the title of a record with nothing else) -> its `text`
    vector; `image`: encoded image bytes -> its `image` vector; `record`: a catalogue record (title,
    description, category and, if it has one, its image) -> every embedding output of the model, as
    `gammaray embed` computes them for that record (the image ones only when it has an image)."""

    kind: str                      # "text" | "image" | "record"
    title: str | None = None
    description: str | None = None
    category: str | None = None
    image: bytes | None = None
    what: str = "query"            # names the item in an error


class QueryEncoder:
    """A checkpoint's model, loaded once, with its tokenizer and preprocessing."""

    def __init__(self, checkpoint_uri: str, storage_cfg: Store | StorageConfig | None = None, device: str = "cpu"):
        self.ckpt = open_checkpoint(checkpoint_uri, storage_cfg)
        self.cfg = self.ckpt.cfg
        self.fingerprint = model_fingerprint(self.ckpt.model_dir)
        self.device = torch.device(device)
        if self.device.type == "cuda":  # full fp32, as gammaray embed on a GPU: the same vectors as on CPU
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = load_model(self.ckpt.model_dir).to(self.device).eval()
        self.spec = PreprocessSpec.from_config(self.cfg, epoch=0, train=False, with_aug=False)
        self.tokenizer = load_tokenizer(self.spec.tokenizer_uri, self.ckpt.store)

    @torch.no_grad()
    def encode_items(self, items: list[Item]) -> list[dict[str, np.ndarray] | QueryError]:
        """Each item's vectors ({output name: [d] float32, L2-normalised}) or the QueryError that names why
        the preprocessing rejected it: one bad item never fails the others (a batch of the service holds
        items of several requests). One preprocess_batch over all items, one forward over the good ones,
        through the towers some item needs."""
        n = len(items)
        if not n:
            return []
        batch = {"sample_index": np.arange(n, dtype=np.int64),
                 "product_id": np.asarray([f"query-{i}" for i in range(n)], dtype=object),
                 "title": np.asarray([it.title if it.kind != "image" else "query" for it in items], dtype=object),
                 "description": np.asarray([it.description if it.kind == "record" else None for it in items], dtype=object),
                 "category": np.asarray([it.category if it.kind == "record" else None for it in items], dtype=object),
                 "image": np.asarray([it.image if it.image is not None else _placeholder_image() for it in items],
                                     dtype=object)}
        arr = preprocess_batch(batch, self.spec, self.tokenizer)
        out: list[dict[str, np.ndarray] | QueryError] = [{} for _ in items]
        good = []
        for i, reason in enumerate(arr[K.REJECT]):
            if reason:
                out[i] = QueryError(items[i].what, str(reason), str(arr[K.DETAIL][i]))
            else:
                good.append(i)
        if not good:
            return out
        sel = np.asarray(good)
        inputs = {}
        if any(items[i].kind == "image" or (items[i].kind == "record" and items[i].image is not None) for i in good):
            inputs[K.PIXELS] = torch.from_numpy(np.ascontiguousarray(arr[K.PIXELS][sel])).to(self.device)
        if any(items[i].kind != "image" for i in good):
            inputs[K.INPUT_IDS] = torch.from_numpy(np.ascontiguousarray(arr[K.INPUT_IDS][sel])).to(self.device)
            inputs[K.ATTENTION_MASK] = torch.from_numpy(np.ascontiguousarray(arr[K.ATTENTION_MASK][sel])).to(self.device)
        res = {k: v.float().cpu().numpy() for k, v in embedding_outputs(self.model(inputs), sel.size).items()}
        for row, i in enumerate(good):
            it = items[i]
            if it.kind == "text":
                out[i] = {"text": res["text"][row]}
            elif it.kind == "image":
                out[i] = {"image": res["image"][row]}
            else:  # a record: what embed writes for it (the image outputs only from a real image)
                out[i] = {k: v[row] for k, v in res.items() if it.image is not None or not _from_image(k)}
        return out

    def _first_error(self, results: list) -> list[dict[str, np.ndarray]]:
        for r in results:
            if isinstance(r, QueryError):
                raise r
        return results

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """[n, d] normalised text embeddings (the model's `text` output)."""
        items = [Item("text", title=str(t), what=f"query {i + 1} (text)") for i, t in enumerate(texts)]
        return np.stack([r["text"] for r in self._first_error(self.encode_items(items))])

    def encode_images(self, images: list[bytes]) -> np.ndarray:
        """[n, d] normalised image embeddings (the model's `image` output) of encoded image files."""
        items = [Item("image", image=bytes(b), what=f"query {i + 1} (image)") for i, b in enumerate(images)]
        return np.stack([r["image"] for r in self._first_error(self.encode_items(items))])

    def encode_query(self, text: str | None = None, image: bytes | None = None) -> np.ndarray:
        """One query vector: the text's, the image's, or (both given) their normalised mean."""
        if text is None and image is None:
            raise ValueError("a query needs a text, an image or both")
        parts = []
        if text is not None:
            parts.append(self.encode_texts([text])[0])
        if image is not None:
            parts.append(self.encode_images([image])[0])
        return mean_direction(parts)


def mean_direction(parts: list[np.ndarray]) -> np.ndarray:
    """The normalised sum of unit vectors (a text and an image query together)."""
    v = np.sum(parts, axis=0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def _from_image(output: str) -> bool:
    """Whether a model output comes from the image tower (`image`, `image_specific`, ...)."""
    return output == "image" or output.startswith("image_")
