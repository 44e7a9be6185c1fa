"""Training: the per-worker loop (DeepSpeed or DDP engine + objective + resumable data stream) and the
`pretrain` entry point that runs it on Ray Train.

The loop reads like the single-process one; the distributed parts are marked:
  [ray]  ray.train.get_context / get_checkpoint / report
  [ds]   engine forward / backward / step / save / load (DeepSpeed, or DDP behind the same calls)
  [dist] one small all_reduce per step so every rank takes the same number of steps

Steps are optimizer steps. With gradient accumulation a step is `train.deepspeed.gradient_accumulation_steps`
micro-batches per worker; an accumulation group never spans two epochs (the last one of an epoch may be
shorter), and reports, evaluations and checkpoints happen only on step boundaries, so a checkpoint never
holds half-accumulated gradients and resume is exact.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from gammaray.config import GammarayConfig, RunError, from_dict
from gammaray.schema import ALL_REASONS, BatchKeys as K, pair_slots
from pipelines import storage
from pipelines.prepare import load_manifest
from pipelines.preprocess import PreprocessSpec
from pipelines.stream import (Segment, StreamBatch, StreamSpec, advance, close_prefetched, epoch_plan, iterate,
                              part_from_json, part_to_json, prefetch, reshard, units_from_manifest)
from pipelines.tokenizer import load as load_tokenizer

from workers.training.engine import build_engine, init_single_process_group, load_state, save_state, set_total_steps, sync_buffers, use_bf16
from workers.evaluation.evaluate import evaluate  # validation: the same code as `gammaray eval`
from workers.models.two_tower import build_model, save_model
from workers.training.objective import Objective
from workers.training.resume import check_identity, check_run, run_identity
from workers.safe_load import load as load_data

FAULT_ENV = "GAMMARAY_FAULT"


class DataQualityError(ValueError, RunError):
    """Too many bad records: the run stops instead of training on a broken catalogue."""


class DuplicateSampleError(RunError):
    """train.audit_samples found a record trained twice within one epoch."""


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
    total_steps: int = 0                  # the step count the LR schedule and the gamma schedule plan for
    part: list[Segment] | None = None     # this rank's records of the epoch not yet consumed at (re)start
    consumed: int = 0                     # records of `part` consumed since then
    epoch_consumed_before: int = 0        # records of the epoch consumed before `part` began
    records_trained: int = 0              # good records stepped on, all epochs
    quarantine: list[dict] = field(default_factory=list)
    best_val_r_at_1: float = -1.0
    last_val: dict = field(default_factory=dict)
    resumes: list[dict] = field(default_factory=list)   # one entry per restart: step, world sizes, how
    audit: list[dict] = field(default_factory=list)     # per finished epoch (train.audit_samples)
    plan: dict = field(default_factory=dict)            # train.epochs / max_steps that total_steps was planned for
    identity: dict = field(default_factory=dict)        # what the position means (workers/training/resume.py)
    loss_sums: dict = field(default_factory=dict)       # this epoch's loss terms x records (add_loss)
    loss_sums_prev: dict = field(default_factory=dict)  # the same for the last finished epoch

    def position_json(self, rank: int, world_size: int) -> dict:
        # None: the epoch's plan is not cut yet (every rank alike)
        remaining = None if self.part is None else part_to_json(advance(self.part, self.consumed))
        return {"rank": rank, "world_size": world_size, "epoch": self.epoch, "step": self.step,
                "total_steps": self.total_steps, "remaining": remaining,
                "epoch_consumed": self.epoch_consumed_before + self.consumed,
                "records_trained": self.records_trained, "best_val_r_at_1": self.best_val_r_at_1,
                "last_val": self.last_val, "resumes": self.resumes, "audit": self.audit, "plan": self.plan,
                "identity": self.identity, "loss_sums": self.loss_sums, "loss_sums_prev": self.loss_sums_prev}


def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _reseed(seed: int, rank: int, step: int) -> int:
    """RNG seed for a rank that resumes on a different worker count (no saved stream to continue)."""
    s = (seed * 1_000_003 + step * 1_009 + rank) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


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


def lockstep(batches: Iterator[StreamBatch], device: torch.device,
             clock: dict | None = None) -> Iterator[tuple[StreamBatch | None, int, bool]]:
    """[dist] Yield (this rank's batch or None, global number of good rows, last) until every rank is
    done; `last` says no rank has another batch. One all_reduce per batch, one batch read ahead.
    Time spent waiting for data is added to clock["wait"]."""
    it = iter(batches)
    distributed = dist.is_initialized() and dist.get_world_size() > 1

    def pull() -> tuple[StreamBatch | None, torch.Tensor]:
        t0 = time.perf_counter()
        sb = next(it, None)  # waiting for this rank's data pipeline (not for the other ranks)
        if clock is not None:
            clock["wait"] = clock.get("wait", 0.0) + time.perf_counter() - t0
        flag = torch.tensor([0 if sb is None else 1, 0 if sb is None else sb.size], dtype=torch.long, device=device)
        if distributed:
            dist.all_reduce(flag)
        return sb, flag

    cur, flag = pull()
    if int(flag[0]) == 0:
        return
    while True:
        nxt, nflag = pull()
        last = int(nflag[0]) == 0
        yield cur, int(flag[1]), last
        if last:
            return
        cur, flag = nxt, nflag


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SampleAudit:
    """train.audit_samples: how often each sample_index was trained in the current epoch. Per rank,
    checkpointed with the rank; summed over ranks at the end of every epoch."""

    def __init__(self, num_samples: int):
        self.counts = torch.zeros(num_samples, dtype=torch.int32)

    def add(self, sample_index: np.ndarray) -> None:
        idx = torch.from_numpy(np.asarray(sample_index, dtype=np.int64))
        if idx.numel() and int(idx.max()) >= self.counts.numel():
            self.counts = torch.cat([self.counts, torch.zeros(int(idx.max()) + 1 - self.counts.numel(), dtype=torch.int32)])
        self.counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))

    def add_counts(self, counts: torch.Tensor) -> None:
        n = max(self.counts.numel(), counts.numel())
        self.counts = torch.nn.functional.pad(self.counts, (0, n - self.counts.numel()))
        self.counts[: counts.numel()] += counts.to(torch.int32)

    def close_epoch(self, epoch: int, device: torch.device) -> dict:
        """Collective. Summary of the finished epoch; raises if a record was trained twice."""
        total = self.counts.to(device, copy=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        total = total.cpu()
        self.counts.zero_()
        summary = {"epoch": epoch, "once": int((total == 1).sum()), "repeated": int((total > 1).sum()),
                   "missed": int((total == 0).sum())}
        if summary["repeated"]:
            twice = torch.nonzero(total > 1).flatten()[:10].tolist()
            raise DuplicateSampleError(f"epoch {epoch}: {summary['repeated']} records trained more than once, "
                                       f"e.g. sample_index {twice}")
        return summary


@dataclass
class Fault:
    """Test hook for failure handling, set by the driver's environment (GAMMARAY_FAULT, JSON):
    at optimizer step `step`, rank `rank` SIGKILLs itself ("worker") or the driver process ("driver"),
    or only writes the marker and waits ("pause": a test acts at that step, e.g. stops the storage
    server), once: a marker file guards it so the restarted run does not repeat it. `delay_s` first
    lets the Ray Train controller register the checkpoint reported just before (it polls every 2 s)."""

    target: str
    step: int
    marker: str
    rank: int = 0
    delay_s: float = 0.0
    driver_pid: int | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "Fault | None":
        if not spec:
            return None
        d = json.loads(spec)
        if d.get("target") not in ("worker", "driver", "pause") or "step" not in d or "marker" not in d:
            raise ValueError(f"{FAULT_ENV}: need target=worker|driver|pause, step and marker; got {spec}")
        return cls(**d)

    def maybe_fire(self, rank: int, step: int) -> None:
        if rank != self.rank or step != self.step or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            json.dump({"step": step, "rank": rank, "pid": os.getpid(), "time": time.time()}, f)
        time.sleep(self.delay_s)
        if self.target == "pause":
            return
        if self.target == "worker":
            os.kill(os.getpid(), signal.SIGKILL)
        assert self.driver_pid is not None
        os.kill(self.driver_pid, signal.SIGKILL)
        time.sleep(3600)  # hold the others at the next collective until Ray reaps the orphaned job


# --------------------------------------------------------------------------------------------
# the loop


def stream_spec(cfg: GammarayConfig, catalogue_uri: str, units, epoch: int, train: bool, with_aug: bool,
                batch_size: int) -> StreamSpec:
    d = cfg.data
    pp = PreprocessSpec(image_size=d.image_size, max_image_pixels=d.max_image_pixels,
                        max_text_tokens=d.max_text_tokens, max_text_chars=d.max_text_chars, augment=d.augment,
                        tokenizer_uri=tokenizer_uri(cfg), seed=cfg.run.seed, epoch=epoch,
                        with_aug_views=with_aug, train=train, view_pair=d.view_pair, pair_locale=d.pair_locale,
                        jpeg_draft=d.jpeg_draft, image_background=tuple(d.image_background))
    return StreamSpec(catalogue_uri=catalogue_uri, units=tuple(units), preprocess=pp,
                      settings=storage.S3Settings.from_config(cfg.storage), shuffle=d.shuffle and train,
                      batch_size=batch_size, preprocess_num_cpus=d.preprocess_num_cpus,
                      prefetch_batches=d.prefetch_batches, concurrency=d.preprocess_concurrency,
                      segments_per_task=d.preprocess_segments_per_task)


def steps_per_epoch(cfg: GammarayConfig, records_per_worker: int) -> int:
    micro = math.ceil(records_per_worker / cfg.data.batch_size)
    return math.ceil(micro / cfg.train.deepspeed.gradient_accumulation_steps)


def estimate_total_steps(cfg: GammarayConfig, num_records: int, world_size: int) -> int:
    total = steps_per_epoch(cfg, math.ceil(num_records / max(1, world_size))) * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def pick_device(cfg: GammarayConfig, in_ray: bool) -> tuple[bool, torch.device]:
    if not (cfg.train.use_gpu and torch.cuda.is_available()):
        return False, torch.device("cpu")
    if in_ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
        if isinstance(device, list):  # several GPUs per worker: the loop uses the first
            device = device[0]
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return True, device


def open_checkpoint(cfg: GammarayConfig, in_ray: bool):
    """[ray] The run's latest checkpoint, else train.resume_from, else None."""
    import ray.train

    ckpt = ray.train.get_checkpoint() if in_ray else None
    if ckpt is None and cfg.train.resume_from:
        fs, path = storage.resolve(cfg.train.resume_from, cfg.storage)
        ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
    return ckpt


def checkpoint_uri(ckpt) -> str:
    """A Ray checkpoint's location as a URI (for messages)."""
    return ("s3://" if "s3" in ckpt.filesystem.type_name else "") + ckpt.path


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    in_ray = loop_config.get("in_ray", True)
    fault = Fault.parse(loop_config.get("fault"))
    identity = loop_config.get("identity")
    quiet_libraries()
    if not in_ray:
        init_single_process_group()
    rank, W = _world()
    on_gpu, device = pick_device(cfg, in_ray)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    random.seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)

    manifest = load_manifest(cfg.data.train, cfg.storage)
    units = units_from_manifest(manifest)
    num_samples = int(manifest["next_sample_index"])
    identity = identity or run_identity(cfg, manifest)
    tokenizer = load_tokenizer(tokenizer_uri(cfg), storage.S3Settings.from_config(cfg.storage))
    model = build_model(cfg.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    objective = Objective(cfg.loss, num_samples=num_samples, seed=cfg.run.seed, device=device, distributed=W > 1,
                          view_pair=cfg.data.view_pair)
    with_aug = objective.needs_augmented_views
    ckpt = open_checkpoint(cfg, in_ray)  # [ray]
    if ckpt is None and cfg.data.prefetch_next_epoch:
        # [data] a fresh run: start epoch 0's pipeline now, so that its worker processes start while
        # the engine is built (a resumed run starts from its checkpointed position instead)
        prefetch(stream_spec(cfg, cfg.data.train, units, 0, train=True, with_aug=with_aug,
                             batch_size=cfg.data.batch_size), epoch_plan(units, 0, cfg.run.seed, W, cfg.data.shuffle)[rank])
    total_steps = estimate_total_steps(cfg, int(manifest["num_records"]), W)
    engine, _, scheduler = build_engine(model, cfg, total_steps, on_gpu, device, in_ray)   # [ds]
    bf16 = use_bf16(cfg, on_gpu)
    audit = SampleAudit(num_samples) if cfg.train.audit_samples else None

    state = TrainState(total_steps=total_steps, plan=plan_of(cfg), identity=identity)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = restore(d, engine, scheduler, objective, audit, cfg, units, rank, W, identity, checkpoint_uri(ckpt))

    gas = cfg.train.deepspeed.gradient_accumulation_steps
    report_every, ckpt_every, max_steps = cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.max_steps
    window = new_window()   # since the last report
    attempt = new_window()  # since this process started (the final line's throughput)
    last: dict[str, float] = {}
    micro = 0  # micro-batches accumulated towards the next optimizer step
    done = max_steps is not None and state.step >= max_steps
    while not done and state.epoch < cfg.train.epochs:
        epoch = state.epoch
        if state.part is None:
            state.part, state.consumed, state.epoch_consumed_before = epoch_plan(
                units, epoch, cfg.run.seed, W, cfg.data.shuffle)[rank], 0, 0
        spec = stream_spec(cfg, cfg.data.train, units, epoch, train=True, with_aug=with_aug,
                           batch_size=cfg.data.batch_size)
        then = None
        if cfg.data.prefetch_next_epoch and epoch + 1 < cfg.train.epochs:
            # [data] the next epoch's pipeline starts once this one has produced its last block
            then = (stream_spec(cfg, cfg.data.train, units, epoch + 1, train=True, with_aug=with_aug,
                                batch_size=cfg.data.batch_size), epoch_plan(units, epoch + 1, cfg.run.seed, W,
                                                                            cfg.data.shuffle)[rank])
        epoch_finished = True  # no rank has data left (an empty part, or a resume at the epoch's end)
        for sb, n_global, last_batch in lockstep(iterate(spec, state.part, then=then), device, window):  # [dist]
            epoch_finished = last_batch
            active = sb is not None and sb.size > 0
            batch = to_torch(sb.arrays, device) if active else placeholder_batch(cfg, with_aug, device)
            if bf16:
                for k in (K.PIXELS, K.PIXELS_AUG):
                    if k in batch:
                        batch[k] = batch[k].to(torch.bfloat16)
            boundary = micro + 1 == gas or last_batch
            engine.set_gradient_accumulation_boundary(boundary)                    # [ds] groups end with the epoch
            out = engine(batch)                                                    # [ds]
            terms = objective(out, batch, state.step / max(1, state.total_steps), active=active)
            # weight so the average over ranks is the mean over all good rows of the step
            n_local = sb.size if active else 0
            weight = n_local * W / max(1, n_global)
            touch = sum(v.sum() for v in out.values()) * 0.0  # same parameters get grads on every rank
            engine.backward(terms.total * weight + touch)                          # [ds]
            engine.step()                                                          # [ds]
            micro = 0 if boundary else micro + 1
            if sb is not None:
                state.consumed = sb.consumed
                state.records_trained += sb.size
                state.quarantine.extend(sb.rejected)
                check_quality(state, cfg)
                if audit is not None and active:
                    audit.add(sb.arrays[K.SAMPLE_INDEX])
            for w in (window, attempt):
                w["records"] += n_local
                w["micro"] += 1
            if active:
                last = terms.scalars()
                add_loss(state, last, n_local)
            if not boundary:
                continue
            state.step = engine.global_steps
            window["steps"] += 1
            attempt["steps"] += 1
            done = (max_steps is not None and state.step >= max_steps) or (last_batch and epoch == cfg.train.epochs - 1)
            if state.step % report_every == 0 or state.step % ckpt_every == 0 or done:
                checkpoint_now = state.step % ckpt_every == 0 and not done  # the end saves anyway
                metrics = step_metrics(state, last, window, scheduler, epoch)
                val_now = bool(cfg.data.val) and cfg.train.eval_every is not None and (
                    state.step % cfg.train.eval_every == 0 or checkpoint_now)
                if val_now:
                    state.last_val = evaluate(engine, cfg, tokenizer, device)
                    state.best_val_r_at_1 = max(state.best_val_r_at_1, val_r_at_1(state.last_val))
                metrics.update(prefixed(state.last_val, cfg))
                if checkpoint_now:
                    save_and_report(engine, scheduler, objective, audit, state, cfg, metrics, rank, W, in_ray)
                elif in_ray:
                    import ray.train

                    ray.train.report(metrics)                                      # [ray]
                attempt["wait"] += window["wait"]
                window.update(new_window())  # in place: lockstep holds it as its clock
            if fault is not None:
                fault.maybe_fire(rank, state.step)
            if done:
                break
        if not epoch_finished:
            break  # stopped by max_steps inside the epoch: the position stays for a later extension
        # the epoch is finished
        if audit is not None:
            state.audit.append(audit.close_epoch(epoch, device))
        state.epoch, state.part, state.consumed, state.epoch_consumed_before = epoch + 1, None, 0, 0
        state.loss_sums_prev, state.loss_sums = state.loss_sums, {}

    close_prefetched()
    # final evaluation, totals over all ranks, and the last checkpoint
    attempt["wait"] += window["wait"]
    metrics = step_metrics(state, last, attempt, scheduler, min(state.epoch, cfg.train.epochs - 1))
    if cfg.data.val:
        state.last_val = evaluate(engine, cfg, tokenizer, device)
        state.best_val_r_at_1 = max(state.best_val_r_at_1, val_r_at_1(state.last_val))
    metrics.update(prefixed(state.last_val, cfg))
    # the run's figures, the same on every rank: counts summed over ranks, loss terms averaged over
    # the last epoch's records (one micro-batch may hold a single record or be a rank's stand-in)
    metrics.update(run_totals(state, attempt, W, device))
    metrics.update(epoch_loss_means(state, W, device))
    metrics.update({"final": 1, "loss_state_bytes_per_worker": objective.nbytes(),
                    "resumed_from_steps": [r["step"] for r in state.resumes],
                    "resume_optimizer": [r["optimizer"] for r in state.resumes]})
    q = manifest.get("quarantine", {})
    metrics["records_quarantined_prepare"] = int(q.get("count", 0))
    for r, n in q.get("by_reason", {}).items():
        metrics[f"quarantine_prepare_{r}"] = int(n)
    if state.audit:
        metrics.update({"audit_epochs": state.audit, "audit_repeated_total": sum(a["repeated"] for a in state.audit),
                        "audit_missed_total": sum(a["missed"] for a in state.audit)})
    save_and_report(engine, scheduler, objective, audit, state, cfg, metrics, rank, W, in_ray, final=True)


def new_window() -> dict:
    return {"t0": time.perf_counter(), "records": 0, "wait": 0.0, "steps": 0, "micro": 0}


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


def prefixed(val: dict, cfg: GammarayConfig | None = None) -> dict:
    out = {f"val_{k}": v for k, v in val.items()}
    if val or (cfg is not None and cfg.train.eval_every):
        out["val_r_at_1"] = val_r_at_1(val)  # checkpoints are ranked by it: never missing
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


_NODE_ID: str | None = None


def node_id() -> str:
    global _NODE_ID
    if _NODE_ID is None:
        try:
            import ray

            _NODE_ID = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        except Exception:  # noqa: BLE001
            _NODE_ID = "local"
    return _NODE_ID


def step_metrics(state: TrainState, last: dict, window: dict, scheduler, epoch: int) -> dict:
    """This worker's figures since the previous report (the callback aggregates all workers)."""
    import psutil

    dt = max(1e-9, time.perf_counter() - window["t0"])
    steps = max(1, window["steps"])
    m = dict(last)
    if window["steps"]:  # throughput of the steps since the last report (none after the last step)
        m.update({"records_per_s": window["records"] / dt, "step_time_s": dt / steps,
                  "data_wait_s": window["wait"] / steps, "data_wait_fraction": window["wait"] / dt,
                  "micro_batches_per_step": window["micro"] / steps})
    m.update({
        "step": state.step, "epoch": epoch, "total_steps": state.total_steps,
        "lr": float(scheduler.get_last_lr()[0]) if scheduler is not None else 0.0,
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
        "records_trained": state.records_trained, "records_quarantined": len(state.quarantine),
        "node_id": node_id(),
    })
    if "logit_scale" in m and m["logit_scale"] > 0:
        m["temperature"] = 1.0 / m["logit_scale"]
    for reason, n in quarantine_by_reason(state.quarantine).items():
        m[f"quarantined_{reason}"] = n  # this rank's stream rejects so far (summed over ranks by the monitor)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        m["gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return m


# the final figures: the run's, not one rank's or one micro-batch's

NOT_AVERAGED = ("logit_scale",)  # a parameter's current value, not a per-record quantity


def add_loss(state: TrainState, scalars: dict[str, float], n: int) -> None:
    """Add a micro-batch's loss terms, weighted by its n good records, to this epoch's sums (reset
    when an epoch ends: `loss_sums_prev` keeps the finished one)."""
    if not state.loss_sums:
        state.loss_sums = {"records": 0, "sums": {}}
    sums = state.loss_sums["sums"]
    for k, v in scalars.items():
        if k not in NOT_AVERAGED:
            sums[k] = sums.get(k, 0.0) + float(v) * n
    state.loss_sums["records"] += n


def epoch_loss_means(state: TrainState, W: int, device: torch.device) -> dict:
    """Collective. Every loss term averaged over the records of the last epoch trained (the
    current one if it trained any record, else the last finished one), on all ranks:
    `loss_epoch` and `loss_records` say which epoch and how many records."""
    cur, prev = state.loss_sums or {"records": 0, "sums": {}}, state.loss_sums_prev or {"records": 0, "sums": {}}
    names = sorted(set(cur["sums"]) | set(prev["sums"]))
    if W > 1:  # a rank without data in an epoch has no names: use the union
        every: list = [None] * W
        dist.all_gather_object(every, names)
        names = sorted(set().union(*every))
    t = torch.tensor([cur["records"], prev["records"]] + [cur["sums"].get(k, 0.0) for k in names]
                     + [prev["sums"].get(k, 0.0) for k in names], dtype=torch.float64, device=device)
    if W > 1:
        dist.all_reduce(t)
    t = t.cpu()
    use_cur = t[0] > 0
    n, off = (t[0], 2) if use_cur else (t[1], 2 + len(names))
    if n == 0:
        return {}
    out = {k: float(t[off + i] / n) for i, k in enumerate(names)}
    out.update({"loss_epoch": state.epoch if use_cur else state.epoch - 1, "loss_records": int(n)})
    return out


def run_totals(state: TrainState, attempt: dict, W: int, device: torch.device) -> dict:
    """Collective. Counts over all ranks: records trained (each epoch counts), stream rejects (all,
    and distinct records per reason), records per second of this attempt."""
    by_reason = quarantine_by_reason(state.quarantine)
    t = torch.tensor([state.records_trained, len(state.quarantine), attempt["records"], sum(by_reason.values())]
                     + [by_reason.get(r, 0) for r in ALL_REASONS], dtype=torch.long, device=device)
    if W > 1:
        dist.all_reduce(t)
    t = t.cpu().tolist()
    out = {"records_trained": t[0], "samples_seen_total": t[0], "records_quarantined": t[1],
           "records_quarantined_stream": t[3], "records_per_s": t[2] / max(1e-9, time.perf_counter() - attempt["t0"])}
    for r, n in zip(ALL_REASONS, t[4:]):
        if n:
            out[f"quarantine_stream_{r}"] = out[f"quarantined_{r}"] = n  # distinct records, summed over ranks
    return out


# --------------------------------------------------------------------------------------------
# checkpoints: engine state of every rank, the sharded loss state, data position, RNG


def save_and_report(engine, scheduler, objective: Objective, audit: SampleAudit | None, state: TrainState,
                    cfg: GammarayConfig, metrics: dict, rank: int, W: int, in_ray: bool, final: bool = False) -> None:
    """Every rank writes its part of one checkpoint folder; Ray merges the ranks' folders."""
    sync_buffers(engine)  # [dist] one set of BatchNorm statistics in the checkpoint and the export
    with tempfile.TemporaryDirectory(prefix="gammaray-ckpt-") as d:
        save_state(engine, scheduler, d, cfg.train.portable_checkpoint)          # [ds] every rank
        rdir = os.path.join(d, f"rank-{rank:05d}")
        os.makedirs(rdir)
        torch.save(objective.state_dict(), os.path.join(rdir, "loss_state.pt"))
        torch.save(_rng_state(), os.path.join(rdir, "rng.pt"))
        if audit is not None:
            torch.save(audit.counts, os.path.join(rdir, "audit.pt"))
        with open(os.path.join(rdir, "train_state.json"), "w") as f:
            json.dump(state.position_json(rank, W), f)
        with open(os.path.join(rdir, "quarantine.json"), "w") as f:
            json.dump(state.quarantine, f)
        write_quarantine(state, cfg, rank)
        if rank == 0:
            export_model(engine, cfg, os.path.join(d, "model"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg.model_dump(mode="json"), f, indent=1)
        else:
            export_model(engine, cfg, None)  # ZeRO-3 gathers are collective
        if in_ray:
            import ray.train

            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))  # [ray]
        else:
            local = os.path.join(storage.join(run_dir(cfg), "local-checkpoint"))
            if final and not storage.is_remote(local):
                import shutil

                shutil.rmtree(local, ignore_errors=True)
                shutil.copytree(d, local)


