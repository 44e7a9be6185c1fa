"""Helpers of the `eval` tests: checkpoints built directly (no training), and the reference
embeddings computed record by record through the same preprocessing, without Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from gammaray.config import GammarayConfig, apply_overrides
from tests.conftest import tiny_overrides


def make_checkpoint(root: str, catalogue: dict, seed: int = 0, overrides: dict | None = None,
                    name: str = "ckpt") -> tuple[str, GammarayConfig]:
    """A checkpoint folder as the training loop writes it (model/ from save_model + config.json)."""
    from pipelines import storage
    from pipelines.tokenizer import load as load_tokenizer
    from workers.models.registry import build_model, save_model

    cfg = apply_overrides(GammarayConfig(), tiny_overrides(catalogue, os.path.join(root, "runs"), "eval"))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    tok = load_tokenizer(cfg.data.tokenizer, storage.S3Settings.from_config(cfg.storage))
    torch.manual_seed(seed)
    model = build_model(cfg.model, vocab_size=len(tok), pad_token_id=tok.pad_token_id).eval()
    path = os.path.join(root, name)
    save_model(model, os.path.join(path, "model"), cfg.model, tok)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.model_dump(mode="json"), f)
    return path, cfg


def read_catalogue(uri: str) -> dict[str, list]:
    """All rows of a prepared catalogue (columns as lists), in sample_index order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage
    from pipelines.prepare import load_manifest

    tables = []
    for shard in load_manifest(uri)["shards"]:
        fs, path = storage.resolve(storage.join(uri, shard["path"]))
        tables.append(pq.read_table(path, filesystem=fs))
    t = pa.concat_tables(tables).sort_by("sample_index")
    return {c: t.column(c).to_pylist() for c in t.column_names}


@torch.no_grad()
def direct_embeddings(model, cfg: GammarayConfig, rows: dict[str, list], batch: int = 64) -> dict[str, np.ndarray]:
    """Embeddings of catalogue rows through preprocess_batch + the model, in one process; rejected
    rows are dropped. Keys: sample_index, product_id, image, text."""
    from gammaray.schema import BatchKeys as K
    from pipelines import storage
    from pipelines.preprocess import preprocess_batch
    from pipelines.tokenizer import load as load_tokenizer
    from pipelines.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_config(cfg, epoch=0, train=False, with_aug=False)
    tok = load_tokenizer(spec.tokenizer_uri, storage.S3Settings.from_config(cfg.storage))
    out: dict[str, list] = {"sample_index": [], "product_id": [], "image": [], "text": []}
    n = len(rows["sample_index"])
    for s in range(0, n, batch):
        cols = {k: np.asarray(v[s:s + batch], dtype=object) for k, v in rows.items()}
        cols["sample_index"] = np.asarray(rows["sample_index"][s:s + batch], dtype=np.int64)
        arr = preprocess_batch(cols, spec, tok)
        good = arr[K.REJECT] == ""
        res = model({K.PIXELS: torch.from_numpy(arr[K.PIXELS][good]),
                     K.INPUT_IDS: torch.from_numpy(arr[K.INPUT_IDS][good]),
                     K.ATTENTION_MASK: torch.from_numpy(arr[K.ATTENTION_MASK][good])})
        out["sample_index"].append(arr[K.SAMPLE_INDEX][good])
        out["product_id"].append(arr[K.PRODUCT_ID][good])
        out["image"].append(res["image"].numpy())
        out["text"].append(res["text"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
