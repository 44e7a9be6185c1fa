"""`gammaray embed`: a whole prepared catalogue through a trained model, as Ray Data batch inference.

    read row groups + decode/tokenize (CPU tasks)  ->  model forward (actor pool, a GPU each when the
    cluster has GPUs)  ->  driver writes one Parquet file per input shard

OUT/embeddings/part-NNNNN.parquet holds, for the good records of input shard NNNNN sorted by
sample_index: product_id, sample_index, image_embedding, text_embedding, and one `<name>_embedding`
column per extra embedding output of the model (e.g. modality-specific features). Records that fail
to decode go to OUT/quarantine/part-NNNNN.parquet with a reason. OUT/_embed.json names the model
and the catalogue; a rerun skips every shard whose output exists (resumable by shard) and refuses an
OUT that belongs to another model or catalogue.

`--features` writes the towers' pooled outputs instead (columns image_features, text_features: what
the heads see), the cache that heads-only training on locked towers reads (`data.features.*`,
workers/training/heads.py). Without a checkpoint the towers come from a config (`model.image/text.pretrained`);
the model they came from is written to OUT/model (+ OUT/config.json), so the store is also a
checkpoint that `gammaray eval/export` can open, and the category prompts of the catalogue, through the
same text tower, go to OUT/prompts.parquet (zero-shot evaluation of the heads).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gammaray.config import GammarayConfig, StorageConfig, apply_overrides
from gammaray.schema import BatchKeys as K, QUARANTINE_SCHEMA, Reason
from pipelines import storage
from pipelines.prepare import load_manifest
from pipelines.preprocess import PreprocessSpec, preprocess_batch
from pipelines.storage import Store, is_storage_fault
from pipelines.stream import Unit, UnitTable, read_segment_rows, units_from_manifest
from pipelines.tokenizer import load as load_tokenizer
from workers.evaluation.evaluate import embedding_outputs
from workers.evaluation.export import open_checkpoint, storage_from_overrides
from workers.evaluation.features import write_prompt_features, write_tower_model
from workers.models.registry import load_model
from workers.cluster import ensure_ray

META = ("shard", "sample_index", "product_id", "reject_reason", "reject_detail", "source", "row")


@dataclass
class EmbedOptions:
    batch_size: int = 64            # records per model forward
    actors: int = 1                 # size of the actor pool
    use_gpu: bool | None = None     # None: one GPU per actor when the Ray cluster has GPUs
    cpus_per_actor: float = 1.0
    progress: bool = True


@dataclass
class EmbedResult:
    out_uri: str
    records_in: int                 # records in the catalogue
    records_written: int            # rows now in OUT/embeddings (all shards)
    records_quarantined: int        # records rejected while embedding (all shards)
    shards_total: int
    shards_embedded: int            # by this run
    shards_skipped: int             # already done by an earlier run
    records_embedded_now: int
    wall_s: float
    records_per_s: float            # while streaming (after Ray and the actors started)
    columns: list[str] = field(default_factory=list)
    device: str = "cpu"

    def summary(self) -> str:
        return "\n".join([
            f"embedded {self.out_uri}",
            f"  records in catalogue  {self.records_in}",
            f"  rows written          {self.records_written}",
            f"  quarantined           {self.records_quarantined}",
            f"  shards                {self.shards_embedded} embedded now, {self.shards_skipped} already done "
            f"(of {self.shards_total})",
            f"  throughput            {self.records_per_s:.1f} records/s while streaming on {self.device} "
            f"({self.records_embedded_now} records, {self.wall_s:.1f} s in all)",
            f"  columns               {', '.join(self.columns)}",
        ])


def shard_name(shard_path: str) -> str:
    return shard_path.rsplit("/", 1)[-1]


def model_fingerprint(model_dir: str) -> str:
    h = hashlib.sha256()
    with open(os.path.join(model_dir, "heads.pt"), "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# the Ray Data stages


EMBED_BLOCKS = 256  # blocks of the work list's Ray Data source, whatever the catalogue's size


def work_list(units: UnitTable, done: set[str]) -> dict[str, np.ndarray]:
    """The row groups of the shards without an output yet, as numpy columns (one entry per row
    group, carrying what its read task needs): linear in the catalogue's row groups."""
    pending_shard = np.fromiter((shard_name(p) not in done for p in units.shards), dtype=bool, count=len(units.shards))
    ids = np.flatnonzero(pending_shard[units.shard_of]) if len(units) else np.zeros(0, np.int64)
    return {"unit": ids, "shard": units.shard_of[ids], "row_group": units.row_group[ids],
            "num_rows": units.num_rows[ids], "first_row": units.first_row[ids]}