def export_model(engine, cfg: GammarayConfig, out_dir: str | None) -> None:
    """Towers in Hugging Face format plus the heads; under ZeRO-3 the weights are gathered first
    (every rank must call this)."""
    from workers.training.engine import is_zero3

    model = engine.module
    if is_zero3(engine):
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


def read_positions(d: str) -> list[dict]:
    positions = []
    for name in sorted(os.listdir(d)):
        if name.startswith("rank-"):
            with open(os.path.join(d, name, "train_state.json")) as f:
                positions.append(json.load(f))
    if not positions or [p["rank"] for p in positions] != list(range(positions[0]["world_size"])):
        raise RuntimeError(f"{d}: incomplete checkpoint, rank folders {[p['rank'] for p in positions]}")
    return positions


def plan_of(cfg: GammarayConfig) -> dict:
    return {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps}


def remaining_steps(cfg: GammarayConfig, parts: list[list[Segment]], epoch: int, num_records: int, W: int) -> int:
    """Optimizer steps left: the rest of this epoch (the largest part decides) plus the later epochs."""
    left = steps_per_epoch(cfg, max((sum(s.size for s in p) for p in parts), default=0))
    later = max(0, cfg.train.epochs - epoch - 1) * steps_per_epoch(cfg, math.ceil(num_records / W))
    return left + later


