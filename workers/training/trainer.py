"""The `pretrain` entry point: checks the data before any cluster resource is used, connects to Ray,
builds the Ray Train `TorchTrainer` (shared with the Ray Tune trials of tuning/) and runs the loop of
workers/training/loop.py, or trains the heads alone on cached features."""

from __future__ import annotations

import errno
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from gammaray.config import GammarayConfig, RunError, apply_overrides
from pipelines import storage
from pipelines.storage import Store
from pipelines.prepare import load_manifest
from pipelines.tokenizer import tokenizer_uri
from workers.evaluation.features import load_feature_store
from workers.training.heads import STATE_FILE, export_heads, train_heads
from workers.cluster import ensure_ray, resolve_for_cluster
from workers.runtime import run_dir
from workers.training.faults import fault_from_env
from workers.training.loop import train_loop_per_worker
from workers.training.monitor import MetricsCallback, ProgressPrinter
from workers.training.quarantine import DataQualityError
from workers.training.resume import check_run, run_identity, set_aside_partial_snapshot
from workers.tracking import TrackingCallback, start_run


@dataclass
class PretrainResult:
    metrics: dict
    checkpoint_uri: str | None
    run_dir: str
    wall_s: float
    progress: dict = field(default_factory=dict)   # the last state the driver's progress bar showed
    progress_updates: int = 0


def pretrain_heads(cfg: GammarayConfig, store: Store, progress: bool = True) -> PretrainResult:
    """`gammaray pretrain` on cached features: train, write metrics.jsonl, export the model."""
    t0 = time.perf_counter()
    train = load_feature_store(cfg.data.features.train, store)
    val = load_feature_store(cfg.data.features.val, store) if cfg.data.features.val else None
    rdir = run_dir(cfg)
    res = train_heads(cfg, train, val, progress=progress, state_uri=storage.join(rdir, "heads", STATE_FILE), store=store)
    lines = "".join(json.dumps(m) + "\n" for m in res.history)
    store.write_bytes(storage.join(rdir, "metrics.jsonl"), lines.encode())
    export_heads(res.model, train, cfg, store, rdir)
    metrics = dict(res.metrics)
    metrics.update({"records_trained": len(train), "samples_seen_total": res.samples, "steps": res.steps,
                    "final": 1, "resumed_from_epoch": res.resumed_from_epoch, "train_s": round(res.train_s, 2)})
    return PretrainResult(metrics=metrics, checkpoint_uri=rdir, run_dir=rdir, wall_s=time.perf_counter() - t0)


