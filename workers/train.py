"""Training: the per-worker loop (DeepSpeed engine + objective + resumable data stream) and the
`pretrain` entry point that runs it on Ray Train.

The loop reads like the single-process one; the distributed parts are marked:
  [ray]  ray.train.get_context / get_checkpoint / report
  [ds]   engine forward / backward / step / save_checkpoint / load_checkpoint
  [dist] one small all_reduce per step so every rank takes the same number of steps
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from gammaray.config import GammarayConfig, from_dict
from gammaray.schema import ALL_REASONS, BatchKeys as K, pair_slots
from pipelines import storage
from pipelines.prepare import load_manifest
from pipelines.preprocess import PreprocessSpec
from pipelines.stream import (Segment, StreamBatch, StreamSpec, advance, close_prefetched, epoch_plan, iterate,
                              part_from_json, part_to_json, prefetch, reshard, units_from_manifest)
from pipelines.tokenizer import load as load_tokenizer

from .engine import build_engine, init_single_process_group, use_bf16
from .evaluate import category_prompts, labels_for, modality_gap, retrieval_metrics, zero_shot_accuracy
from .models import build_model, save_model
from .objective import Objective


class DataQualityError(ValueError):
    """Too many bad records: the run stops instead of training on a broken catalogue."""


def tokenizer_uri(cfg: GammarayConfig) -> str:
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    assert cfg.data.train
    return storage.join(cfg.data.train.rstrip("/").rsplit("/", 1)[0], "tokenizer")


def run_dir(cfg: GammarayConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


# --------------------------------------------------------------------------------------------
# per-rank training state


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    part: list[Segment] | None = None     # this rank's records of the epoch not yet consumed at (re)start
    consumed: int = 0                     # records of `part` consumed since then
    epoch_consumed_before: int = 0        # records of the epoch consumed before `part` began
    records_trained: int = 0              # good records stepped on, all epochs
    quarantine: list[dict] = field(default_factory=list)
    best_val_r_at_1: float = -1.0
    last_val: dict = field(default_factory=dict)

    def position_json(self, rank: int, world_size: int) -> dict:
        remaining = advance(self.part or [], self.consumed)
        return {"rank": rank, "world_size": world_size, "epoch": self.epoch, "step": self.step,
                "remaining": part_to_json(remaining),
                "epoch_consumed": self.epoch_consumed_before + self.consumed,
                "records_trained": self.records_trained, "best_val_r_at_1": self.best_val_r_at_1,
                "last_val": self.last_val}


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


# --------------------------------------------------------------------------------------------
# batches


def to_torch(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def placeholder_batch(cfg: GammarayConfig, with_aug: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """A one-row stand-in for a rank whose part ran out first: it takes the step with weight 0 so
    that every rank runs the same collectives (DeepSpeed gradient reduction, the loss-state exchange)."""
    H, L = cfg.data.image_size, cfg.data.max_text_tokens
    ids = torch.zeros(1, L, dtype=torch.long)
    mask = torch.zeros(1, L, dtype=torch.long)
    mask[0, 0] = 1
    b = {K.SAMPLE_INDEX: torch.zeros(1, dtype=torch.long), K.PIXELS: torch.zeros(1, 3, H, H),
         K.INPUT_IDS: ids, K.ATTENTION_MASK: mask}
    pair = cfg.data.view_pair
    if pair == "text_text":
        del b[K.PIXELS]
        b.update({K.INPUT_IDS_PAIR: ids.clone(), K.ATTENTION_MASK_PAIR: mask.clone()})
    elif pair == "image_image":
        del b[K.INPUT_IDS], b[K.ATTENTION_MASK]
        b[K.PIXELS_PAIR] = torch.zeros(1, 3, H, H)
    if with_aug:
        b.update({K.PIXELS_AUG: torch.zeros(1, 3, H, H), K.INPUT_IDS_AUG: ids.clone(), K.ATTENTION_MASK_AUG: mask.clone()})
    return {k: v.to(device) for k, v in b.items()}


def lockstep(batches: Iterator[StreamBatch], device: torch.device) -> Iterator[tuple[StreamBatch | None, int]]:
    """[dist] Yield (this rank's batch or None, global number of good rows) until every rank is done."""
    it = iter(batches)
    while True:
        sb = next(it, None)
        flag = torch.tensor([0 if sb is None else 1, 0 if sb is None else sb.size], dtype=torch.long, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag)
        if int(flag[0]) == 0:
            return
        yield sb, int(flag[1])


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------------------------
# evaluation inside the loop (same code as `gammaray eval`)


def read_val_labels(val_uri: str, cfg: GammarayConfig) -> dict[int, dict]:
    import pyarrow.parquet as pq

    manifest = load_manifest(val_uri, cfg.storage)
    out: dict[int, dict] = {}
    for shard in manifest["shards"]:
        fs, path = storage.resolve(storage.join(val_uri, shard["path"]), cfg.storage)
        t = pq.read_table(path, filesystem=fs, columns=["sample_index", "category", "attributes"])
        for idx, cat, attrs in zip(t.column("sample_index").to_pylist(), t.column("category").to_pylist(),
                                   t.column("attributes").to_pylist()):
            out[idx] = {"category": cat, "attributes": dict(attrs) if attrs else {}}
    return out


@torch.no_grad()
def embed_split(engine, cfg: GammarayConfig, catalogue_uri: str, device: torch.device,
                max_records: int | None = None) -> dict[str, np.ndarray]:
    """Embed a prepared catalogue, each rank its part; every rank gets all rows, sorted by index."""
    rank, W = _world()
    manifest = load_manifest(catalogue_uri, cfg.storage)
    units = units_from_manifest(manifest)
    seq = [Segment(u, 0, units[u].num_rows) for u in range(len(units))]
    if max_records is not None:
        seq = advance_to_prefix(seq, max_records)
    parts = reshard([seq], W)
    spec = stream_spec(cfg, catalogue_uri, units, epoch=0, train=False, with_aug=False,
                       batch_size=cfg.eval.batch_size)
    was_training = engine.training
    engine.eval()
    imgs, txts, idxs = [], [], []
    side_a, side_b = pair_slots(cfg.data.view_pair)  # "image"/"text" below are the pair's two sides
    for sb, _ in lockstep(iterate(spec, parts[rank]), device):
        if sb is None or sb.size == 0:
            batch = placeholder_batch(cfg, False, device)
            engine(batch)
            continue
        out = engine(to_torch(sb.arrays, device))
        imgs.append(out[side_a].float().cpu().numpy())
        txts.append(out[side_b].float().cpu().numpy())
        idxs.append(sb.arrays[K.SAMPLE_INDEX])
    if was_training:
        engine.train()
    local = {
        "image": np.concatenate(imgs) if imgs else np.zeros((0, cfg.model.embed_dim), np.float32),
        "text": np.concatenate(txts) if txts else np.zeros((0, cfg.model.embed_dim), np.float32),
        "sample_index": np.concatenate(idxs) if idxs else np.zeros((0,), np.int64),
    }
    if W > 1:
        gathered: list[Any] = [None] * W
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    merged = {k: np.concatenate([g[k] for g in gathered]) for k in local}
    order = np.argsort(merged["sample_index"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def advance_to_prefix(seq: list[Segment], n: int) -> list[Segment]:
    out, left = [], n
    for s in seq:
        if left <= 0:
            break
        take = min(left, s.size)
        out.append(Segment(s.unit, s.start, s.start + take))
        left -= take
    return out


@torch.no_grad()
def evaluate(engine, cfg: GammarayConfig, tokenizer, device: torch.device) -> dict[str, float]:
    assert cfg.data.val
    emb = embed_split(engine, cfg, cfg.data.val, device, cfg.eval.max_records)
    image, text = torch.from_numpy(emb["image"]), torch.from_numpy(emb["text"])
    metrics = retrieval_metrics(image, text)
    metrics["modality_gap"] = modality_gap(image, text)
    metrics["val_records"] = int(image.shape[0])
    labels_by_index = read_val_labels(cfg.data.val, cfg)
    classes = sorted({v["category"] for v in labels_by_index.values() if v["category"]})
    if classes and cfg.data.view_pair == "image_text":
        prompts = category_prompts(classes, cfg.eval.prompt_template)
        enc = tokenizer(prompts, max_length=cfg.data.max_text_tokens, truncation=True, padding="max_length",
                        return_tensors="pt")
        engine.eval()
        out = engine({K.INPUT_IDS: enc["input_ids"].to(device), K.ATTENTION_MASK: enc["attention_mask"].to(device)})
        engine.train()
        labels = labels_for([labels_by_index[int(i)]["category"] for i in emb["sample_index"]], classes)
        keep = labels >= 0
        metrics["zero_shot_acc"] = zero_shot_accuracy(image[keep], out["text"].float().cpu(),
                                                      torch.from_numpy(labels[keep]))
        metrics["zero_shot_chance"] = 1.0 / len(classes)
    return metrics


# --------------------------------------------------------------------------------------------
# the loop


def stream_spec(cfg: GammarayConfig, catalogue_uri: str, units, epoch: int, train: bool, with_aug: bool,
                batch_size: int) -> StreamSpec:
    d = cfg.data
    pp = PreprocessSpec(image_size=d.image_size, max_image_pixels=d.max_image_pixels,
                        max_text_tokens=d.max_text_tokens, max_text_chars=d.max_text_chars, augment=d.augment,
                        tokenizer_uri=tokenizer_uri(cfg), seed=cfg.run.seed, epoch=epoch,
                        with_aug_views=with_aug, train=train, view_pair=d.view_pair, pair_locale=d.pair_locale,
                        jpeg_draft=d.jpeg_draft)
    return StreamSpec(catalogue_uri=catalogue_uri, units=tuple(units), preprocess=pp,
                      settings=storage.S3Settings.from_config(cfg.storage), shuffle=d.shuffle and train,
                      batch_size=batch_size, preprocess_num_cpus=d.preprocess_num_cpus,
                      prefetch_batches=d.prefetch_batches, concurrency=d.preprocess_concurrency,
                      segments_per_task=d.preprocess_segments_per_task)


def estimate_total_steps(cfg: GammarayConfig, num_records: int, world_size: int) -> int:
    per_epoch = math.ceil(num_records / max(1, world_size) / cfg.data.batch_size)
    per_epoch = math.ceil(per_epoch / cfg.train.deepspeed.gradient_accumulation_steps)
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    cfg = from_dict(loop_config["config"])
    in_ray = loop_config.get("in_ray", True)
    quiet_libraries()
    if not in_ray:
        init_single_process_group()
    rank, W = _world()
    on_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    random.seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)

    manifest = load_manifest(cfg.data.train, cfg.storage)
    units = units_from_manifest(manifest)
    tokenizer = load_tokenizer(tokenizer_uri(cfg), storage.S3Settings.from_config(cfg.storage))
    model = build_model(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    objective = Objective(cfg.loss, num_samples=int(manifest["next_sample_index"]), seed=cfg.run.seed,
                          device=device, distributed=W > 1, view_pair=cfg.data.view_pair)
    with_aug = objective.needs_augmented_views
    ckpt = ray.train.get_checkpoint() if in_ray else None  # [ray]
    if ckpt is None and cfg.data.prefetch_next_epoch:
        # [data] a fresh run: start epoch 0's pipeline now, so that its worker processes start while
        # the engine is built (a resumed run starts from its checkpointed position instead)
        prefetch(stream_spec(cfg, cfg.data.train, units, 0, train=True, with_aug=with_aug,
                             batch_size=cfg.data.batch_size), epoch_plan(units, 0, cfg.run.seed, W, cfg.data.shuffle)[rank])
    total_steps = estimate_total_steps(cfg, int(manifest["num_records"]), W)
    engine, _, scheduler = build_engine(model, cfg, total_steps, on_gpu)  # [ds]
    bf16 = use_bf16(cfg, on_gpu)

    state = TrainState()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = restore(d, engine, objective, rank, W)

    report_every, ckpt_every = cfg.train.log_every, cfg.train.checkpoint_every
    window = {"t0": time.perf_counter(), "records": 0, "wait": 0.0, "steps": 0}
    last: dict[str, float] = {}
    done = False
    for epoch in range(state.epoch, cfg.train.epochs):
        if state.part is None or state.epoch != epoch:
            state.epoch, state.part, state.consumed, state.epoch_consumed_before = epoch, epoch_plan(
                units, epoch, cfg.run.seed, W, cfg.data.shuffle)[rank], 0, 0
        spec = stream_spec(cfg, cfg.data.train, units, epoch, train=True, with_aug=with_aug,
                           batch_size=cfg.data.batch_size)
        then = None
        if cfg.data.prefetch_next_epoch and epoch + 1 < cfg.train.epochs:
            # [data] the next epoch's pipeline starts once this one has produced its last block
            then = (stream_spec(cfg, cfg.data.train, units, epoch + 1, train=True, with_aug=with_aug,
                                batch_size=cfg.data.batch_size), epoch_plan(units, epoch + 1, cfg.run.seed, W,
                                                                            cfg.data.shuffle)[rank])
        stream = iterate(spec, state.part, then=then)
        t_wait = time.perf_counter()
        for sb, n_global in lockstep(stream, device):
            window["wait"] += time.perf_counter() - t_wait
            active = sb is not None and sb.size > 0
            batch = to_torch(sb.arrays, device) if active else placeholder_batch(cfg, with_aug, device)
            if bf16:
                for k in (K.PIXELS, K.PIXELS_AUG):
                    if k in batch:
                        batch[k] = batch[k].to(torch.bfloat16)
            progress = state.step / max(1, total_steps)
            out = engine(batch)                                                    # [ds]
            terms = objective(out, batch, progress, active=active)
            # weight so the DeepSpeed average over ranks is the mean over all good rows of the step
            n_local = sb.size if active else 0
            weight = n_local * W / max(1, n_global)
            touch = sum(v.sum() for v in out.values()) * 0.0  # same parameters get grads on every rank
            engine.backward(terms.total * weight + touch)                          # [ds]
            engine.step()                                                          # [ds]
            if sb is not None:
                state.consumed = sb.consumed
                state.records_trained += sb.size
                state.quarantine.extend(sb.rejected)
                check_quality(state, cfg)
            state.step = engine.global_steps
            window["records"] += n_local
            window["steps"] += 1
            if active:
                last = terms.scalars()
            at_end = cfg.train.max_steps is not None and state.step >= cfg.train.max_steps
            if state.step % report_every == 0 or state.step % ckpt_every == 0 or at_end:
                metrics = step_metrics(state, last, window, scheduler, epoch)
                metrics["total_steps"] = total_steps
                val_now = cfg.train.eval_every is not None and cfg.data.val and state.step % cfg.train.eval_every == 0
                if val_now:
                    state.last_val = evaluate(engine, cfg, tokenizer, device)
                    state.best_val_r_at_1 = max(state.best_val_r_at_1, val_r_at_1(state.last_val))
                metrics.update(prefixed(state.last_val))
                if state.step % ckpt_every == 0 and not at_end:
                    save_and_report(engine, objective, state, cfg, metrics, rank, W, in_ray)
                elif in_ray:
                    ray.train.report(metrics)                                      # [ray]
                window = {"t0": time.perf_counter(), "records": 0, "wait": 0.0, "steps": 0}
            if at_end:
                done = True
                break
            t_wait = time.perf_counter()
        if done:
            break
        state.part, state.consumed = [], 0  # epoch finished
        if epoch + 1 < cfg.train.epochs:
            state.epoch = epoch + 1
            state.part = None

    close_prefetched()
    # final evaluation, totals over all ranks, and the last checkpoint
    metrics = step_metrics(state, last, window, scheduler, state.epoch)
    metrics["total_steps"] = total_steps
    if cfg.data.val:
        state.last_val = evaluate(engine, cfg, tokenizer, device)
        state.best_val_r_at_1 = max(state.best_val_r_at_1, val_r_at_1(state.last_val))
    metrics.update(prefixed(state.last_val))
    by_reason = quarantine_by_reason(state.quarantine)
    unique_bad = sum(by_reason.values())
    totals = torch.tensor([state.records_trained, unique_bad] + [by_reason.get(r, 0) for r in ALL_REASONS],
                          dtype=torch.long, device=device)
    if W > 1:
        dist.all_reduce(totals)
    metrics.update({"samples_seen_total": int(totals[0]), "records_quarantined_stream": int(totals[1]),
                    "final": 1, "loss_state_bytes_per_worker": objective.nbytes()})
    # per-reason counts: stream (this run, unique records) and prepare (the catalogue's manifest)
    for r, n in zip(ALL_REASONS, totals[2:].tolist()):
        if n:
            metrics[f"quarantine_stream_{r}"] = int(n)
    q = manifest.get("quarantine", {})
    metrics["records_quarantined_prepare"] = int(q.get("count", 0))
    for r, n in q.get("by_reason", {}).items():
        metrics[f"quarantine_prepare_{r}"] = int(n)
    save_and_report(engine, objective, state, cfg, metrics, rank, W, in_ray, final=True)


def quiet_libraries() -> None:
    """Per-report lines, per-dataset plans and save_pretrained bars drown the driver's progress
    bar; warnings and errors still come through."""
    import logging
    import warnings

    import ray.train.v2._internal.execution.context as train_context

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for name in ("ray.data", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass


def val_r_at_1(val: dict) -> float:
    if not val:
        return -1.0
    return 0.5 * (val["r_at_1_i2t"] + val["r_at_1_t2i"])


def prefixed(val: dict) -> dict:
    out = {f"val_{k}": v for k, v in val.items()}
    if val:
        out["val_r_at_1"] = val_r_at_1(val)
    return out


def quarantine_by_reason(quarantine: list[dict]) -> dict[str, int]:
    """Distinct records (source, row) per reason: a bad record met in every epoch counts once."""
    seen: dict[str, set] = {}
    for q in quarantine:
        seen.setdefault(q["reason"], set()).add((q["source"], q["row"]))
    return {r: len(v) for r, v in seen.items()}


def check_quality(state: TrainState, cfg: GammarayConfig) -> None:
    seen = state.records_trained + len(state.quarantine)
    bad = len(state.quarantine)
    if seen >= 100 and bad / seen > cfg.data.quarantine_max_fraction:
        reasons: dict[str, int] = {}
        for q in state.quarantine:
            reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
        raise DataQualityError(
            f"{bad} of {seen} records ({bad / seen:.1%}) were rejected, above data.quarantine_max_fraction="
            f"{cfg.data.quarantine_max_fraction}: {reasons}. First: {state.quarantine[0]}"
        )


def step_metrics(state: TrainState, last: dict, window: dict, scheduler, epoch: int) -> dict:
    import psutil

    dt = max(1e-9, time.perf_counter() - window["t0"])
    m = dict(last)
    if window["steps"]:  # throughput of the steps since the last report (none after the last step)
        m.update({"records_per_s": window["records"] / dt, "step_time_s": dt / window["steps"],
                  "data_wait_fraction": window["wait"] / dt})
    m.update({
        "step": state.step, "epoch": epoch,
        "lr": float(scheduler.get_last_lr()[0]) if scheduler is not None else 0.0,
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
        "records_trained": state.records_trained, "records_quarantined": len(state.quarantine),
    })
    for reason, n in quarantine_by_reason(state.quarantine).items():
        m[f"quarantined_{reason}"] = n  # this rank's stream rejects so far (summed over ranks by the monitor)
    if torch.cuda.is_available():
        m["gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return m


# --------------------------------------------------------------------------------------------
# checkpoints: engine state of every rank, the sharded loss state, data position, RNG


def save_and_report(engine, objective: Objective, state: TrainState, cfg: GammarayConfig, metrics: dict,
                    rank: int, W: int, in_ray: bool, final: bool = False) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="gammaray-ckpt-") as d:
        engine.save_checkpoint(os.path.join(d, "deepspeed"), tag="state")        # [ds] every rank
        rdir = os.path.join(d, f"rank-{rank:05d}")
        os.makedirs(rdir)
        torch.save(objective.state_dict(), os.path.join(rdir, "loss_state.pt"))
        torch.save(_rng_state(), os.path.join(rdir, "rng.pt"))
        with open(os.path.join(rdir, "train_state.json"), "w") as f:
            json.dump(state.position_json(rank, W), f)
        with open(os.path.join(rdir, "quarantine.json"), "w") as f:
            json.dump(state.quarantine, f)
        write_quarantine(state, cfg, rank)
        if rank == 0:
            export_model(engine, cfg, os.path.join(d, "model"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg.model_dump(mode="json"), f, indent=1)
        elif cfg.train.deepspeed.zero_stage == 3:
            export_model(engine, cfg, None)  # ZeRO-3 gathers are collective
        if in_ray:
            from ray.train import Checkpoint

            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))     # [ray]
        else:
            local = os.path.join(storage.join(run_dir(cfg), "local-checkpoint"))
            if final and not storage.is_remote(local):
                import shutil

                shutil.rmtree(local, ignore_errors=True)
                shutil.copytree(d, local)


def export_model(engine, cfg: GammarayConfig, out_dir: str | None) -> None:
    model = engine.module
    if cfg.train.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if out_dir is not None:
                save_model(model, out_dir, cfg.model, load_tokenizer(tokenizer_uri(cfg), storage.S3Settings.from_config(cfg.storage)))
        return
    if out_dir is not None:
        save_model(model, out_dir, cfg.model, load_tokenizer(tokenizer_uri(cfg), storage.S3Settings.from_config(cfg.storage)))


def write_quarantine(state: TrainState, cfg: GammarayConfig, rank: int) -> None:
    """Records rejected while streaming, cumulative per rank, rewritten with every checkpoint so the
    file always matches the data position that the checkpoint resumes from."""
    if not state.quarantine:
        return
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from gammaray.schema import QUARANTINE_SCHEMA

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(state.quarantine, schema=QUARANTINE_SCHEMA), buf)
    storage.write_bytes(storage.join(run_dir(cfg), "quarantine", f"stream-rank{rank:05d}.parquet"), buf.getvalue(),
                        cfg.storage)


def restore(d: str, engine, objective: Objective, rank: int, W: int) -> TrainState:
    positions = []
    for name in sorted(os.listdir(d)):
        if name.startswith("rank-"):
            with open(os.path.join(d, name, "train_state.json")) as f:
                positions.append(json.load(f))
    old_W = positions[0]["world_size"]
    same_world = old_W == W
    # [ds] optimizer partitions follow the world size; a changed world size reloads weights only
    engine.load_checkpoint(os.path.join(d, "deepspeed"), tag="state", load_module_only=not same_world,
                           load_optimizer_states=same_world, load_lr_scheduler_states=same_world)
    objective.load_shards([torch.load(os.path.join(d, f"rank-{p['rank']:05d}", "loss_state.pt"), weights_only=False)
                           for p in positions])
    mine = positions[rank] if same_world else positions[0]
    state = TrainState(epoch=mine["epoch"], step=mine["step"], records_trained=mine["records_trained"],
                       best_val_r_at_1=mine["best_val_r_at_1"], last_val=mine.get("last_val", {}))
    if same_world:
        state.part = part_from_json(mine["remaining"])
        state.epoch_consumed_before = mine["epoch_consumed"]
        _set_rng_state(torch.load(os.path.join(d, f"rank-{rank:05d}", "rng.pt"), weights_only=False))
        with open(os.path.join(d, f"rank-{rank:05d}", "quarantine.json")) as f:
            state.quarantine = json.load(f)
    else:
        # re-cut the unconsumed records of every old rank for the new worker count; totals are
        # kept on rank 0 so sums over ranks stay right
        state.part = reshard([part_from_json(p["remaining"]) for p in positions], W)[rank]
        state.epoch_consumed_before = 0
        state.records_trained = sum(p["records_trained"] for p in positions) if rank == 0 else 0
        if rank == 0:
            for p in positions:
                with open(os.path.join(d, f"rank-{p['rank']:05d}", "quarantine.json")) as f:
                    state.quarantine.extend(json.load(f))
    return state


# --------------------------------------------------------------------------------------------
# the entry point


@dataclass
class PretrainResult:
    metrics: dict
    checkpoint_uri: str | None
    run_dir: str
    wall_s: float


def preflight(cfg: GammarayConfig) -> dict:
    """Fail before any cluster resource is used: data and tokenizer must exist."""
    if not cfg.data.train:
        raise ValueError("data.train is not set: point it at a prepared catalogue (gammaray prepare)")
    manifest = load_manifest(cfg.data.train, cfg.storage)
    if manifest["num_records"] == 0:
        raise ValueError(f"{cfg.data.train}: the catalogue has no records")
    q = manifest.get("quarantine", {})
    bad, total = int(q.get("count", 0)), int(manifest["num_records"]) + int(q.get("count", 0))
    if total and bad / total > cfg.data.quarantine_max_fraction:
        raise DataQualityError(
            f"{cfg.data.train}: prepare quarantined {bad} of {total} records ({bad / total:.1%}), above "
            f"data.quarantine_max_fraction={cfg.data.quarantine_max_fraction}: {q.get('by_reason')}. "
            f"See {storage.join(cfg.data.train, 'quarantine')} or raise the threshold.")
    if not storage.exists(storage.join(tokenizer_uri(cfg), "tokenizer_config.json"), cfg.storage):
        raise FileNotFoundError(f"no tokenizer at {tokenizer_uri(cfg)} (set data.tokenizer or prepare --build-tokenizer)")
    if cfg.data.val:
        load_manifest(cfg.data.val, cfg.storage)
    return manifest


def pretrain(cfg: GammarayConfig, progress: bool = True, callbacks: list | None = None) -> PretrainResult:
    """Train on Ray Train (or in this process with train.workers=0); returns final metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .monitor import MetricsCallback, ProgressPrinter

    t0 = time.perf_counter()
    preflight(cfg)
    ensure_ray(cfg)
    loop_config = {"config": cfg.model_dump(mode="json")}
    if cfg.train.workers == 0:
        loop_config["in_ray"] = False
        train_loop_per_worker(loop_config)
        return PretrainResult(metrics={}, checkpoint_uri=None, run_dir=run_dir(cfg), wall_s=time.perf_counter() - t0)

    printer = ProgressPrinter(enabled=progress)
    cb = MetricsCallback(run_dir(cfg), cfg.storage, printer.queue)
    fs, path = storage.resolve(cfg.run.storage, cfg.storage)
    score = {"checkpoint_score_attribute": "val_r_at_1", "checkpoint_score_order": "max"} if cfg.train.eval_every else {}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, **score),
            callbacks=[cb, *(callbacks or [])],
        ),
    )
    with printer:
        result = trainer.fit()
    if result.error:
        raise result.error
    ckpt_uri = None
    if result.checkpoint is not None:
        ckpt_uri = ("s3://" if storage.is_remote(cfg.run.storage) else "") + result.checkpoint.path
    return PretrainResult(metrics=dict(result.metrics or {}), checkpoint_uri=ckpt_uri, run_dir=run_dir(cfg),
                          wall_s=time.perf_counter() - t0)


def ensure_ray(cfg: GammarayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
        return
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    # the dashboard process also serves the state API that Ray Train's placement-group cleaner polls
    ray.init(num_cpus=num_cpus, log_to_driver=True, logging_config=ray.LoggingConfig(log_level="WARNING"),
             runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if cfg.train.use_gpu else "cpu")}})