def read_and_preprocess(batch: dict[str, np.ndarray], catalogue_uri: str, shard_paths: list[str], spec,
                        store: Store) -> dict[str, np.ndarray]:
    """One row group (batch_size=1) -> model-ready arrays; an unreadable row group becomes rejected
    rows with empty model inputs, so that every block has the same columns."""
    (u,), (shard,) = batch["unit"], batch["shard"]
    unit = Unit(shard_paths[int(shard)], int(batch["row_group"][0]), int(batch["num_rows"][0]), int(batch["first_row"][0]))
    try:
        table = read_segment_rows(catalogue_uri, unit, int(u), 0, unit.num_rows, 0, 0, False, store)
    except Exception as err:  # noqa: BLE001 - a damaged row group must not sink the job
        if is_storage_fault(err):
            raise  # an outage is not the records' fault: no quarantine (reads retried for storage.retry_time_s)
        n, H, L = unit.num_rows, spec.image_size, spec.max_text_tokens
        return {K.SAMPLE_INDEX: np.full(n, -1, np.int64), K.PIXELS: np.zeros((n, 3, H, H), np.float32),
                K.INPUT_IDS: np.zeros((n, L), np.int64), K.ATTENTION_MASK: np.zeros((n, L), np.int64),
                K.REJECT: np.asarray([Reason.UNREADABLE_SHARD] * n, dtype=object),
                K.DETAIL: np.asarray([f"{type(err).__name__}: {err}"[:300]] * n, dtype=object),
                K.PRODUCT_ID: np.asarray([None] * n, dtype=object),
                K.SOURCE: np.asarray([unit.shard] * n, dtype=object), K.ROW: np.arange(n, dtype=np.int64),
                "shard": np.full(n, int(shard))}
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    out = preprocess_batch(cols, spec, load_tokenizer(spec.tokenizer_uri, store))
    out["shard"] = np.full(len(out[K.SAMPLE_INDEX]), int(shard))
    return out


class Embedder:
    """A Ray Data actor: loads the model once, embeds the good rows of each batch."""

    def __init__(self, model_uri: str, store: Store, use_gpu: bool, features: bool = False):
        ckpt = open_checkpoint(model_uri, store)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            # full fp32 (no TF32 convolutions/matmuls): the same embeddings as on CPU, to ~1e-6
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = load_model(ckpt.model_dir).to(self.device).eval()
        self.features = features
        self.names, self.dims = probe_outputs(self.model, ckpt.cfg, self.device, features)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.asarray(batch["reject_reason"] == "", dtype=bool)
        n = len(good)
        out = {k: batch[k] for k in META if k in batch}
        embs = {name: np.zeros((n, self.dims[name]), np.float32) for name in self.names}
        if good.any() and K.PIXELS in batch:
            sel = np.flatnonzero(good)
            inputs = {K.PIXELS: torch.from_numpy(np.ascontiguousarray(batch[K.PIXELS][sel])).to(self.device),
                      K.INPUT_IDS: torch.from_numpy(np.ascontiguousarray(batch[K.INPUT_IDS][sel])).to(self.device),
                      K.ATTENTION_MASK: torch.from_numpy(np.ascontiguousarray(batch[K.ATTENTION_MASK][sel])).to(self.device)}
            if self.features:
                res = {"image": self.model.image_features(inputs[K.PIXELS])[0],
                       "text": self.model.text_features(inputs[K.INPUT_IDS], inputs[K.ATTENTION_MASK])[0]}
            else:
                res = embedding_outputs(self.model(inputs), sel.size)
            for name in self.names:
                embs[name][sel] = res[name].float().cpu().numpy()
        else:
            good[:] = False
        for name in self.names:
            out[f"emb__{name}"] = embs[name]
        return out


@torch.no_grad()
def probe_outputs(model, cfg: GammarayConfig, device: torch.device,
                  features: bool = False) -> tuple[list[str], dict[str, int]]:
    """Names and widths of the model's embedding outputs (one dummy record through it); with
    `features`, of its towers' pooled outputs ("image", "text")."""
    H, L = cfg.data.image_size, cfg.data.max_text_tokens
    mask = torch.zeros(1, L, dtype=torch.long)
    mask[0, 0] = 1
    pixels = torch.zeros(1, 3, H, H, device=device)
    ids, mask = torch.zeros(1, L, dtype=torch.long, device=device), mask.to(device)
    if features:
        out = {"image": model.image_features(pixels)[0], "text": model.text_features(ids, mask)[0]}
    else:
        out = embedding_outputs(model({K.PIXELS: pixels, K.INPUT_IDS: ids, K.ATTENTION_MASK: mask}), 1)
    names = sorted(out, key=lambda k: (k not in ("image", "text"), k))
    return names, {k: int(out[k].shape[1]) for k in names}


# --------------------------------------------------------------------------------------------
# writing


def output_schema(names: list[str], dims: dict[str, int], meta: dict, suffix: str = "_embedding") -> pa.Schema:
    fields = [pa.field("product_id", pa.string(), nullable=False), pa.field("sample_index", pa.int64(), nullable=False)]
    fields += [pa.field(f"{n}{suffix}", pa.list_(pa.float32(), dims[n])) for n in names]
    return pa.schema(fields, metadata={b"gammaray.embed": _json(meta).encode()})


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def write_shard(rows: list[dict[str, np.ndarray]], names: list[str], schema: pa.Schema, out_uri: str, name: str,
                store: Store, suffix: str = "_embedding") -> tuple[int, int]:
    """Write one input shard's embeddings (and its quarantine first, so the embeddings file marks
    the shard done). Returns (rows written, rows quarantined)."""
    merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    good = merged["reject_reason"] == ""
    bad = np.flatnonzero(~good)
    if bad.size:
        q = [{"product_id": merged["product_id"][i], "source": merged["source"][i], "row": int(merged["row"][i]),
              "reason": merged["reject_reason"][i], "detail": merged["reject_detail"][i], "stage": "embed",
              "epoch": None} for i in bad]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(q, schema=QUARANTINE_SCHEMA), buf)
        store.write_bytes(storage.join(out_uri, "quarantine", name), buf.getvalue())
    sel = np.flatnonzero(good)
    sel = sel[np.argsort(merged["sample_index"][sel], kind="stable")]
    cols: dict[str, pa.Array] = {
        "product_id": pa.array(merged["product_id"][sel].tolist(), pa.string()),
        "sample_index": pa.array(merged["sample_index"][sel].astype(np.int64)),
    }
    for n in names:
        flat = np.ascontiguousarray(merged[f"emb__{n}"][sel], dtype=np.float32)
        cols[f"{n}{suffix}"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    table = pa.Table.from_pydict(cols, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.write_bytes(storage.join(out_uri, "embeddings", name), buf.getvalue())
    return int(sel.size), int(bad.size)


def count_rows(uri: str, store: Store) -> int:
    fs, path = store.resolve(uri)
    return pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows


# --------------------------------------------------------------------------------------------
# the job


def embed_catalogue(checkpoint_uri: str | None, data_uri: str, out_uri: str, opts: EmbedOptions | None = None,
                    cfg_overrides: list[str] | None = None, storage_cfg: StorageConfig | None = None,
                    features: bool = False, config: GammarayConfig | None = None) -> EmbedResult:
    """Embed `data_uri` into `out_uri`. `features`: the towers' pooled outputs instead of the heads'
    embeddings; the towers come from `checkpoint_uri` or, without one, from `config`."""
    import ray
    from tqdm.auto import tqdm

    opts = opts or EmbedOptions()
    t0 = time.perf_counter()
    if checkpoint_uri is None:
        if not (features and config is not None):
            raise ValueError("embed needs --checkpoint (or --features with a --config that names the towers)")

        storage_cfg = storage_cfg or config.storage
        checkpoint_uri = write_tower_model(config, Store.of(config.storage), out_uri)
    ckpt = open_checkpoint(checkpoint_uri, storage_cfg or storage_from_overrides(cfg_overrides))
    cfg = ckpt.cfg
    if cfg_overrides:
        cfg = apply_overrides(cfg, cfg_overrides)
    store = ckpt.store  # the storage given, else the checkpoint's: the Ray Data stages and the actors get it too
    manifest = load_manifest(data_uri, store)
    units = units_from_manifest(manifest)
    shards = units.shards

    suffix = "_features" if features else "_embedding"
    model = load_model(ckpt.model_dir).eval()
    names, dims = probe_outputs(model, cfg, torch.device("cpu"), features)
    meta = {"format": 1, "kind": "features" if features else "embeddings", "checkpoint": ckpt.model_uri,
            "model_fingerprint": model_fingerprint(ckpt.model_dir),
            "data": data_uri.rstrip("/"), "columns": [f"{n}{suffix}" for n in names], "dims": dims,
            "image_size": cfg.data.image_size, "max_text_tokens": cfg.data.max_text_tokens}
    meta_uri = storage.join(out_uri, "_embed.json")
    if store.exists(meta_uri):
        old = store.read_json(meta_uri)
        old.setdefault("kind", "embeddings")
        for key in ("kind", "model_fingerprint", "data", "columns", "image_size", "max_text_tokens"):
            if old.get(key) != meta[key]:
                raise ValueError(f"{out_uri} holds embeddings made with another {key} ({old.get(key)!r}, now "
                                 f"{meta[key]!r}): choose a new --out or delete it")
    else:
        store.write_json(meta_uri, meta)
    schema = output_schema(names, dims, meta, suffix)

    done = {shard_name(f) for f in store.list_files(storage.join(out_uri, "embeddings"), ".parquet")}
    todo_list = work_list(units, done)
    rows_of_shard = np.bincount(units.shard_of, weights=units.num_rows, minlength=len(shards)).astype(np.int64)
    pending = np.unique(todo_list["shard"]).tolist()
    todo = int(todo_list["num_rows"].sum())
    items = [dict(zip(todo_list, vals)) for vals in zip(*(v.tolist() for v in todo_list.values()))]

    written_now = quarantined_now = 0
    device, stream_s = "cpu", 0.0
    if items:
        ensure_ray(cfg)
        use_gpu = opts.use_gpu if opts.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
        device = "cuda" if use_gpu else "cpu"
        spec = PreprocessSpec.from_config(cfg, epoch=0, train=False, with_aug=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # a bounded number of blocks (several row groups per read task); the items carry their unit,
        # so only the shard paths travel with the job, once
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), EMBED_BLOCKS))
        ds = ds.map_batches(read_and_preprocess, batch_size=1, batch_format="numpy",
                            fn_kwargs={"catalogue_uri": data_uri, "shard_paths": shards, "spec": spec,
                                       "store": store},
                            num_cpus=cfg.data.preprocess_num_cpus)
        ds = ds.map_batches(Embedder, batch_size=opts.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"model_uri": ckpt.model_uri, "features": features,
                                                   "store": store, "use_gpu": use_gpu},
                            compute=ray.data.ActorPoolStrategy(size=opts.actors), num_cpus=opts.cpus_per_actor,
                            num_gpus=1 if use_gpu else 0)
        open_rows: dict[int, list[dict]] = {}
        seen: dict[int, int] = {}
        bar = tqdm(total=todo, desc="embed", unit="rec", disable=not opts.progress)
        t_start = time.perf_counter()
        for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for s_idx in np.unique(block["shard"]):
                m = block["shard"] == s_idx
                s_idx = int(s_idx)
                open_rows.setdefault(s_idx, []).append({k: v[m] for k, v in block.items()})
                seen[s_idx] = seen.get(s_idx, 0) + int(m.sum())
                if seen[s_idx] == rows_of_shard[s_idx]:
                    w, q = write_shard(open_rows.pop(s_idx), names, schema, out_uri,
                                       shard_name(shards[s_idx]), store, suffix)
                    written_now += w
                    quarantined_now += q
            n = len(block["shard"])
            bar.update(n)
            bar.set_postfix_str(f"{bar.n / max(1e-9, time.perf_counter() - t_start):.0f} rec/s")
        bar.close()
        stream_s = time.perf_counter() - t_start
        if open_rows:
            raise RuntimeError(f"embed: shards {sorted(open_rows)} did not receive all their rows "
                               f"({ {k: seen[k] for k in open_rows} } of { {k: rows_of_shard[k] for k in open_rows} })")

    if features and not store.exists(storage.join(out_uri, "prompts.parquet")):
        tok = load_tokenizer(cfg.data.tokenizer, store)
        write_prompt_features(model, cfg, store, tok, list(manifest.get("categories", [])), out_uri)
    written = sum(count_rows(f, store) for f in store.list_files(storage.join(out_uri, "embeddings"), ".parquet"))
    quarantined = sum(count_rows(f, store) for f in store.list_files(storage.join(out_uri, "quarantine"), ".parquet"))
    wall = time.perf_counter() - t0
    return EmbedResult(out_uri=out_uri, records_in=int(manifest["num_records"]), records_written=written,
                       records_quarantined=quarantined, shards_total=len(shards), shards_embedded=len(pending),
                       shards_skipped=len(shards) - len(pending), records_embedded_now=todo, wall_s=wall,
                       records_per_s=todo / stream_s if todo and stream_s > 0 else 0.0, columns=list(schema.names), device=device)
