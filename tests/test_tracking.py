"""Experiment tracking (workers/tracking.py) against the real clients: W&B in offline mode with its
run files read back, and Ray Tune's MLflowLoggerCallback writing one child run per trial under a
parent run into a real sqlite-backed MLflow store. (A pretrain run tracked in MLflow is checked in
tests/test_foundation_e2e.py, an eval run with its artifacts in tests/test_eval_command.py.)"""

from __future__ import annotations

import glob
import os
import time

import pytest

from gammaray.config import GammarayConfig, apply_overrides

pytestmark = pytest.mark.ops


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
def test_mlflow_tune_trials_are_child_runs_of_one_parent(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray import tune

    from workers.tracking import start_run, tune_callbacks

    uri = f"sqlite:///{tmp_path}/mlflow.db"
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
