"""Evaluation: the one evaluation of a prepared catalogue that both the training loop (periodic
validation R@1, checkpoint ranking, Ray Tune) and `gammaray eval` run: embed the catalogue on every
rank, then the metrics of workers/evaluation/metrics.py (whose docstring states the conventions).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from gammaray.config import apply_overrides
from gammaray.schema import BatchKeys as K, pair_slots
from pipelines import storage
from pipelines.storage import Store
from pipelines.prepare import load_manifest
from pipelines.stream import Segment, StreamSpec, iterate, reshard, units_from_manifest
from pipelines.tokenizer import load as load_tokenizer
from workers.evaluation.eval_report import EvalResult, write_report
from workers.evaluation.export import load_checkpoint_model, open_checkpoint, storage_from_overrides
from workers.evaluation.metrics import (category_prompts, labels_for, modality_gap, recall_at_k, retrieval_ranks,
                                        run_probes, specific_probes, stratified_split, zero_shot_predictions)
from workers.batches import lockstep, placeholder_batch, to_torch
from workers.cluster import ensure_ray
from workers.runtime import sync_buffers, world

# forward outputs that are not per-record embeddings of the evaluated (un-augmented) views
NOT_EMBEDDINGS = ("logit_scale", "logit_bias")


# --------------------------------------------------------------------------------------------
# embedding a prepared catalogue with the model being trained or evaluated


def embedding_outputs(out: dict[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """The per-record embeddings among a model's forward outputs: `image`, `text`, and any extra
    [B, D] output a model adds (e.g. modality-specific features); augmented views are skipped."""
    return {k: v for k, v in out.items()
            if k not in NOT_EMBEDDINGS and not k.endswith("_aug") and torch.is_tensor(v) and v.dim() == 2
            and v.shape[0] == batch_size}


def read_labels(catalogue_uri: str, store: Store) -> dict[int, dict]:
    """sample_index -> {"category": str | None, "attributes": {key: value}} of a prepared catalogue."""
    manifest = load_manifest(catalogue_uri, store)
    out: dict[int, dict] = {}
    for shard in manifest["shards"]:
        fs, path = store.resolve(storage.join(catalogue_uri, shard["path"]))
        t = pq.read_table(path, filesystem=fs, columns=["sample_index", "category", "attributes"])
        for idx, cat, attrs in zip(t.column("sample_index").to_pylist(), t.column("category").to_pylist(),
                                   t.column("attributes").to_pylist()):
            out[idx] = {"category": cat, "attributes": dict(attrs) if attrs else {}}
    return out


def advance_to_prefix(seq, n: int):
    """The first n records of a sequence of segments."""
    out, left = [], n
    for s in seq:
        if left <= 0:
            break
        take = min(left, s.size)
        out.append(Segment(s.unit, s.start, s.start + take))
        left -= take
    return out


@torch.no_grad()
def embed_split(engine, cfg, store: Store, catalogue_uri: str, device: torch.device,
                max_records: int | None = None) -> dict[str, np.ndarray]:
    """Embed a prepared catalogue, each rank its part; every rank gets all rows, sorted by index.

    `engine` is a DeepSpeed engine inside the training loop or a plain model (`gammaray eval`); the
    keys are `sample_index` plus every embedding output of the model (`image`, `text`, extras)."""
    rank, W = world()
    manifest = load_manifest(catalogue_uri, store)
    units = units_from_manifest(manifest)
    seq = [Segment(u, 0, units[u].num_rows) for u in range(len(units))]
    if max_records is not None:
        seq = advance_to_prefix(seq, max_records)
    parts = reshard([seq], W)
    spec = StreamSpec.from_config(cfg, catalogue_uri, units, epoch=0, train=False, with_aug=False,
                                  batch_size=cfg.eval.batch_size)
    sync_buffers(engine)
    was_training = engine.training
    engine.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    idxs = []
    for sb, _, _ in lockstep(iterate(spec, parts[rank]), device):
        if sb is None or sb.size == 0:
            engine(placeholder_batch(cfg, False, device))  # same collectives on every rank
            continue
        out = embedding_outputs(engine(to_torch(sb.arrays, device)), sb.size)
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.float().cpu().numpy())
        idxs.append(sb.arrays[K.SAMPLE_INDEX])
    if was_training:
        engine.train()
    D = cfg.model.embed_dim
    local = {k: np.concatenate(v) for k, v in chunks.items()}
    for k in ("image", "text"):
        local.setdefault(k, np.zeros((0, D), np.float32))
    local["sample_index"] = np.concatenate(idxs) if idxs else np.zeros((0,), np.int64)
    if W > 1:
        gathered: list[Any] = [None] * W
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    keys = sorted(set().union(*[g.keys() for g in gathered]))
    merged = {k: np.concatenate([g[k] for g in gathered if k in g]) for k in keys}
    order = np.argsort(merged["sample_index"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


@torch.no_grad()
def encode_prompts(engine, tokenizer, prompts: list[str], cfg, device: torch.device) -> torch.Tensor:
    enc = tokenizer(prompts, max_length=cfg.data.max_text_tokens, truncation=True, padding="max_length",
                    return_tensors="pt")
    was_training = engine.training
    engine.eval()
    out = engine({K.INPUT_IDS: enc["input_ids"].to(device), K.ATTENTION_MASK: enc["attention_mask"].to(device)})
    if was_training:
        engine.train()
    return out["text"].float().cpu()


# --------------------------------------------------------------------------------------------
# the evaluation


def label_columns(labels_by_index: dict[int, dict], sample_index: np.ndarray) -> dict[str, list[str | None]]:
    """category and attr:<key> columns aligned with sample_index (None where a record lacks one)."""
    rows = [labels_by_index.get(int(i), {"category": None, "attributes": {}}) for i in sample_index]
    cols: dict[str, list[str | None]] = {"category": [r["category"] for r in rows]}
    keys = sorted({k for r in rows for k in r["attributes"]})
    for k in keys:
        cols[f"attr:{k}"] = [r["attributes"].get(k) for r in rows]
    return cols


@torch.no_grad()
def run_evaluation(engine, cfg, store: Store, tokenizer, device: torch.device, data_uri: str | None = None,
                   full: bool = False) -> EvalResult:
    """Evaluate a model on a prepared catalogue (default: data.val) in `store`.

    Always: retrieval R@1/5/10 both ways, zero-shot category accuracy, modality gap. `full` adds
    the linear and k-shot probes (category and every attribute column, on every embedding output)
    and keeps what the PNG report draws."""
    uri = data_uri or cfg.data.val
    if not uri:
        raise ValueError("nothing to evaluate: set data.val (or pass a catalogue URI)")
    emb = embed_split(engine, cfg, store, uri, device, cfg.eval.max_records)
    # retrieval runs between the two sides of the trained pair (data.view_pair): image<->text by default
    side_a, side_b = pair_slots(cfg.data.view_pair)
    image, text = torch.from_numpy(emb[side_a]), torch.from_numpy(emb[side_b])
    ranks_i2t, ranks_t2i = retrieval_ranks(image, text), retrieval_ranks(text, image)
    metrics: dict[str, float] = {}
    for k in (1, 5, 10):
        metrics[f"r_at_{k}_i2t"] = recall_at_k(ranks_i2t, (k,))[k]
        metrics[f"r_at_{k}_t2i"] = recall_at_k(ranks_t2i, (k,))[k]
    metrics["chance_r_at_1"] = 1.0 / max(1, image.shape[0])
    metrics["modality_gap"] = modality_gap(image, text)
    metrics["records"] = int(image.shape[0])
    res = EvalResult(metrics=metrics, ranks_i2t=ranks_i2t, ranks_t2i=ranks_t2i)

    labels_by_index = read_labels(uri, store)
    cols = label_columns(labels_by_index, emb["sample_index"])
    if cfg.eval.specific_attributes and cfg.data.view_pair == "image_text":
        metrics.update(specific_probes(emb, cols, cfg.eval.specific_attributes, cfg.run.seed, cfg.eval.probe_l2))
    classes = sorted({c for c in cols["category"] if c})
    if classes and cfg.data.view_pair == "image_text":  # zero-shot = images against category prompts
        class_text = encode_prompts(engine, tokenizer, category_prompts(classes, cfg.eval.prompt_template), cfg, device)
        labels = labels_for(cols["category"], classes)
        keep = labels >= 0
        pred, hit = zero_shot_predictions(image[keep], class_text, torch.from_numpy(labels[keep]))
        metrics["zero_shot_acc"] = float(hit.float().mean()) if keep.any() else 0.0
        metrics["zero_shot_chance"] = 1.0 / len(classes)
        res.classes, res.category_labels = classes, labels
        res.zero_shot_pred = np.full(labels.shape, -1, dtype=np.int64)
        res.zero_shot_pred[keep] = pred.numpy()
    if not full:
        return res

    res.embeddings = emb
    names = [k for k in emb if k != "sample_index"]
    ev = cfg.eval
    if ev.probe_train:
        tr_emb = embed_split(engine, cfg, store, ev.probe_train, device, ev.probe_max_records)
        tr_cols = label_columns(read_labels(ev.probe_train, store), tr_emb["sample_index"])
        train_emb = {k: tr_emb[k] for k in names if k in tr_emb}
        test_emb = {k: emb[k] for k in names}
        train_cols, test_cols = tr_cols, cols
    else:
        # fit on a stratified part of the evaluated records (by category), test on the rest
        strat = [c if c is not None else "" for c in cols["category"]]
        tr, te = stratified_split(strat, ev.probe_test_fraction, cfg.run.seed)
        train_emb = {k: emb[k][tr] for k in names}
        test_emb = {k: emb[k][te] for k in names}
        train_cols = {c: [v[i] for i in tr] for c, v in cols.items()}
        test_cols = {c: [v[i] for i in te] for c, v in cols.items()}
    res.probes = run_probes(train_emb, train_cols, test_emb, test_cols, ev.k_shots, ev.k_shot_trials,
                            cfg.run.seed, ev.probe_l2)
    for p in res.probes:
        metrics.update(p.flat())
    return res


@torch.no_grad()
def evaluate(engine, cfg, store: Store, tokenizer, device: torch.device) -> dict[str, float]:
    """Validation inside the training loop (every rank calls it; ranks share the embedding work):
    the same code as `gammaray eval`, without the probes."""
    return run_evaluation(engine, cfg, store, tokenizer, device).metrics


# --------------------------------------------------------------------------------------------
# `gammaray eval`: a checkpoint on a catalogue


def evaluate_checkpoint(checkpoint_uri: str, data_uri: str, overrides: list[str] | None = None,
                        device: str | None = None, report_path: str | None = None, storage_cfg=None) -> dict:
    """Load a checkpoint, evaluate it on a prepared catalogue with every metric, write the PNG
    report; returns the JSON summary (metrics, probe table, where things came from)."""
    t0 = time.perf_counter()
    ckpt = open_checkpoint(checkpoint_uri, storage_cfg or storage_from_overrides(overrides))
    cfg = ckpt.cfg
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg = apply_overrides(cfg, {"data.val": data_uri})
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ensure_ray(cfg)
    model = load_checkpoint_model(ckpt, dev)
    ckpt.close()  # the model is in memory: its temporary local copy can go
    tokenizer = load_tokenizer(cfg.data.tokenizer, ckpt.store)
    res = run_evaluation(model, cfg, ckpt.store, tokenizer, dev, data_uri, full=True)
    summary = {"checkpoint": checkpoint_uri, "model": ckpt.model_uri, "data": data_uri, "device": str(dev),
               **res.to_json()}
    if report_path:
        m = res.metrics
        title = (f"{ckpt.model_uri.rstrip('/').rsplit('/', 2)[-2] if '/' in ckpt.model_uri else ckpt.model_uri} on "
                 f"{data_uri.rstrip('/').rsplit('/', 1)[-1]}: R@1 i2t {m['r_at_1_i2t']:.3f}, t2i {m['r_at_1_t2i']:.3f}")
        summary["report"] = write_report(res, report_path, title=title, seed=cfg.run.seed)
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary
