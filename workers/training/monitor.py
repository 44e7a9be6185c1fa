"""Metrics from every worker: a Ray Train callback (runs on the controller) that aggregates the
workers' reports, appends them to `<run>/metrics.jsonl`, writes TensorBoard scalars and feeds the
driver's progress bar through a Ray queue."""

from __future__ import annotations

import json
import os
import queue as pyqueue
import threading
import time
from typing import Any

from pipelines import storage
from pipelines.storage import Store

from ray.train.v2.api.callback import UserCallback

SUM_KEYS = {"records_per_s", "records_trained", "records_quarantined"}
MAX_KEYS = {"rss_mb", "gpu_mem_mb", "step_time_s", "data_wait_fraction", "data_wait_s"}
FIRST_KEYS = {"step", "epoch", "final", "total_steps", "samples_seen_total", "records_quarantined_stream",
              "audit_repeated_total", "audit_missed_total", "lr", "temperature", "logit_scale"}
PER_WORKER_KEYS = ("data_wait_fraction", "step_time_s", "records_per_s")


def aggregate(per_worker: list[dict[str, Any]]) -> dict[str, Any]:
    """One line from every worker's report: throughput and counts summed, times and memory as the
    slowest/largest worker, loss terms averaged, schedule values from rank 0; the node of each worker
    and a few per-worker figures kept as lists; other values (lists, dicts) from rank 0. The final
    report's counts and loss terms are already the run's (the loop reduced them over ranks): rank 0's."""
    keys = set().union(*(m.keys() for m in per_worker)) if per_worker else set()
    out: dict[str, Any] = {"workers": len(per_worker)}
    final = bool(per_worker and per_worker[0].get("final"))
    for k in sorted(keys):
        vals = [m[k] for m in per_worker if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)]
        if not vals:
            if k == "node_id":
                out["node_ids"] = [m.get("node_id") for m in per_worker]
            elif k in per_worker[0]:
                out[k] = per_worker[0][k]
            continue
        if final and k not in MAX_KEYS:
            out[k] = vals[0]
        elif k in SUM_KEYS or k.startswith("quarantined_"):
            out[k] = sum(vals)
        elif k in MAX_KEYS:
            out[k] = max(vals)
        elif k in FIRST_KEYS:
            out[k] = vals[0]
        else:
            out[k] = sum(vals) / len(vals)
    for k in PER_WORKER_KEYS:
        if per_worker and k in per_worker[0] and not (final and k in SUM_KEYS):  # (final: run-wide values)
            out[f"{k}_per_worker"] = [m.get(k) for m in per_worker]
    return out


class MetricsCallback(UserCallback):
    def __init__(self, run_uri: str, store: Store, progress_queue=None, flush_every_s: float = 20.0):
        self.run_uri = run_uri
        self.store = store
        self.queue = progress_queue
        self.flush_every_s = flush_every_s
        self._lines: list[str] | None = None
        self._last_flush = 0.0
        self._tb = None

    def _load_existing(self) -> list[str]:
        uri = storage.join(self.run_uri, "metrics.jsonl")
        try:
            if self.store.exists(uri):
                return self.store.read_bytes(uri).decode().splitlines()
        except Exception:  # noqa: BLE001 - metrics must never kill training
            pass
        return []

    def _tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            if storage.is_remote(self.run_uri):
                logdir = os.path.join(os.path.expanduser("~/.cache/gammaray/tensorboard"),
                                      self.run_uri.replace("s3://", "").replace("/", "_"))
            else:
                logdir = os.path.join(self.run_uri, "tensorboard")
            self._tb = SummaryWriter(logdir)
        return self._tb

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        agg = aggregate(metrics)
        agg["time"] = time.time()
        if checkpoint is not None:
            agg["checkpoint"] = checkpoint.path
        if self._lines is None:
            self._lines = self._load_existing()
        self._lines.append(json.dumps(agg, default=float))
        try:
            tb = self._tensorboard()
            for k, v in agg.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "step"):
                    tb.add_scalar(k, v, global_step=int(agg.get("step", 0)))
            tb.flush()
        except Exception:  # noqa: BLE001
            pass
        now = time.monotonic()
        if checkpoint is not None or agg.get("final") or now - self._last_flush > self.flush_every_s:
            self.flush()
            self._last_flush = now
        if self.queue is not None:
            try:
                self.queue.put_nowait(agg)
            except Exception:  # noqa: BLE001 - a full or gone queue only costs a progress update
                pass

    def flush(self) -> None:
        if self._lines is None:
            return
        try:
            self.store.write_bytes(storage.join(self.run_uri, "metrics.jsonl"), ("\n".join(self._lines) + "\n").encode())
        except Exception:  # noqa: BLE001
            pass

    def after_exception(self, run_context, worker_exceptions) -> None:
        self.flush()


class ProgressPrinter:
    """Driver-side progress bar fed by the callback through a Ray queue."""

    def __init__(self, enabled: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.desc = desc
        self.queue = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: dict[str, Any] = {}
        self.updates = 0
        if enabled:
            from ray.util.queue import Queue

            self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})

    def __enter__(self) -> "ProgressPrinter":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self.queue is not None:
            try:
                self.queue.shutdown()
            except Exception:  # noqa: BLE001
                pass

    def _run(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(desc=self.desc, unit="step", dynamic_ncols=True)
        try:
            while True:
                try:
                    m = self.queue.get(timeout=0.5)
                except (pyqueue.Empty, Exception):  # noqa: BLE001
                    if self._stop.is_set():  # stop only once the queue is drained: the final line counts
                        break
                    continue
                m = {**self.last, **m}  # a report without throughput keeps the last figures
                self.last = m
                self.updates += 1
                if "total_steps" in m:
                    bar.total = int(m["total_steps"])  # re-planned when a resume changes the worker count
                bar.n = int(m.get("step", bar.n))
                post = {"epoch": m.get("epoch"), "loss": _fmt(m.get("loss")), "rec/s": _fmt(m.get("records_per_s"), 0),
                        "wait": _fmt(m.get("data_wait_fraction"), 2)}
                if "val_r_at_1" in m:
                    post["val_R@1"] = _fmt(m["val_r_at_1"], 3)
                bar.set_postfix(post, refresh=False)
                bar.refresh()
        finally:
            bar.close()


def _fmt(v, digits: int = 4):
    if v is None:
        return "-"
    return f"{v:.{digits}f}"
