"""Experiment tracking (workers/tracking.py) against the real clients: W&B in offline mode with its
run files read back, and Ray Tune's MLflowLoggerCallback writing one child run per trial under a
parent run through a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied by the
server). (A pretrain run tracked in a sqlite MLflow store is checked in tests/test_foundation_e2e.py,
an eval run with its artifacts in tests/test_eval_command.py.)"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from gammaray.config import GammarayConfig, apply_overrides

pytestmark = pytest.mark.ops


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory):
    """`mlflow server` (sqlite backend, one worker, no job runner: that needs the `huey` package of full
    mlflow) started when the module starts, so its start-up overlaps the W&B test; `wait_ready` blocks."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"

    def wait_ready(timeout_s: float = 120.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): {(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server not ready after {timeout_s} s: {(root / 'server.log').read_text()[-2000:]}")

    yield {"wait_ready": wait_ready, "root": root}
    # the server and its uvicorn worker (its own session); SIGKILL: everything was read back already, and
    # a graceful stop waits for the clients' keep-alive connections (10+ s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


@pytest.mark.timeout(180)
def test_wandb_offline_run_has_params_step_metrics_and_checkpoint(tmp_path, monkeypatch):
    from ray.train import Checkpoint

    from workers.tracking import TrackingCallback, start_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = apply_overrides(GammarayConfig(), {"tracking.kind": "wandb", "tracking.uri": str(tmp_path / "wb"),
                                             "tracking.experiment": "gr-test", "tracking.tags": {"team": "search"},
                                             "run.name": "wb-run", "loss.gamma.alpha": 2.5})
    run = start_run(cfg, "pretrain")
    cb = TrackingCallback(run)
    # two workers' reports, as the Train controller hands them over
    cb.after_report(None, [{"step": 5, "contrastive_loss": 2.0, "records_per_s": 10.0},
                           {"step": 5, "contrastive_loss": 1.0, "records_per_s": 12.0}], None)
    cb.after_report(None, [{"step": 10, "contrastive_loss": 0.75, "final": 1}, {"step": 10, "contrastive_loss": 0.75,
                                                                               "final": 1}],
                    Checkpoint(str(tmp_path / "ckpt-000010")))
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    log = b""
    for _ in range(60):  # the wandb-core service process writes the file: give it its time on a loaded machine
        log = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()
        if b"ckpt-000010" in log:
            break
        time.sleep(0.5)
    for key in (b"contrastive_loss", b"records_per_s", b"checkpoint_uri", b"ckpt-000010"):
        assert key in log, key
    assert b"loss.gamma.alpha" in log and b"team=search" in log  # the config as params, the tags


@pytest.mark.timeout(240)
def test_mlflow_server_tune_trials_are_child_runs_of_one_parent(ray_local, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient
    from ray import tune

    from tuning.search import keep_credentials_out_of_trial_env
    from workers.tracking import start_run, tune_callbacks

    # as run_tune does: without it Ray Tune copies the session's S3 keys into the trials' runtime env,
    # which Ray logs in clear text (tests/test_tune_secrets.py scans this session's logs for them)
    keep_credentials_out_of_trial_env()
    uri = mlflow_server["wait_ready"]()
    cfg = apply_overrides(GammarayConfig(), {"tracking.kind": "mlflow", "tracking.uri": uri,
                                             "tracking.experiment": "gr-tune"})
    parent = start_run(cfg, "tune", name="tune demo")

    def trainable(config):
        for step in range(3):
            tune.report({"score": config["x"] * (step + 1)})

    tuner = tune.Tuner(tune.with_resources(trainable, {"CPU": 0.25}), param_space={"x": tune.grid_search([1, 2])},
                       run_config=tune.RunConfig(name="tracked", storage_path=str(tmp_path / "tune"), verbose=0,
                                                 callbacks=tune_callbacks(cfg, parent)))
    tuner.fit()
    parent.log_metrics({"best_score": 6.0})
    (tmp_path / "best.json").write_text('{"x": 2}')
    parent.log_artifact(str(tmp_path / "best.json"))  # uploaded to the server, which stores it
    parent.finish()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("gr-tune")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert len(children) == 2
    assert sorted(float(c.data.params["x"]) for c in children) == [1.0, 2.0]
    for c in children:
        hist = client.get_metric_history(c.info.run_id, "score")
        assert [m.value for m in sorted(hist, key=lambda m: m.step)] == [float(c.data.params["x"]) * s for s in (1, 2, 3)]
    p = client.get_run(parent.run_id)
    assert p.info.status == "FINISHED" and p.data.metrics["best_score"] == 6.0
    assert p.data.tags["gammaray.job"] == "tune" and p.data.params["tracking.experiment"] == "gr-tune"
    assert [a.path for a in client.list_artifacts(parent.run_id)] == ["best.json"]
    stored = glob.glob(str(mlflow_server["root"] / "artifacts" / "**" / "best.json"), recursive=True)
    assert len(stored) == 1 and open(stored[0]).read() == '{"x": 2}'
    # the server wrote its own backend store: the same runs read straight from its sqlite file
    direct = MlflowClient(f"sqlite:///{mlflow_server['root']}/mlflow.db")
    assert direct.get_run(parent.run_id).data.metrics["best_score"] == 6.0
    assert len(direct.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")) == 2
