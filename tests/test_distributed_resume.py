"""Training that survives failure, on the real stack (Ray Train V2 + DeepSpeed ZeRO-1 over gloo,
SeaweedFS S3, Ray Data): the S3 server down for 20 s and then a worker SIGKILLed in one run, a driver
killed mid-epoch and re-run, a 2-worker checkpoint resumed on 3 workers, 2 workers on 2 Ray nodes. Every run is compared with one
uninterrupted reference run of the same config and seed: weights, fp32 master weights, Adam moments,
DeepSpeed's per-rank optimizer files and the gamma loss state (mode=sample, so its random generator
must come back too) must be bit-identical (run.deterministic=true).

Sizes: 384 training records, 2 workers x micro-batch 16 x 2 accumulation steps = 6 optimizer steps
per epoch, 2 epochs = 12 steps; checkpoints at steps 4 and 8 and at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from gammaray.config import GammarayConfig, apply_overrides
from pipelines import storage
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, EPOCHS = 384, 2


def run_overrides(catalogue: dict, run_storage: str, name: str, **extra) -> dict:
    o = tiny_overrides(catalogue, run_storage, name)
    o.update({
        "data.val": None, "data.batch_size": 16, "train.workers": 2, "train.epochs": EPOCHS,
        "train.gradient_accumulation_steps": 2, "train.checkpoint_every": 4, "train.log_every": 2,
        "train.audit_samples": True, "run.deterministic": True, "loss.gamma.mode": "sample",
        "data.preprocess_concurrency": 1,
    })
    o.update(extra)
    return o


def make_cfg(catalogue, run_storage, name, **extra) -> GammarayConfig:
    return apply_overrides(GammarayConfig(), run_overrides(catalogue, run_storage, name, **extra))


# --------------------------------------------------------------------------------------------
# reading checkpoints back


def _load(uri: str):
    return torch.load(storage.buffer(storage.read_bytes(uri)), map_location="cpu", weights_only=False)


def checkpoints(run_uri: str) -> dict[int, str]:
    """step -> checkpoint folder, for the checkpoints of a run that are kept."""
    out = {}
    for f in storage.list_files(run_uri, suffix="rank-00000/train_state.json"):
        out[int(json.loads(storage.read_bytes(f))["step"])] = f.rsplit("/rank-00000/", 1)[0]
    return out


def checkpoint_state(folder: str) -> dict:
    """Everything that defines a run at a checkpoint, as tensors and plain values."""
    files = storage.list_files(folder)
    state: dict = {"optim": {}, "loss": {}, "train": {}}
    for f in files:
        name = f.rsplit("/", 1)[-1]
        if name == "portable.pt":
            state["portable"] = _load(f)
        elif name == "mp_rank_00_model_states.pt":
            state["module"] = _load(f)["module"]
        elif name.endswith("optim_states.pt"):
            state["optim"][name] = _load(f)["optimizer_state_dict"]
        elif name == "loss_state.pt":
            state["loss"][f.rsplit("/", 2)[-2]] = _load(f)
        elif name == "train_state.json":
            state["train"][f.rsplit("/", 2)[-2]] = json.loads(storage.read_bytes(f))
    return state


def assert_same(a, b, path="", exact=True) -> int:
    """Recursive equality of nested dicts/lists of tensors and numbers; returns tensors compared."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), path
        if exact:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=path)
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        return sum(assert_same(a[k], b[k], f"{path}/{k}", exact) for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return sum(assert_same(x, y, f"{path}[{i}]", exact) for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float) and a != a:  # nan
        assert b != b, path
        return 0
    if isinstance(a, (int, float, str, bool)) or a is None:
        assert a == b, f"{path}: {a!r} != {b!r}"
    return 0


def assert_same_training_state(a: dict, b: dict) -> int:
    """Weights, fp32 masters, Adam moments and step, DeepSpeed's per-rank optimizer files, loss state."""
    n = assert_same(a["module"], b["module"], "module")
    n += assert_same({k: a["portable"][k] for k in ("params", "exp_avg", "exp_avg_sq", "optimizer_step", "buffers")},
                     {k: b["portable"][k] for k in ("params", "exp_avg", "exp_avg_sq", "optimizer_step", "buffers")},
                     "portable")
    ds_keys = ("base_optimizer_state", "single_partition_of_fp32_groups")
    n += assert_same({f: {k: v[k] for k in ds_keys} for f, v in a["optim"].items()},
                     {f: {k: v[k] for k in ds_keys} for f, v in b["optim"].items()}, "deepspeed-optim")
    n += assert_same(a["loss"], b["loss"], "loss-state")
    for r in a["train"]:
        for k in ("epoch", "step", "remaining", "records_trained", "audit"):
            assert a["train"][r][k] == b["train"][r][k], (r, k)
    return n


def metrics_lines(run_uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(storage.join(run_uri, "metrics.jsonl")).decode().splitlines()]


# --------------------------------------------------------------------------------------------
# the reference run


@pytest.fixture(scope="module")
def reference(ray_local, s3, small_catalogue, tmp_path_factory):
    """One uninterrupted 2-worker run (with held-out evaluation and the progress bar on)."""
    from workers.training.trainer import pretrain

    cfg = make_cfg(small_catalogue, s3.url("dist-runs"), "reference", **{"data.val": small_catalogue["val"]})
    res = pretrain(cfg, progress=True)
    ckpts = checkpoints(res.run_dir)
    return {"cfg": cfg, "result": res, "final": checkpoint_state(res.checkpoint_uri), "checkpoints": ckpts}


@pytest.mark.timeout(900)
def test_reference_run_counts_steps_metrics_and_progress(reference, small_catalogue):
    res, m = reference["result"], reference["result"].metrics
    # optimizer steps, not micro-batches: 192 records per worker / 16 = 12 micro-batches = 6 steps per epoch
    assert m["step"] == 12 and m["total_steps"] == 12
    assert m["samples_seen_total"] == N_TRAIN * EPOCHS
    assert m["audit_epochs"] == [{"epoch": e, "once": N_TRAIN, "repeated": 0, "missed": 0} for e in range(EPOCHS)]
    assert sorted(reference["checkpoints"]) == [8, 12]  # keep_checkpoints=2 of 4, 8, 12
    lines = metrics_lines(res.run_dir)
    # one line per report: every 2 steps from every worker, aggregated by the callback
    summary = [(ln["step"], ln.get("final"), "checkpoint" in ln, round(ln["time"] % 1000, 1)) for ln in lines]
    assert [ln["step"] for ln in lines if not ln.get("final")] == [2, 4, 6, 8, 10, 12], summary
    assert [ln["step"] for ln in lines if "checkpoint" in ln] == [4, 8, 12]
    for ln in lines:
        assert ln["workers"] == 2 and len(ln["node_ids"]) == 2
        for key in ("contrastive_loss", "loss", "records_per_s", "step_time_s", "data_wait_s", "data_wait_fraction",
                    "rss_mb", "lr", "temperature", "logit_scale", "gamma/log_rate_mean", "micro_batches_per_step"):
            assert key in ln, key
        assert ln["micro_batches_per_step"] == 2
        assert ln["temperature"] == pytest.approx(1 / ln["logit_scale"])
        assert 0 <= ln["data_wait_fraction"] <= 1 and ln["step_time_s"] > 0 and ln["records_per_s"] > 0
    # the learning rate follows warm-up (30 steps > 12: rising)
    lrs = [ln["lr"] for ln in lines if not ln.get("final")]
    assert lrs == sorted(lrs) and lrs[0] < lrs[-1]
    # records_trained sums both workers: 2 steps x 2 micro-batches x 16 x 2 workers per report
    assert [ln["records_trained"] for ln in lines if not ln.get("final")] == [128 * k for k in range(1, 7)]
    final = lines[-1]
    assert final["final"] == 1 and "val_r_at_1" in final and final["val_records"] == 96
    # TensorBoard scalars next to the metrics (local path of the callback for an s3:// run)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = os.path.join(os.path.expanduser("~/.cache/gammaray/tensorboard"),
                          res.run_dir.replace("s3://", "").replace("/", "_"))
    acc = EventAccumulator(tb_dir)
    acc.Reload()
    assert {"loss", "lr", "temperature", "step_time_s", "data_wait_fraction"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")][-7:] == [2, 4, 6, 8, 10, 12, 12]  # the final line too
    # the driver's progress bar got every line, the last one included
    assert res.progress_updates == len(lines) and res.progress.get("final") == 1


OUTAGE_S = 20


@pytest.mark.timeout(900)
def test_storage_outage_and_a_killed_worker_end_in_the_identical_state(reference, ray_local, s3, small_catalogue,
                                                                        tmp_path):
    """Two faults in one run. (1) The S3 server holding the catalogue, the checkpoints and the metrics is
    SIGKILLed right after step 3 and restarted on the same port 20 s later, while the workers stream data
    and upload the step-4 checkpoint (Ray Train's own upload and storage-marker check): every storage
    call retries (storage.retry_time_s), so the outage costs no restart and quarantines nothing.
    (2) Rank 1 SIGKILLs itself at step 5 (after the step-4 checkpoint, inside epoch 0): FailureConfig
    restarts the worker group from step 4. max_failures=1 holds both only if the outage restarted
    nothing, and the run ends bit-identical to the reference."""
    from workers.training.faults import FAULT_ENV
    from workers.training.trainer import pretrain

    paused, killed = tmp_path / "paused", tmp_path / "killed"
    cfg = make_cfg(small_catalogue, s3.url("dist-runs"), "outage-and-kill",
                   **{"storage.retry_time_s": 120, "train.max_failures": 1})
    outage: dict = {}

    def storage_outage() -> None:
        deadline = time.monotonic() + 600
        while not paused.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        s3.kill()
        t0 = time.monotonic()
        time.sleep(OUTAGE_S)
        s3.restart()
        outage["down_s"] = time.monotonic() - t0

    thread = threading.Thread(target=storage_outage, daemon=True)
    thread.start()
    os.environ[FAULT_ENV] = json.dumps([
        {"target": "pause", "rank": 0, "step": 3, "marker": str(paused), "delay_s": 2},
        {"target": "worker", "rank": 1, "step": 5, "marker": str(killed), "delay_s": 5},
    ])
    try:
        res = pretrain(cfg, progress=False)
    finally:
        del os.environ[FAULT_ENV]
        thread.join(timeout=OUTAGE_S + 60)
        if s3._proc is None:  # never leave the session without its server
            s3.restart()
    assert outage.get("down_s", 0) >= OUTAGE_S, "the outage never happened"
    assert killed.exists(), "the worker fault never fired"
    m = res.metrics
    assert m["resumed_from_steps"] == [4] and m["resume_optimizer"] == ["exact"] and m["step"] == 12
    assert m["samples_seen_total"] == N_TRAIN * EPOCHS and m["records_quarantined_stream"] == 0
    assert m["audit_repeated_total"] == 0
    assert m["audit_epochs"] == [{"epoch": e, "once": N_TRAIN, "repeated": 0, "missed": 0} for e in range(EPOCHS)]
    assert sorted(checkpoints(res.run_dir)) == [8, 12]  # the step-4 checkpoint was written (then rotated out)
    assert {4, 8, 12} <= {ln["step"] for ln in metrics_lines(res.run_dir) if "checkpoint" in ln}
    n = assert_same_training_state(reference["final"], checkpoint_state(res.checkpoint_uri))
    assert n > 50


DRIVER = textwrap.dedent("""
    import json, os, sys, ray
    from gammaray.config import GammarayConfig, apply_overrides
    from workers.training.trainer import pretrain
    address, root, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cluster = None
    if address.startswith("cluster:"):  # a 2-node local cluster started here
        from ray.cluster_utils import Cluster
        port = int(address.split(":")[1])
        from ray._private.utils import get_ray_address_file
        address_file = get_ray_address_file(None)
        previous = open(address_file).read() if os.path.exists(address_file) else None
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "gcs_server_port": port, "include_dashboard": False})
        # Cluster records its head as THE local cluster, which every later bare ray.init() on this
        # machine would join (other test sessions included): undo that at once
        if previous is None:
            os.remove(address_file)
        else:
            open(address_file, "w").write(previous)
        cluster.add_node(num_cpus=2)
        address = cluster.address
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": root, "DS_ACCELERATOR": "cpu"}})
    res = pretrain(apply_overrides(GammarayConfig(), overrides), progress=False)
    print("RESULT " + json.dumps({"checkpoint": res.checkpoint_uri, "metrics": res.metrics}, default=str), flush=True)
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()  # the nodes this process started, and nothing else
    os._exit(0)  # Ray's exit hooks may report objects lost in the shutdown as an error status
""")


def run_driver(address: str, overrides: dict, env_extra: dict | None = None, timeout: int = 600):
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", DRIVER, address, ROOT, json.dumps(overrides)], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.mark.timeout(900)
def test_driver_killed_mid_epoch_rerun_resumes_exactly(reference, ray_local, s3, small_catalogue, tmp_path):
    """A driver process runs the fit on the session's Ray; at step 10 (after the step-8 checkpoint,
    inside epoch 1) it is SIGKILLed. Re-running with the same name resumes from step 8, skips exactly
    the records already trained, and ends bit-identical to the reference."""
    from workers.training.faults import FAULT_ENV
    from workers.training.trainer import pretrain

    marker = tmp_path / "driver-killed"
    over = run_overrides(small_catalogue, s3.url("dist-runs"), "killed-driver")
    fault = json.dumps({"target": "driver", "rank": 0, "step": 10, "marker": str(marker), "delay_s": 5})
    proc = run_driver(ray_local.get_runtime_context().gcs_address, over, {FAULT_ENV: fault})
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert marker.exists()
    run_uri = storage.join(s3.url("dist-runs"), "killed-driver")
    assert max(checkpoints(run_uri)) == 8
    time.sleep(2)  # let Ray reap the orphaned job's workers
    res = pretrain(apply_overrides(GammarayConfig(), over), progress=False)
    m = res.metrics
    assert m["resumed_from_steps"] == [8]
    # every record trained once per epoch over the two driver lifetimes, none skipped, none twice
    assert m["samples_seen_total"] == N_TRAIN * EPOCHS
    assert m["audit_epochs"] == [{"epoch": e, "once": N_TRAIN, "repeated": 0, "missed": 0} for e in range(EPOCHS)]
    assert_same_training_state(reference["final"], checkpoint_state(res.checkpoint_uri))


@pytest.mark.timeout(900)
def test_two_worker_checkpoint_resumes_on_three_workers(reference, ray_local, s3, small_catalogue):
    """The reference's step-8 checkpoint (2 workers, inside epoch 1) is loaded by 3 workers:
    first without training (max_steps=8), which must hand back the same fp32 weights, Adam moments,
    loss state and remaining records; then the 3-worker run continues to the end."""
    from workers.training.trainer import pretrain

    src_folder = reference["checkpoints"][8]
    src = checkpoint_state(src_folder)
    over = run_overrides(small_catalogue, s3.url("dist-runs"), "three-workers", **{
        "train.workers": 3, "train.resume_from": src_folder, "train.max_steps": 8, "train.cpus_per_worker": 0.4})
    res = pretrain(apply_overrides(GammarayConfig(), over), progress=False)
    assert res.metrics["resume_optimizer"] == ["portable"] and res.metrics["step"] == 8
    got = checkpoint_state(res.checkpoint_uri)
    assert_same({k: src["portable"][k] for k in ("params", "exp_avg", "exp_avg_sq", "optimizer_step", "buffers")},
                {k: got["portable"][k] for k in ("params", "exp_avg", "exp_avg_sq", "optimizer_step", "buffers")})
    assert len(got["loss"]) == 3

    def full_loss_state(shards: dict) -> dict[str, torch.Tensor]:
        out = {}
        for direction in ("image_to_text", "text_to_image"):
            full = torch.full((N_TRAIN,), float("nan"))
            for sd in shards.values():
                st = sd["gamma"][direction]
                full[st["rank"] + st["world_size"] * torch.arange(st["log_rate"].numel())] = st["log_rate"]
            out[direction] = full
        return out

    before, after = full_loss_state(src["loss"]), full_loss_state(got["loss"])
    for direction in before:
        assert not torch.isnan(before[direction]).any()  # epoch 0 visited every sample
        assert torch.equal(before[direction].nan_to_num(), after[direction].nan_to_num())

    def remaining_rows(train: dict) -> list[tuple[int, int]]:
        return sorted((u, r) for st in train.values() for u, a, b in st["remaining"] for r in range(a, b))

    assert remaining_rows(src["train"]) == remaining_rows(got["train"]) and len(remaining_rows(got["train"])) > 0
    assert sum(t["records_trained"] for t in got["train"].values()) == sum(t["records_trained"] for t in src["train"].values())

    # continue on 3 workers (same name: resumes its own 3-worker checkpoint) to the end of epoch 1
    over["train.max_steps"] = None
    res2 = pretrain(apply_overrides(GammarayConfig(), over), progress=False)
    m = res2.metrics
    assert m["resumed_from_steps"] == [8, 8] and m["resume_optimizer"] == ["portable", "exact"]
    assert m["samples_seen_total"] == N_TRAIN * EPOCHS
    assert m["audit_epochs"] == [{"epoch": e, "once": N_TRAIN, "repeated": 0, "missed": 0} for e in range(EPOCHS)]
    # 256 records of epoch 1 left over 3 workers: ceil(86 / 16) = 6 micro-batches -> 3 steps
    assert m["step"] == 11 and m["total_steps"] == 11
    end = full_loss_state(checkpoint_state(res2.checkpoint_uri)["loss"])
    # the 128 records of epoch 1 trained before the checkpoint (2 steps x 2 micro-batches x 16 x 2
    # workers) keep exactly the state they were given; the 256 trained after it on 3 workers moved on
    for direction in end:
        assert int((end[direction] == before[direction]).sum()) == 128
        assert int((end[direction] != before[direction]).sum()) == 256


@pytest.mark.timeout(900)
def test_two_workers_on_two_nodes_train_like_one_node(reference, s3, small_catalogue, tmp_path):
    """A local 2-node Ray cluster (ray.cluster_utils.Cluster, in a subprocess: the session already
    has its own Ray): STRICT_SPREAD puts one worker on each node; the result equals the one-node
    reference bit for bit."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    over = run_overrides(small_catalogue, str(tmp_path / "runs"), "two-nodes",
                         **{"train.placement_strategy": "STRICT_SPREAD"})
    proc = run_driver(f"cluster:{port}", over)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    lines = metrics_lines(str(tmp_path / "runs" / "two-nodes"))
    nodes = {tuple(ln["node_ids"]) for ln in lines}
    assert all(len(set(n)) == 2 for n in nodes), nodes  # the two workers on different nodes
    assert out["metrics"]["samples_seen_total"] == N_TRAIN * EPOCHS
    assert_same_training_state(reference["final"], checkpoint_state(out["checkpoint"]))