def restore(d: str, engine, scheduler, objective: Objective, audit: SampleAudit | None, cfg: GammarayConfig,
            units, rank: int, W: int, identity: dict, shown: str) -> TrainState:
    """Every rank, from one checkpoint folder saved with any worker count. `shown` names the
    checkpoint in errors: a file that would run code (workers/safe_load.py) or a checkpoint trained
    under other data, seed or plan settings (workers/training/resume.py) is refused."""
    positions = read_positions(d)
    forced = check_identity(positions[0].get("identity"), identity, cfg, shown)
    old_W = positions[0]["world_size"]
    same_world = old_W == W
    how = load_state(engine, scheduler, d, same_world, shown)                   # [ds]

    def rank_file(r: int, name: str) -> tuple[str, str]:
        return os.path.join(d, f"rank-{r:05d}", name), f"{shown}/rank-{r:05d}/{name}"

    # the per-sample memory, re-sharded for W ranks; a generator reads one old shard at a time, so
    # peak memory stays at this rank's part plus one old shard (and the E-step generator comes back)
    objective.load_shards(load_data(*rank_file(p["rank"], "loss_state.pt")) for p in positions)
    mine = positions[rank] if same_world else positions[0]
    step = mine["step"]
    state = TrainState(epoch=mine["epoch"], step=step, records_trained=mine["records_trained"],
                       best_val_r_at_1=mine["best_val_r_at_1"], last_val=mine.get("last_val", {}),
                       resumes=list(mine.get("resumes", [])), audit=list(mine.get("audit", [])), plan=plan_of(cfg),
                       identity=identity, loss_sums=mine.get("loss_sums", {}), loss_sums_prev=mine.get("loss_sums_prev", {}))
    if same_world:
        parts = [part_from_json(p["remaining"] or []) for p in positions]
        state.part = None if mine["remaining"] is None else parts[rank]
        state.epoch_consumed_before = mine["epoch_consumed"]
        _set_rng_state(load_data(*rank_file(rank, "rng.pt"), numpy_arrays=True))
        with open(os.path.join(d, f"rank-{rank:05d}", "quarantine.json")) as f:
            state.quarantine = json.load(f)
        if audit is not None and os.path.exists(rank_file(rank, "audit.pt")[0]):
            audit.counts = load_data(*rank_file(rank, "audit.pt"))
    else:
        # re-cut the unconsumed records of every old rank for the new worker count; totals are
        # kept on rank 0 so sums over ranks stay right; random streams restart from a seed
        parts = reshard([part_from_json(p["remaining"] or []) for p in positions], W)
        state.part = None if mine["remaining"] is None else parts[rank]
        state.epoch_consumed_before = 0
        state.records_trained = sum(p["records_trained"] for p in positions) if rank == 0 else 0
        state.loss_sums = merge_loss_sums([p.get("loss_sums", {}) for p in positions]) if rank == 0 else {}
        state.loss_sums_prev = merge_loss_sums([p.get("loss_sums_prev", {}) for p in positions]) if rank == 0 else {}
        new_seed = _reseed(cfg.run.seed, rank, step)
        if objective.gamma is not None:
            objective.gamma.generator.manual_seed(new_seed)
        if rank == 0:
            for p in positions:
                with open(os.path.join(d, f"rank-{p['rank']:05d}", "quarantine.json")) as f:
                    state.quarantine.extend(json.load(f))
        if audit is not None and rank == 0:
            for p in positions:
                f, f_shown = rank_file(p["rank"], "audit.pt")
                if os.path.exists(f):
                    audit.add_counts(load_data(f, f_shown))
    # the step count the schedules plan for: kept while the plan holds (exact resume), re-planned from
    # the remaining data when the worker count, train.epochs or train.max_steps changed
    if same_world and mine.get("plan") == plan_of(cfg) and mine.get("total_steps"):
        state.total_steps = mine["total_steps"]
    else:
        current = state.epoch if state.part is not None else state.epoch - 1  # an uncut epoch counts whole
        total = step + remaining_steps(cfg, parts, current, sum(u.num_rows for u in units), W)
        state.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    set_total_steps(scheduler, cfg, state.total_steps)
    state.resumes.append({"step": step, "world_size": W, "from_world_size": old_W, "optimizer": how,
                          **({"forced": forced} if forced else {})})
    return state


def merge_loss_sums(parts: list[dict]) -> dict:
    """The loss sums of several old ranks as one (a resume on another worker count keeps them on rank 0)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    sums: dict[str, float] = {}
    for p in parts:
        for k, v in p["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
    return {"records": sum(p["records"] for p in parts), "sums": sums}


# --------------------------------------------------------------------------------------------
# the entry point


@dataclass
class PretrainResult:
    metrics: dict
    checkpoint_uri: str | None
    run_dir: str
    wall_s: float
    progress: dict = field(default_factory=dict)   # the last state the driver's progress bar showed
    progress_updates: int = 0


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


def build_trainer(cfg: GammarayConfig, callbacks: list | None = None, fault: str | None = None,
                  identity: dict | None = None, **run_config: Any):
    """The TorchTrainer that runs `cfg`'s training loop; starts nothing (no ray.init, no progress
    queue). Shared by `pretrain` and the Ray Tune trials of tuning/: `callbacks` go to the RunConfig
    (e.g. Tune's report callback), `run_config` overrides RunConfig fields (name, storage_path, ...),
    `identity` is the run's (workers/training/resume.py; default: from `cfg`).

    The storage filesystem handed to Ray is `storage.RetryingS3` for s3://: it carries the names of
    the key variables, never the keys (Ray and Tune pickle it), and retries Ray's own checkpoint
    uploads and storage checks for storage.retry_time_s."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    loop_config = {"config": cfg.model_dump(mode="json")}
    if fault:
        loop_config["fault"] = fault
    if identity:
        loop_config["identity"] = identity
    fs, path = storage.resolve(cfg.run.storage, cfg.storage)
    score = {"checkpoint_score_attribute": "val_r_at_1", "checkpoint_score_order": "max"} if cfg.train.eval_every else {}
    rc: dict[str, Any] = dict(
        name=cfg.run.name, storage_path=path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, **score),
        callbacks=list(callbacks or []),
    )
    rc.update(run_config)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     placement_strategy=cfg.train.placement_strategy,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=RunConfig(**rc),
    )


