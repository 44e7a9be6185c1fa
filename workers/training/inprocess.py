"""Training in one process, without Ray Train, Ray Data or DeepSpeed: the same model, objective, AdamW
parameter groups, warm-up + cosine schedule and gradient clipping as the engine (workers/training/engine.py), on
a prepared catalogue held in memory and preprocessed by pipelines/preprocess.py (the code the Ray Data
tasks run, augmentations keyed by seed, epoch and sample_index).

For runs of a small model where a TorchTrainer's start-up and the data pipeline's processes would cost
more than the training itself: Ray Tune trials with `tune.trial_kind: in_process` (tuning/inprocess.py)
and the structure benchmarks. The data order is a seeded permutation per epoch, whole batches of
`data.batch_size`; there are no checkpoints (a stopped run starts again).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from gammaray.schema import BatchKeys as K
from pipelines import storage
from pipelines.storage import Store
from pipelines.prepare import load_manifest
from pipelines.preprocess import PreprocessSpec, preprocess_batch
from workers.batches import distinct_indices
from workers.evaluation.evaluate import label_columns
from workers.models.registry import build_model
from workers.training.engine import DDPEngine, setting_on, fast_step_setup, optimizer_and_schedule, use_bf16
from workers.training.objective import Objective
from workers.training.step import prepare_batch, train_step

COLUMNS = ("product_id", "sample_index", "title", "description", "category", "image", "attributes")
EMBEDDINGS = ("image", "text", "image_specific", "text_specific")


@dataclass
class Split:
    """A prepared catalogue in memory: raw columns in sample_index order, and its label columns
    (`category`, `attr:<key>`; None where a record lacks one) as workers/evaluation/evaluate.py reads them."""

    columns: dict[str, list]
    labels: dict[str, list[str | None]]

    @property
    def size(self) -> int:
        return len(self.columns["sample_index"])


def load_split(uri: str, store: Store | None = None) -> Split:
    """Read every shard of a prepared catalogue (local path or s3://; None: the environment's storage) into memory."""
    import pyarrow.parquet as pq

    store = Store.of(store)
    manifest = load_manifest(uri, store)
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for shard in manifest["shards"]:
        fs, path = store.resolve(storage.join(uri, shard["path"]))
        t = pq.read_table(path, filesystem=fs, columns=list(COLUMNS))
        for c in COLUMNS:
            cols[c].extend(t.column(c).to_pylist())
    order = np.argsort(np.asarray(cols["sample_index"]), kind="stable")
    cols = {k: [v[i] for i in order] for k, v in cols.items()}
    by_index = {idx: {"category": cat, "attributes": dict(a) if a else {}}
                for idx, cat, a in zip(cols["sample_index"], cols["category"], cols.pop("attributes"))}
    return Split(columns=cols, labels=label_columns(by_index, np.asarray(cols["sample_index"])))


def preprocess(split: Split, tokenizer, tokenizer_uri: str, cfg, seed: int, epoch: int, train: bool,
               with_aug: bool, order=None) -> dict[str, np.ndarray]:
    """All rows of a split (in `order`), model-ready, through pipelines/preprocess.py in chunks of 256.
    A record the preprocessing rejects is an error naming it (a prepared catalogue should have none)."""
    d = cfg.data
    spec = PreprocessSpec(image_size=d.image_size, max_image_pixels=d.max_image_pixels,
                          max_text_tokens=d.max_text_tokens, max_text_chars=d.max_text_chars, augment=d.augment,
                          tokenizer_uri=tokenizer_uri, seed=seed, epoch=epoch, with_aug_views=with_aug, train=train)
    idx = np.arange(split.size) if order is None else np.asarray(order)
    parts = []
    for start in range(0, len(idx), 256):
        rows = idx[start:start + 256]
        batch = {k: [split.columns[k][i] for i in rows] for k in split.columns}
        out = preprocess_batch(batch, spec, tokenizer)
        bad = [(split.columns["product_id"][i], r) for i, r in zip(rows, out[K.REJECT]) if r]
        if bad:
            raise ValueError(f"records rejected by preprocessing (product_id, reason): {bad[:3]}")
        parts.append({k: v for k, v in out.items() if isinstance(v, np.ndarray) and v.dtype != object})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class LocalRun:
    """One model with its objective, optimizer and schedule, trained step by step in this process."""

    def __init__(self, cfg, seed: int, vocab_size: int, pad_id: int, num_samples: int, total_steps: int, device):
        self.cfg = cfg
        torch.manual_seed(seed)  # the same initial weights for every config of a seed
        self.model = build_model(cfg.model, vocab_size=vocab_size, pad_token_id=pad_id).to(device)
        self.objective = Objective(cfg.loss, num_samples=num_samples, seed=seed, device=device, distributed=False,
                                   batch_size=cfg.data.batch_size)
        on_gpu = torch.device(device).type == "cuda"
        fast_step_setup(self.model, cfg, on_gpu)
        self.opt, self.sched = optimizer_and_schedule(self.model, cfg, total_steps, on_gpu)
        self.engine = DDPEngine.local(self.model, self.opt, self.sched, cfg, device, bf16=use_bf16(cfg, on_gpu))
        self.channels_last = setting_on(cfg.train.channels_last, on_gpu)
        self.device = device
        self.total_steps = total_steps
        self.step = 0
        self.last: dict = {}
        self.train_s = 0.0

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        self.model.train()
        terms = train_step(self.engine, self.objective, prepare_batch(batch, channels_last=self.channels_last),
                           self.step / max(1, self.total_steps))
        self.step += 1
        if self.step % 50 == 0 or self.step == self.total_steps:
            self.last = terms.scalars()
        self.train_s += time.perf_counter() - t0

    @torch.no_grad()
    def embed(self, arrays: dict[str, np.ndarray], batch_size: int = 256) -> dict[str, np.ndarray]:
        """image, text (and the specific features when the model has them) of every row, float32."""
        self.model.eval()
        keys = (K.PIXELS, K.INPUT_IDS, K.ATTENTION_MASK)
        got: dict[str, list] = {}
        for s in range(0, len(arrays[K.PIXELS]), batch_size):
            b = {k: torch.from_numpy(arrays[k][s:s + batch_size]).to(self.device) for k in keys}
            out = self.model(b)
            for k in EMBEDDINGS:
                if k in out:
                    got.setdefault(k, []).append(out[k].float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in got.items()}


def steps_per_epoch(cfg, num_records: int) -> int:
    return math.ceil(num_records / cfg.data.batch_size)


def planned_steps(cfg, num_records: int) -> int:
    """train.epochs over the split, or train.max_steps when that is fewer."""
    total = cfg.train.epochs * steps_per_epoch(cfg, num_records)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def train(cfg, run: LocalRun, split: Split, tokenizer, tokenizer_uri: str, seed: int,
          on_step: Callable[[int], None] | None = None) -> None:
    """Train `run` for its total_steps over `split`: epoch e visits the records in the seeded order
    permutation([seed, e, 7]), batches of data.batch_size (the last one of an epoch may be smaller).
    `on_step(step)` runs after every optimizer step (validation, reports)."""
    B = cfg.data.batch_size
    needs_aug = run.objective.needs_augmented_views
    epoch = 0
    while run.step < run.total_steps:
        order = np.random.default_rng([seed, epoch, 7]).permutation(split.size)
        data = preprocess(split, tokenizer, tokenizer_uri, cfg, seed, epoch, train=True, with_aug=needs_aug, order=order)
        tensors = {k: torch.from_numpy(v) for k, v in data.items() if needs_aug or not k.endswith("_aug")}
        distinct = distinct_indices(data[K.SAMPLE_INDEX])  # so is every slice of it (host array)
        for s in range(0, split.size, B):
            batch = {k: v[s:s + B].to(run.device, non_blocking=True) for k, v in tensors.items()}
            run.train_step({**batch, K.SAMPLE_INDEX_DISTINCT: distinct})
            if on_step is not None:
                on_step(run.step)
            if run.step >= run.total_steps:
                return
        epoch += 1