def preflight(cfg: GammarayConfig, store: Store) -> dict:
    """Fail before any cluster resource is used: data and tokenizer must exist."""
    if not cfg.data.train:
        raise ValueError("data.train is not set: point it at a prepared catalogue (gammaray prepare)")
    manifest = load_manifest(cfg.data.train, store)
    if manifest["num_records"] == 0:
        raise ValueError(f"{cfg.data.train}: the catalogue has no records")
    q = manifest.get("quarantine", {})
    bad, total = int(q.get("count", 0)), int(manifest["num_records"]) + int(q.get("count", 0))
    if total and bad / total > cfg.data.quarantine_max_fraction:
        raise DataQualityError(
            f"{cfg.data.train}: prepare quarantined {bad} of {total} records ({bad / total:.1%}), above "
            f"data.quarantine_max_fraction={cfg.data.quarantine_max_fraction}: {q.get('by_reason')}. "
            f"See {storage.join(cfg.data.train, 'quarantine')} or raise the threshold.")
    if not store.exists(storage.join(tokenizer_uri(cfg), "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer at {tokenizer_uri(cfg)} (set data.tokenizer or prepare --build-tokenizer)")
    if cfg.data.val:
        load_manifest(cfg.data.val, store)
    return manifest


def build_trainer(cfg: GammarayConfig, store: Store, callbacks: list | None = None, fault: str | None = None,
                  identity: dict | None = None, **run_config: Any):
    """The TorchTrainer that runs `cfg`'s training loop; starts nothing (no ray.init, no progress
    queue). Shared by `pretrain` and the Ray Tune trials of tuning/: `callbacks` go to the RunConfig
    (e.g. Tune's report callback), `run_config` overrides RunConfig fields (name, storage_path, ...),
    `identity` is the run's (workers/training/resume.py; default: from `cfg`).

    The storage filesystem handed to Ray is `storage.RetryingS3` for s3://: it carries the names of
    the key variables, never the keys (Ray and Tune pickle it), and retries Ray's own checkpoint
    uploads and storage checks for storage.retry_time_s. The workers get `store` (it pickles as its
    settings) in their loop config."""
    loop_config = {"config": cfg.model_dump(mode="json"), "store": store}
    if fault:
        loop_config["fault"] = fault
    if identity:
        loop_config["identity"] = identity
    fs, path = store.resolve(cfg.run.storage)
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


def pretrain(cfg: GammarayConfig, progress: bool = True, callbacks: list | None = None) -> PretrainResult:
    """Train on Ray Train (or in this process with train.workers=0); returns final metrics.

    Re-running with the same run.name and run.storage resumes from the run's latest checkpoint;
    FailureConfig(train.max_failures) restarts the workers from it after a failure."""
    store = Store.of(cfg.storage)  # the run's storage, bound once: everything below is handed this
    if cfg.data.features.train:  # locked towers, cached features: only the heads train, in this process
        return pretrain_heads(cfg, store, progress=progress)
    t0 = time.perf_counter()
    manifest = preflight(cfg, store)
    identity = run_identity(cfg, manifest)  # as written: before "auto" keys are resolved for this cluster
    partial = set_aside_partial_snapshot(store, run_dir(cfg))  # Ray's own record, cut short by a full disk
    if partial and not cfg.train.resume_from:
        cfg = apply_overrides(cfg, {"train.resume_from": partial})
    check_run(cfg, store, run_dir(cfg), identity)  # a resume that does not match is refused before Ray starts
    ensure_ray(cfg)
    cfg = resolve_for_cluster(cfg)  # train.workers / data.batch_size / preprocess_concurrency = "auto"
    fault = fault_from_env()
    if cfg.train.workers == 0:
        loop_config = {"config": cfg.model_dump(mode="json"), "store": store, "in_ray": False, "fault": fault,
                       "identity": identity}
        train_loop_per_worker(loop_config)
        return PretrainResult(metrics={}, checkpoint_uri=None, run_dir=run_dir(cfg), wall_s=time.perf_counter() - t0)

    printer = ProgressPrinter(enabled=progress)
    cb = MetricsCallback(run_dir(cfg), store, printer.queue)
    tracked = start_run(cfg, "pretrain")  # tracking.kind: MLflow / W&B run fed by the controller (workers/tracking.py)
    tracking = [TrackingCallback(tracked)] if tracked else []
    trainer = build_trainer(cfg, store, [cb, *tracking, *(callbacks or [])], fault, identity)
    with printer:
        try:
            result = trainer.fit()
        except Exception as err:  # noqa: BLE001 - Ray Train's TrainingFailedError and what it wraps
            known = reason_of(err, run_dir(cfg))
            if known is None:
                raise
            raise known from None  # one message that says what happened and what to do, not Ray's tracebacks
    if result.error:
        raise reason_of(result.error, run_dir(cfg)) or result.error
    ckpt_uri = None
    if result.checkpoint is not None:
        ckpt_uri = ("s3://" if storage.is_remote(cfg.run.storage) else "") + result.checkpoint.path
    return PretrainResult(metrics=dict(result.metrics or {}), checkpoint_uri=ckpt_uri, run_dir=run_dir(cfg),
                          wall_s=time.perf_counter() - t0, progress=dict(printer.last), progress_updates=printer.updates)


class StorageFull(RunError):
    """The run storage (or a local disk the run writes to) has no space left."""


def storage_full(e: BaseException, where: str) -> StorageFull | None:
    """A StorageFull naming the path that could not be written, for an ENOSPC error (as an OSError,
    or in the text of a wrapper that kept only the message)."""
    text = str(e)
    if not ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "[Errno 28]" in text
            or "No space left on device" in text):
        return None
    path = getattr(e, "filename", None)
    if not path:
        quoted = re.search(r"No space left on device: ['\"]([^'\"]+)['\"]", text)  # OSError's own form
        path = quoted.group(1) if quoted else where
    return StorageFull(
        f"storage full at {path}: no space left on the device. The run stopped; checkpoints whose save did not "
        "finish are skipped on resume. Free space and run the same command again: it resumes from the last complete "
        "checkpoint.")


def reason_of(err: BaseException, where: str = "the run storage") -> RunError | None:
    """The gammaray error behind a failed fit (storage down for longer than storage.retry_time_s,
    storage full, a refused checkpoint or resume, too many bad records), found through Ray's
    wrappers (the worker group's failures, the controller's, RayTaskError causes); None for
    anything else. `where` names the storage in a storage-full message that carries no path."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        full = storage_full(e, where)
        if full is not None:
            return full
        cause = getattr(e, "cause", None)  # RayTaskError: the original exception
        if isinstance(cause, RunError):
            return cause
        if isinstance(e, RunError) and not hasattr(e, "cause"):
            return e
        todo += [cause, getattr(e, "controller_failure", None), *getattr(e, "worker_failures", {}).values(),
                 e.__cause__, e.__context__]
    return None
