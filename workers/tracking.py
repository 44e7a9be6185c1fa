"""Experiment tracking in MLflow or Weights & Biases (`tracking.*` of the config tree).

    pretrain  one run per training run: the config as params (dotted paths), every report of the
              workers as metrics at its step (aggregated as in metrics.jsonl), the latest checkpoint's
              URI as the tag `checkpoint_uri`; closed FINISHED at the final report, FAILED on an error.
              A Ray Train callback (TrackingCallback) does it on the Train controller, so metrics arrive
              while the run trains.
    tune      a parent run for the experiment and one child run per trial, through Ray's own
              MLflowLoggerCallback (tag mlflow.parentRunId) / WandbLoggerCallback (group = experiment).
    eval      one run: the metrics as metrics, the report JSON and PNG as artifacts.

MLflow is used through MlflowClient with an explicit run id, so the driver and the Train controller
(another process) write the same run; W&B through wandb.init in the process that logs (offline with
WANDB_MODE=offline). Both clients read their credentials from their own environment variables.
"""

from __future__ import annotations

import os
from typing import Any

from gammaray.config import GammarayConfig, TrackingConfig

from ray.train.v2.api.callback import UserCallback


def flat_params(cfg: GammarayConfig) -> dict[str, str]:
    """The config tree as dotted keys -> short strings (MLflow caps a param value at 6000 chars)."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v and prefix.count(".") < 3:
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            out[prefix] = str(v)[:500]
    walk("", cfg.model_dump(mode="json"))
    return out


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time",)}


def _mlflow_client(t: TrackingConfig):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise ImportError("tracking.kind=mlflow needs MLflow: pip install 'gammaray[mlflow]'") from err
    return MlflowClient(tracking_uri=t.uri) if t.uri else MlflowClient()


def _experiment_id(client, name: str, uri: str | None = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri and uri.startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns of the cwd
        location = "file://" + os.path.join(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])), "mlartifacts")
    return client.create_experiment(name, artifact_location=location)


def _wandb():
    try:
        import wandb
    except ImportError as err:
        raise ImportError("tracking.kind=wandb needs wandb: pip install 'gammaray[wandb]'") from err
    return wandb


class TrackedRun:
    """One run in the configured tracker, usable from any process that has this object (it pickles:
    MLflow by run id; W&B opens its run in the first process that logs)."""

    def __init__(self, t: TrackingConfig, name: str, job: str, params: dict[str, str], parent_id: str | None = None):
        self.t, self.name, self.job, self.params = t, name, job, params
        self.run_id: str | None = None
        self._wb = None
        tags = {"gammaray.job": job, **t.tags}
        if t.kind == "mlflow":
            client = _mlflow_client(t)
            if parent_id:
                tags["mlflow.parentRunId"] = parent_id
            run = client.create_run(_experiment_id(client, t.experiment, t.uri), run_name=name, tags=tags)
            self.run_id = run.info.run_id
            items = list(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        self.tags = tags

    def __getstate__(self):
        return {**self.__dict__, "_wb": None}

    def _wandb_run(self):
        if self._wb is None:
            wandb = _wandb()
            if self.t.uri:
                os.makedirs(self.t.uri, exist_ok=True)
            self._wb = wandb.init(project=self.t.experiment, name=self.name, job_type=self.job, config=self.params,
                                  tags=[f"{k}={v}" for k, v in self.tags.items()], dir=self.t.uri, reinit="create_new")
        return self._wb

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        values = numeric(metrics)
        if not values:
            return
        if self.t.kind == "mlflow":
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            _mlflow_client(self.t).log_batch(self.run_id, metrics=[Metric(k, v, now, int(step or 0))
                                                                   for k, v in values.items()])
        elif self.t.kind == "wandb":
            self._wandb_run().log(values, step=step)

    def set_tag(self, key: str, value: str) -> None:
        if self.t.kind == "mlflow":
            _mlflow_client(self.t).set_tag(self.run_id, key, value)
        elif self.t.kind == "wandb":
            self._wandb_run().summary[key] = value

    def log_artifact(self, path: str) -> None:
        if self.t.kind == "mlflow":
            _mlflow_client(self.t).log_artifact(self.run_id, path)
        elif self.t.kind == "wandb":
            self._wandb_run().save(path, base_path=os.path.dirname(path) or ".", policy="now")

    def finish(self, ok: bool = True) -> None:
        if self.t.kind == "mlflow":
            _mlflow_client(self.t).set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
        elif self.t.kind == "wandb":
            self._wandb_run().finish(exit_code=0 if ok else 1)
            self._wb = None


def start_run(cfg: GammarayConfig, job: str, name: str | None = None, parent_id: str | None = None) -> TrackedRun | None:
    """A new run for `job` (pretrain, tune, eval), or None with tracking.kind=none."""
    if cfg.tracking.kind == "none":
        return None
    return TrackedRun(cfg.tracking, name or cfg.run.name, job, flat_params(cfg), parent_id)


class TrackingCallback(UserCallback):
    """[Ray Train, on the controller] every report of the workers into the tracked run."""

    def __init__(self, run: TrackedRun):
        self.run = run

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        from workers.training.monitor import aggregate

        agg = aggregate(metrics)
        try:
            self.run.log_metrics(agg, step=int(agg.get("step", 0)))
            if checkpoint is not None:
                self.run.set_tag("checkpoint_uri", checkpoint.path)
            if agg.get("final"):
                self.run.finish(ok=True)
        except Exception as err:  # noqa: BLE001 - a tracking server that is down must not stop training
            print(f"gammaray: tracking ({self.run.t.kind}) failed: {type(err).__name__}: {err}")

    def after_exception(self, run_context, worker_exceptions) -> None:
        try:
            self.run.finish(ok=False)
        except Exception:  # noqa: BLE001
            pass


def tune_callbacks(cfg: GammarayConfig, parent: TrackedRun | None) -> list:
    """Ray Tune's own logger callbacks: one child run per trial under `parent`."""
    t = cfg.tracking
    if parent is None:
        return []
    if t.kind == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return [MLflowLoggerCallback(tracking_uri=t.uri, experiment_name=t.experiment, save_artifact=False,
                                     tags={"mlflow.parentRunId": parent.run_id, "gammaray.job": "tune-trial", **t.tags})]
    from ray.air.integrations.wandb import WandbLoggerCallback

    return [WandbLoggerCallback(project=t.experiment, group=parent.name, dir=t.uri,
                                tags=[f"{k}={v}" for k, v in t.tags.items()])]
