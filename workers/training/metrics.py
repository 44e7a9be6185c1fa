"""The figures the loop reports: per-report step metrics of one rank, validation metrics under their
`val_` names, and the run's final figures summed or averaged over all ranks."""

from __future__ import annotations

import time

import psutil
import torch
import torch.distributed as dist

from gammaray.config import GammarayConfig
from gammaray.schema import ALL_REASONS
from workers.cluster import node_id
from workers.training.quarantine import quarantine_by_reason
from workers.training.state import TrainState


def new_window() -> dict:
    return {"t0": time.perf_counter(), "records": 0, "wait": 0.0, "steps": 0, "micro": 0}


def val_r_at_1(val: dict) -> float:
    if not val:
        return -1.0
    return 0.5 * (val["r_at_1_i2t"] + val["r_at_1_t2i"])


def prefixed(val: dict, cfg: GammarayConfig | None = None) -> dict:
    out = {f"val_{k}": v for k, v in val.items()}
    if val or (cfg is not None and cfg.train.eval_every):
        out["val_r_at_1"] = val_r_at_1(val)  # checkpoints are ranked by it: never missing
    return out


def step_metrics(state: TrainState, last: dict, window: dict, scheduler, epoch: int) -> dict:
    """This worker's figures since the previous report (the callback aggregates all workers)."""
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


def run_record(state: TrainState, loss_state_bytes: int, manifest: dict) -> dict:
    """The final report's record of the run: resumes, loss-state size, what prepare quarantined,
    and the sample audit (train.audit_samples)."""
    out = {"final": 1, "loss_state_bytes_per_worker": loss_state_bytes,
           "resumed_from_steps": [r["step"] for r in state.resumes],
           "resume_optimizer": [r["optimizer"] for r in state.resumes]}
    q = manifest.get("quarantine", {})
    out["records_quarantined_prepare"] = int(q.get("count", 0))
    for r, n in q.get("by_reason", {}).items():
        out[f"quarantine_prepare_{r}"] = int(n)
    if state.audit:
        out.update({"audit_epochs": state.audit, "audit_repeated_total": sum(a["repeated"] for a in state.audit),
                    "audit_missed_total": sum(a["missed"] for a in state.audit)})
    return out
