"""Cached tower features: what locked towers produce once, so that only the heads train.

A *feature store* is written by `gammaray embed --features` (workers/evaluation/embed.py) from a prepared
catalogue:

    OUT/_embed.json                    kind "features", the catalogue, the columns and widths
    OUT/model/ + OUT/config.json       the model whose towers made the features (also a checkpoint)
    OUT/embeddings/part-NNNNN.parquet  product_id, sample_index, image_features, text_features
    OUT/prompts.parquet                category, prompt, text_features of the catalogue's categories
    OUT/quarantine/part-NNNNN.parquet  records that failed to decode

`load_feature_store` reads one into memory (a few MB per thousand records: 4 bytes x (1280 + 384) per
record for EfficientNet-Lite0 + MiniLM) with the category of every record, which is what
workers/training/heads.py trains on and workers/evaluation/heads.py evaluates.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gammaray.config import GammarayConfig, StorageConfig, apply_overrides
from pipelines import storage
from pipelines.storage import Store
from pipelines.tokenizer import load as load_tokenizer, tokenizer_uri
from workers.evaluation.evaluate import read_labels
from workers.evaluation.metrics import category_prompts
from workers.models.registry import build_model, save_model

FEATURE_SUFFIX = "_features"


@dataclass
class FeatureSet:
    """One split in memory, rows sorted by sample_index."""

    uri: str
    sample_index: np.ndarray          # int64 [N]
    image: np.ndarray                 # float32 [N, Di]
    text: np.ndarray                  # float32 [N, Dt]
    category: list[str | None]        # per row
    prompts: dict[str, np.ndarray] = field(default_factory=dict)   # category -> text features [Dt]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.sample_index.shape[0])

    @property
    def widths(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.text.shape[1])

    def subset(self, rows: np.ndarray) -> "FeatureSet":
        return FeatureSet(self.uri, self.sample_index[rows], self.image[rows], self.text[rows],
                          [self.category[i] for i in rows], self.prompts, self.meta)


def locked_config(cfg: GammarayConfig) -> GammarayConfig:
    """The config with both towers fully locked (what a feature store is made with)."""
    return apply_overrides(cfg, {"model.image.locked": True, "model.image.unlocked_layers": 0,
                                 "model.text.locked": True, "model.text.unlocked_layers": 0})


def write_tower_model(cfg: GammarayConfig, store: Store, out_uri: str) -> str:
    """Build the model of `cfg` (towers from model.*.pretrained or hf_config, heads seeded by
    run.seed) and write it as OUT/model + OUT/config.json in `store`; returns OUT, a checkpoint URI.
    A feature store that already holds a model keeps it (a rerun must embed with the same towers)."""
    out_uri = out_uri.rstrip("/")
    if store.exists(storage.join(out_uri, "config.json")):
        return out_uri
    cfg = locked_config(cfg)
    tokenizer = load_tokenizer(tokenizer_uri(cfg), store)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory(prefix="gammaray-features-") as tmp:
        save_model(model, os.path.join(tmp, "model"), cfg.model, tokenizer)
        store.upload_dir(os.path.join(tmp, "model"), storage.join(out_uri, "model"))
    store.write_json(storage.join(out_uri, "config.json"), cfg.model_dump(mode="json"))
    return out_uri


@torch.no_grad()
def write_prompt_features(model, cfg: GammarayConfig, store: Store, tokenizer, categories: list[str], out_uri: str) -> None:
    """The zero-shot prompts of `categories` through the locked text tower: OUT/prompts.parquet."""
    prompts = category_prompts(categories, cfg.eval.prompt_template)
    feats = np.zeros((len(prompts), 0), np.float32)
    if prompts:
        enc = tokenizer(prompts, max_length=cfg.data.max_text_tokens, truncation=True, padding="max_length",
                        return_tensors="pt")
        feats = model.text_features(enc["input_ids"], enc["attention_mask"])[0].float().cpu().numpy()
    flat = pa.array(np.ascontiguousarray(feats, np.float32).reshape(-1))
    table = pa.table({"category": pa.array(categories, pa.string()), "prompt": pa.array(prompts, pa.string()),
                      "text_features": pa.FixedSizeListArray.from_arrays(flat, max(1, feats.shape[1]))
                      if prompts else pa.array([], pa.list_(pa.float32()))})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(storage.join(out_uri, "prompts.parquet"), buf.getvalue())


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column).combine_chunks()
    width = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


def load_feature_store(uri: str, store: Store | StorageConfig | None = None, with_labels: bool = True) -> FeatureSet:
    """A feature store in memory: every good record's features (sorted by sample_index), the
    category of each (read from the catalogue the store was made from) and the prompt features."""
    store = Store.of(store)
    uri = uri.rstrip("/")
    meta_uri = storage.join(uri, "_embed.json")
    if not store.exists(meta_uri):
        raise FileNotFoundError(f"{uri}: not a feature store (no _embed.json; write one with `gammaray embed "
                                "--features`)")
    meta = store.read_json(meta_uri)
    if meta.get("kind") != "features":
        raise ValueError(f"{uri} holds head embeddings, not tower features (made without --features)")
    tables = []
    for f in sorted(store.list_files(storage.join(uri, "embeddings"), ".parquet")):
        fs, path = store.resolve(f)
        tables.append(pq.read_table(path, filesystem=fs))
    if not tables:
        raise FileNotFoundError(f"{uri}: the feature store has no embeddings/*.parquet (an interrupted "
                                "`gammaray embed --features`? rerun it: it resumes)")
    table = pa.concat_tables(tables)
    index = table.column("sample_index").to_numpy()
    order = np.argsort(index, kind="stable")
    image = _matrix(table, "image" + FEATURE_SUFFIX)[order]
    text = _matrix(table, "text" + FEATURE_SUFFIX)[order]
    index = index[order]
    category: list[str | None] = [None] * len(index)
    if with_labels:
        labels = read_labels(meta["data"], store)
        category = [labels.get(int(i), {}).get("category") for i in index]
    prompts: dict[str, np.ndarray] = {}
    p_uri = storage.join(uri, "prompts.parquet")
    if store.exists(p_uri):
        fs, path = store.resolve(p_uri)
        pt = pq.read_table(path, filesystem=fs)
        if pt.num_rows:
            mat = _matrix(pt, "text_features")
            prompts = {c: mat[i] for i, c in enumerate(pt.column("category").to_pylist())}
    return FeatureSet(uri, index.astype(np.int64), image, text, category, prompts, meta)