def fault_from_env() -> str | None:
    """The GAMMARAY_FAULT test hook, with this (driver) process's id filled in for target=driver."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fault = Fault.parse(spec)
    assert fault is not None
    if fault.target == "driver" and fault.driver_pid is None:
        fault.driver_pid = os.getpid()
    return json.dumps(fault.__dict__)


def pretrain(cfg: GammarayConfig, progress: bool = True, callbacks: list | None = None) -> PretrainResult:
    """Train on Ray Train (or in this process with train.workers=0); returns final metrics.

    Re-running with the same run.name and run.storage resumes from the run's latest checkpoint;
    FailureConfig(train.max_failures) restarts the workers from it after a failure."""
    from workers.training.monitor import MetricsCallback, ProgressPrinter

    from workers.runtime import resolve_for_cluster

    if cfg.data.features.train:  # locked towers, cached features: only the heads train, in this process
        from workers.evaluation.heads import pretrain_heads

        return pretrain_heads(cfg, progress=progress)
    t0 = time.perf_counter()
    manifest = preflight(cfg)
    identity = run_identity(cfg, manifest)  # as written: before "auto" keys are resolved for this cluster
    check_run(cfg, run_dir(cfg), identity)  # a resume that does not match is refused before Ray starts
    ensure_ray(cfg)
    cfg = resolve_for_cluster(cfg)  # train.workers / data.batch_size / preprocess_concurrency = "auto"
    fault = fault_from_env()
    if cfg.train.workers == 0:
        loop_config = {"config": cfg.model_dump(mode="json"), "in_ray": False, "fault": fault, "identity": identity}
        train_loop_per_worker(loop_config)
        return PretrainResult(metrics={}, checkpoint_uri=None, run_dir=run_dir(cfg), wall_s=time.perf_counter() - t0)

    printer = ProgressPrinter(enabled=progress)
    cb = MetricsCallback(run_dir(cfg), cfg.storage, printer.queue)
    trainer = build_trainer(cfg, [cb, *(callbacks or [])], fault, identity)
    with printer:
        try:
            result = trainer.fit()
        except Exception as err:  # noqa: BLE001 - Ray Train's TrainingFailedError and what it wraps
            known = reason_of(err)
            if known is None:
                raise
            raise known from None  # one message that says what happened and what to do, not Ray's tracebacks
    if result.error:
        raise result.error
    ckpt_uri = None
    if result.checkpoint is not None:
        ckpt_uri = ("s3://" if storage.is_remote(cfg.run.storage) else "") + result.checkpoint.path
    return PretrainResult(metrics=dict(result.metrics or {}), checkpoint_uri=ckpt_uri, run_dir=run_dir(cfg),
                          wall_s=time.perf_counter() - t0, progress=dict(printer.last), progress_updates=printer.updates)


def reason_of(err: BaseException) -> RunError | None:
    """The gammaray error behind a failed fit (storage down for longer than storage.retry_time_s,
    a refused checkpoint or resume, too many bad records), found through Ray's wrappers (the worker
    group's failures, the controller's, RayTaskError causes); None for anything else."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: the original exception
        if isinstance(cause, RunError):
            return cause
        if isinstance(e, RunError) and not hasattr(e, "cause"):
            return e
        todo += [cause, getattr(e, "controller_failure", None), *getattr(e, "worker_failures", {}).values(),
                 e.__cause__, e.__context__]
    return None


def ensure_ray(cfg: GammarayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):  # inside a Ray job RAY_ADDRESS names the cluster
        ray.init(address=cfg.ray.address)
        return
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    # the dashboard process also serves the state API that Ray Train's placement-group cleaner polls
    ray.init(num_cpus=num_cpus, log_to_driver=True, logging_config=ray.LoggingConfig(log_level="WARNING"),
             runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if cfg.train.use_gpu else "cpu")}})
