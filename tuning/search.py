"""Ray Tune over the config tree: each trial is a TorchTrainer run of the normal training loop.

Train V2 pattern (a Tune trial cannot wrap a TorchTrainer directly): the trainable is a function
that patches the base config with the trial's values, builds the TorchTrainer with
`workers.training.trainer.build_trainer`, and hands the loop's reports to Tune through Ray Tune's
`TuneReportCallback`. ASHA stops weak trials on the validation R@1 the loop reports every
`train.eval_every` steps; Optuna's TPE (or plain random sampling) proposes the values.

Resources: Tune only sees a trial's own small CPU share, not its TorchTrainer's workers nor the Ray
Data tasks that feed them, so the number of trials at once is planned here from the cluster's CPUs
(and GPUs); too many would hold every CPU in training workers while their data tasks wait forever.

Layout in the run storage (local or s3://):
  <run.storage>/<tune.name>/               the Tune experiment (state, trial results) - resumable
  <run.storage>/<tune.name>/gammaray_tune.yaml   the base config the search runs with
  <run.storage>/<tune.name>/asha_rungs.state     ASHA's rungs (Ray Tune does not restore a scheduler)
  <run.storage>/<tune.name>/trial_<id>/          Tune's trial folder (every validation report: result.json)
  <run.storage>/<tune.name>/train/<id>/          the trial's Ray Train run (checkpoints)
  <run.storage>/<tune.name>/results.{txt,csv}, metric_vs_values.png, best_config.yaml
  <run.storage>/<tune.name>-confirm/       two objectives: the front re-run with fresh seeds (tuning/confirm.py)

Over 500 lines: the whole life of an experiment (plan, start or resume, results, outputs) in one place.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from gammaray.config import ConfigError, GammarayConfig, apply_overrides, from_dict, to_yaml
from pipelines import storage
from pipelines.storage import Store

from . import report, space, state_check

_PATH_KEYS = ("data.train", "data.val", "data.tokenizer", "run.storage", "model.image.pretrained",
              "model.text.pretrained", "data.features.train", "data.features.val")


@dataclass
class ResourcePlan:
    max_concurrent: int
    cluster_cpus: float
    cluster_gpus: float
    cpus_held_per_trial: float      # trial process + training workers
    cpus_per_trial_with_data: float
    reason: str


@dataclass
class TuneOutcome:
    experiment_uri: str
    rows: list[report.TrialRow]
    best: report.TrialRow | None
    best_config: GammarayConfig | None
    best_config_path: str | None     # local YAML for `gammaray pretrain --config`
    output_dir: str                  # local folder with the table, CSV, PNG (and the best config)
    table: str
    resumed: bool
    interrupted: bool
    plan: ResourcePlan
    trial_max_steps: int
    wall_s: float
    # multi-objective searches (tune.objectives): tuning/objectives.py
    front: list[report.TrialRow] = field(default_factory=list)
    picked: report.TrialRow | None = None
    baseline: report.TrialRow | None = None
    pick_reason: str | None = None
    pick_warning: str | None = None           # the validation split cannot resolve tune.pick.margin
    confirmation: dict | None = None          # the confirmed means and SEs (tuning/confirm.py as_json)
    picked_config_path: str | None = None     # local YAML for `gammaray pretrain --config`
    baseline_config_path: str | None = None


# --------------------------------------------------------------------------------------------
# configuration and resources


def experiment_name(cfg: GammarayConfig) -> str:
    return cfg.tune.name or f"{cfg.run.name}-tune"


def absolute_paths(cfg: GammarayConfig) -> GammarayConfig:
    """Trials run in their own working directory: make relative local paths absolute."""
    fixes: dict[str, Any] = {}
    for path in _PATH_KEYS:
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part)
        if isinstance(node, str) and node and "://" not in node and not os.path.isabs(node):
            fixes[path] = os.path.abspath(node)
    return apply_overrides(cfg, fixes) if fixes else cfg


def plan_heads_resources(cfg: GammarayConfig, cluster: dict[str, float]) -> ResourcePlan:
    """Heads trials on cached features hold only their own process (tune.trial_cpus) and need no
    Ray Data: as many at once as the CPUs hold (one torch thread each)."""
    t = cfg.tune
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if t.trial_cpus > cpus + 1e-9:
        raise ConfigError(f"tune.trial_cpus={t.trial_cpus:g}: the cluster has {cpus:g} CPUs")
    fit = max(1, int(math.floor(cpus / t.trial_cpus + 1e-9)))
    n = min(t.max_concurrent or fit, fit, t.samples)
    return ResourcePlan(max_concurrent=n, cluster_cpus=cpus, cluster_gpus=gpus, cpus_held_per_trial=t.trial_cpus,
                        cpus_per_trial_with_data=t.trial_cpus,
                        reason="tune.max_concurrent" if t.max_concurrent else f"cpus<={fit} (heads trials)")


def plan_resources(cfg: GammarayConfig, cluster: dict[str, float]) -> ResourcePlan:
    """How many trials run at once so that trials x workers fit and Ray Data can always run.

    One trial holds tune.trial_cpus (its process) + train.workers x train.cpus_per_worker (the
    training workers) for its whole life; each worker's data pipeline needs
    data.preprocess_num_cpus free to make progress. Auto: as many trials as fit with room for one
    data task per worker each. Never more than leaves one data task's CPUs free (the deadlock
    condition of docs/design.md section 9)."""
    t, tr = cfg.tune, cfg.train
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if t.trial_kind == "in_process":
        return _plan_in_process(cfg, cpus, gpus)
    if tr.workers < 1:
        raise ConfigError("train.workers: Ray Tune trials run a TorchTrainer; use at least 1 worker")
    held = t.trial_cpus + tr.workers * tr.cpus_per_worker
    data = cfg.data.preprocess_num_cpus
    footprint = held + tr.workers * data
    if held + data > cpus + 1e-9:
        raise ConfigError(
            f"tune: one trial holds {held:g} CPUs (tune.trial_cpus={t.trial_cpus:g} + train.workers={tr.workers} x "
            f"train.cpus_per_worker={tr.cpus_per_worker:g}) and its data tasks need data.preprocess_num_cpus="
            f"{data:g} more, but the cluster has {cpus:g} CPUs: lower these or add CPUs (ray.num_cpus)")
    safe = int(math.floor((cpus - data) / held + 1e-9))
    limits = {"cpus": safe}
    if tr.use_gpu:
        if gpus < tr.workers:
            raise ConfigError(f"train.use_gpu: a trial needs {tr.workers} GPUs, the cluster has {gpus:g}")
        limits["gpus"] = int(gpus // tr.workers)
    if t.max_concurrent is not None:
        if t.max_concurrent > safe:
            raise ConfigError(
                f"tune.max_concurrent={t.max_concurrent}: {t.max_concurrent} trials hold "
                f"{t.max_concurrent * held:g} of {cpus:g} CPUs and leave less than data.preprocess_num_cpus={data:g} "
                f"for Ray Data: the run would hang. At most {safe} here")
        n = min(t.max_concurrent, limits.get("gpus", t.max_concurrent))
        reason = "tune.max_concurrent"
    else:
        limits["auto"] = max(1, int(math.floor(cpus / footprint + 1e-9)))
        n = max(1, min(limits.values()))
        reason = ", ".join(f"{k}<={v}" for k, v in limits.items())
    n = min(n, t.samples)
    return ResourcePlan(max_concurrent=n, cluster_cpus=cpus, cluster_gpus=gpus, cpus_held_per_trial=held,
                        cpus_per_trial_with_data=footprint, reason=reason)


def _plan_in_process(cfg: GammarayConfig, cpus: float, gpus: float) -> ResourcePlan:
    """An in-process trial holds tune.trial_cpus (and one GPU with train.use_gpu) and needs nothing else."""
    t = cfg.tune
    if t.trial_cpus > cpus + 1e-9:
        raise ConfigError(f"tune.trial_cpus={t.trial_cpus:g}: an in-process trial needs more CPUs than the cluster has "
                          f"({cpus:g})")
    limits = {"cpus": int(math.floor(cpus / t.trial_cpus + 1e-9))}
    if cfg.train.use_gpu:
        if gpus < 1:
            raise ConfigError("train.use_gpu: an in-process trial needs a GPU, the cluster has none")
        limits["gpus"] = int(gpus)
    if t.max_concurrent is not None:
        if t.max_concurrent > min(limits.values()):
            raise ConfigError(f"tune.max_concurrent={t.max_concurrent}: at most {min(limits.values())} in-process trials "
                              f"of tune.trial_cpus={t.trial_cpus:g} fit here")
        n, reason = t.max_concurrent, "tune.max_concurrent"
    else:
        n, reason = min(limits.values()), ", ".join(f"{k}<={v}" for k, v in limits.items())
    return ResourcePlan(max_concurrent=max(1, min(n, t.samples)), cluster_cpus=cpus, cluster_gpus=gpus,
                        cpus_held_per_trial=t.trial_cpus, cpus_per_trial_with_data=t.trial_cpus, reason=reason)


def trial_budget(cfg: GammarayConfig, num_records: int) -> int:
    from workers.training.state import estimate_total_steps

    trial = space.trial_config(cfg, {})
    if cfg.tune.trial_kind == "in_process":
        from workers.training.inprocess import planned_steps

        planned = planned_steps(trial, num_records)
    else:
        planned = estimate_total_steps(trial, num_records, trial.train.workers)
    return min(planned, cfg.tune.asha.max_steps) if cfg.tune.asha.max_steps else planned


# --------------------------------------------------------------------------------------------
# the trial


def _forwarding_callback(metric: str, eval_every: int, objectives: list[str] | None = None):
    """Tune's report callback, given only the reports that carry a fresh validation metric."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from .objectives import with_every_objective

    class FreshMetricReport(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self.metric, self.eval_every = metric, eval_every

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            fresh = m.get("final") or int(m.get("step", 0)) % self.eval_every == 0
            if self.metric not in m or not fresh:
                return  # Tune and ASHA need the metric in every result; stale values would mislead ASHA
            m = {**with_every_objective(m, objectives or []), "train_workers": len(metrics)}
            super().after_report(run_context, [m, *metrics[1:]], checkpoint)

    return FreshMetricReport()


def run_trial(params: dict, base: dict, experiment_uri: str, store: Store) -> None:
    """The Tune trainable: one TorchTrainer run of the training loop with the trial's values."""
    import ray.tune

    from workers.training.trainer import build_trainer

    cfg0 = from_dict(base)
    values = space.effective(params, cfg0.tune.space)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = space.trial_config(cfg0, values)
    # the trial's Train run lives in the experiment; a restarted trial resumes it from its checkpoint
    cfg = apply_overrides(cfg, {"run.storage": storage.join(experiment_uri, "train"), "run.name": trial_id})
    # (no MetricsCallback: the trial's reports are in its Tune result files, and TensorBoard's
    # import in every trial's controller costs seconds of CPU)
    trainer = build_trainer(cfg, store, callbacks=[_forwarding_callback(cfg0.tune.metric, cfg.train.eval_every,
                                                                 list(cfg0.tune.objectives))])
    trainer.fit()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trainable(cfg: GammarayConfig, store: Store, experiment_uri: str):
    """The trial function; every trial gets the experiment's `store` (it pickles as its settings)."""
    from ray import tune

    if cfg.data.features.train:
        from .heads_trial import run_heads_trial

        fn = tune.with_parameters(run_heads_trial, base=cfg.model_dump(mode="json"), store=store)
    elif cfg.tune.trial_kind == "in_process":
        from . import inprocess

        return inprocess.trainable(cfg, store, experiment_uri)
    else:
        fn = tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), experiment_uri=experiment_uri,
                                  store=store)
    return tune.with_resources(fn, {"CPU": cfg.tune.trial_cpus})


# --------------------------------------------------------------------------------------------
# the experiment


# Ray Tune copies these variables of the driver's environment into every trial actor's runtime_env
# (ray/tune/execution/class_cache.py), and Ray writes runtime envs in clear text to each node's
# runtime_env_agent.log and keeps them in the GCS. Trials read credentials where every other gammaray
# process does, from their node's environment (a local instance inherits the driver's), so the copy
# adds nothing but a leak.
CREDENTIAL_ENV_NOT_PROPAGATED = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                                           "AWS_SESSION_TOKEN"})


def keep_credentials_out_of_trial_env() -> None:
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - CREDENTIAL_ENV_NOT_PROPAGATED


def run_tune(cfg: GammarayConfig, samples: int | None = None, progress: bool = True,
             callbacks: list | None = None, out_dir: str | None = None, retry_errored: bool = False,
             log: Callable[[str], None] = print) -> TuneOutcome:
    """Search `cfg.tune.space`, resuming the experiment of the same name if it exists; returns the
    results and writes the table, the plot and the best config."""
    from ray import tune

    from workers.cluster import ensure_ray
    from workers.training.trainer import preflight

    keep_credentials_out_of_trial_env()
    store = Store.of(cfg.storage)  # the run's storage, bound once: handed to everything below and the trials
    t0 = time.perf_counter()
    if samples is not None:
        cfg = apply_overrides(cfg, {"tune.samples": samples})
    user_cfg = cfg
    cfg = absolute_paths(cfg)
    space.validate(cfg)                                  # before anything starts: names the bad key
    heads = bool(cfg.data.features.train)                # trials train heads on cached features
    if heads:
        from .heads_trial import budget_steps, num_records

        budget = budget_steps(cfg, num_records(cfg, store))
    else:
        manifest = preflight(space.trial_config(cfg, {}), store)
        budget = trial_budget(cfg, int(manifest["num_records"]))
    ensure_ray(cfg)
    import ray

    from workers.cluster import resolve_for_cluster

    cfg = resolve_for_cluster(cfg)  # "auto" keys become numbers once, for every trial
    plan = (plan_heads_resources if heads else plan_resources)(cfg, ray.cluster_resources())
    name = experiment_name(cfg)
    exp_uri = storage.join(cfg.run.storage, name)
    fs, root = store.resolve(cfg.run.storage)
    exp_path = f"{root}/{name}"
    base_uri = storage.join(exp_uri, "gammaray_tune.yaml")

    trainable = _trainable(cfg, store, exp_uri)
    params = space.param_space(cfg.tune.space)
    # Tune unpickles what it finds in the experiment folder: checked first (tuning/state_check.py)
    state_check.no_pickled_trial_errors()
    state_check.check_experiment(exp_uri, store)
    resumed = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if resumed:
        _check_same_experiment(cfg, store, base_uri)
        log(f"tune: resuming experiment {exp_uri} (finished trials are kept, unfinished ones continue)")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, param_space=params, resume_unfinished=True,
                                   resume_errored=retry_errored, storage_filesystem=fs)
        # Tuner.restore brings back the RunConfig pickled at the start, callbacks and verbosity
        # included; this session's callbacks and verbosity replace them
        local = getattr(tuner, "_local_tuner", None)  # None only under Ray Client
        if local is not None:
            run_config = local.get_run_config()
            run_config.callbacks = list(callbacks or [])
            run_config.verbose = 1 if progress else 0
    else:
        store.write_bytes(base_uri, to_yaml(cfg).encode())
        log(f"tune: experiment {exp_uri}: {cfg.tune.samples} trials, {plan.max_concurrent} at once "
            f"({plan.reason}; {plan.cluster_cpus:g} CPUs, {plan.cpus_held_per_trial:g} held per trial), "
            f"{budget} steps each, searcher={cfg.tune.searcher}, scheduler={cfg.tune.scheduler}")
        tuner = tune.Tuner(
            trainable,
            param_space=params,
            tune_config=tune.TuneConfig(
                # several objectives: the searcher and the scheduler hold their own metrics (Tune takes one)
                metric=None if cfg.tune.objectives else cfg.tune.metric, mode=None if cfg.tune.objectives else "max",
                search_alg=_searcher(cfg, plan.max_concurrent), scheduler=_scheduler(cfg, store, budget, exp_uri),
                num_samples=cfg.tune.samples, max_concurrent_trials=plan.max_concurrent,
                trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(name=name, storage_path=root, storage_filesystem=fs,
                                      verbose=1 if progress else 0),
        )
        # set after tuner.pkl is written: a callback defined in a notebook or test would be stored as
        # code, which a resume refuses to load (tuning/state_check.py)
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            local.get_run_config().callbacks = list(callbacks or [])
    tuner.fit()
    state_check.check_experiment(exp_uri, store)  # the results are read back from storage
    rows, interrupted = collect(exp_path, fs, cfg)
    confirmation = None
    if cfg.tune.objectives and cfg.tune.pick.confirm_seeds and not interrupted:
        confirmation = _confirm(cfg, store, rows, plan, root, fs, progress, log)
        if confirmation is not None and confirmation[2]:
            interrupted = True  # no pick on part of the confirmation runs; the same command finishes them
    return _finish(user_cfg, cfg, store, rows, interrupted, resumed, plan, budget, exp_uri, out_dir, t0, log,
                   confirmation)


def _confirm(cfg: GammarayConfig, store: Store, rows: list[report.TrialRow], plan: ResourcePlan, root: str, fs,
             progress: bool, log: Callable[[str], None]) -> tuple[list, list[int], bool] | None:
    """The front's trials and the baseline re-run with fresh seeds (tuning/confirm.py); None when
    there is no scored baseline to compare with (the pick then says why)."""
    from . import confirm, objectives

    objs = list(cfg.tune.objectives)
    baseline = objectives.find_baseline(rows, cfg)
    if baseline is None or not objectives.scored(baseline, objs):
        return None
    todo = confirm.candidates(rows, baseline, objs, cfg.tune.pick.confirm_candidates)
    return confirm.run(cfg, store, todo, plan.max_concurrent, root, fs, progress, log, make_trainable=_trainable,
                       collect=collect, trial_dirname=trial_dirname)


def _searcher(cfg: GammarayConfig, max_concurrent: int):
    seed = cfg.tune.seed if cfg.tune.seed is not None else cfg.run.seed
    points = space.start_points(cfg) or None
    if cfg.tune.searcher == "optuna" and cfg.tune.objectives:
        from . import objectives

        return objectives.searcher(cfg, seed, points)
    if cfg.tune.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed, points_to_evaluate=points)
    # Tune applies max_concurrent_trials to a Searcher only: a variant generator takes its own limit
    return state_check.CheckableVariantGenerator(random_state=seed, points_to_evaluate=points,
                                                 max_concurrent=max_concurrent)


def _scheduler(cfg: GammarayConfig, store: Store, budget: int, exp_uri: str):
    from ray.tune.schedulers import FIFOScheduler

    from .asha import STATE_FILE, RungMemoryASHA, grace_steps

    a = cfg.tune.asha
    trial = space.trial_config(cfg, {})
    grace = grace_steps(a.grace_period, a.grace_fraction, trial.train.eval_every or 1, budget, list(cfg.tune.space))
    if cfg.tune.scheduler == "fifo" or grace >= budget:
        return FIFOScheduler()  # (a grace period of the whole budget leaves ASHA nothing to stop)
    # time = optimizer steps. Rungs sit at grace * rf^k strictly below the budget: a trial that
    # survives them runs to its end and its final report (no rung at the last step)
    multi = {"metric": cfg.tune.metric, "mode": "max"} if cfg.tune.objectives else {}
    protect = []
    if cfg.tune.objectives:  # the pick rule needs the baseline's final values: ASHA never stops it
        from .objectives import baseline_params

        protect = [p for p in [baseline_params(cfg)] if p is not None]
    front = cfg.tune.objectives[1] if cfg.tune.objectives and a.keep_front else None
    return RungMemoryASHA(storage.join(exp_uri, STATE_FILE), store, time_attr="step", max_t=budget - 1,
                          grace_period=grace, reduction_factor=a.reduction_factor, stop_last_trials=False,
                          protect=protect, front_objective=front, **multi)


def _check_same_experiment(cfg: GammarayConfig, store: Store, base_uri: str) -> None:
    if not store.exists(base_uri):
        return
    import yaml

    stored = yaml.safe_load(store.read_bytes(base_uri).decode())
    diff = _diff(stored, cfg.model_dump(mode="json"))
    if diff:
        shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
        raise ConfigError(
            f"tune: experiment {base_uri.rsplit('/', 1)[0]} was started with a different config ({shown} differ); "
            f"resume it with the same config, or pick a new tune.name")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def collect(exp_path: str, fs, cfg: GammarayConfig) -> tuple[list[report.TrialRow], bool]:
    """One row per trial from the experiment state in storage (works for a finished, interrupted or
    resumed experiment alike)."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    analysis = ExperimentAnalysis(exp_path, storage_filesystem=fs)
    rows = []
    interrupted = len(analysis.trials) < cfg.tune.samples
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        last = trial.last_result or {}
        metric = last.get(cfg.tune.metric)
        if trial.status == Trial.ERROR:
            status = report.ERROR
        elif trial.status == Trial.TERMINATED:
            status = report.COMPLETED if last.get("final") else report.STOPPED
        elif trial.status == Trial.PENDING and not last:
            status = report.PENDING
            interrupted = True
        else:
            status = report.RUNNING
            interrupted = True
        error = None
        if status == report.ERROR:
            error = _first_error_line(trial)
        rows.append(report.TrialRow(
            trial_id=trial.trial_id, values=space.effective(trial.config, cfg.tune.space),
            metric=float(metric) if space.finite(metric) else None,
            steps=int(last["step"]) if "step" in last else None, status=status,
            train_workers=last.get("train_workers"), error=error,
            objectives={m: float(last[m]) for m in cfg.tune.objectives if space.finite(last.get(m))},
            extra={"checkpoint_path": last.get("checkpoint_path"), "time_total_s": last.get("time_total_s"),
                   "val_records": last.get("val_records")}))
    return rows, interrupted


def _first_error_line(trial) -> str:
    err = getattr(trial, "error_msg", None) or ""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "failed (see the trial's error file)"


def _finish(user_cfg: GammarayConfig, cfg: GammarayConfig, store: Store, rows: list[report.TrialRow], interrupted: bool,
            resumed: bool, plan: ResourcePlan, budget: int, exp_uri: str, out_dir: str | None, t0: float,
            log: Callable[[str], None], confirmation: tuple[list, list[int], bool] | None = None) -> TuneOutcome:
    name = experiment_name(cfg)
    metric = cfg.tune.metric
    best = report.best_row(rows)
    table = report.table_text(rows, cfg.tune.space, metric, best, list(cfg.tune.objectives))
    local = out_dir or (storage._local_path(exp_uri) if not storage.is_remote(exp_uri) else os.path.abspath(name))
    os.makedirs(local, exist_ok=True)
    outputs: dict[str, bytes] = {
        "results.txt": table.encode(),
        "results.csv": report.table_csv(rows, cfg.tune.space, metric).encode(),
        "metric_vs_values.png": report.plot_png(rows, cfg.tune.space, metric, best,
                                                title=f"{name}: {metric} per trial"),
    }
    best_cfg = best_path = None
    if best is not None:
        best_cfg = report.best_config(user_cfg, best, run_name=f"{name}-best")
        outputs["best_config.yaml"] = report.best_config_yaml(best_cfg, best, name, metric).encode()
    multi: dict[str, Any] = {}
    if cfg.tune.objectives:
        from . import objectives

        chosen = files = None
        if confirmation is not None and confirmation[2]:
            chosen = objectives.Pick(None, objectives.find_baseline(rows, cfg), None,
                                     "the confirmation runs were interrupted: no pick (run the same command again)")
        elif confirmation is not None:
            from . import confirm

            chosen, files = confirm.decide(cfg, rows, *confirmation[:2])
        more, chosen, front = objectives.outputs(user_cfg, cfg, rows, name, chosen)
        files = {**(files or {}), **more}
        outputs.update(files)
        if "confirm.txt" in files:
            outputs["results.txt"] = (table + "\n").encode() + files["confirm.txt"]
            table = outputs["results.txt"].decode()
        multi = {"front": front, "picked": chosen.row, "baseline": chosen.baseline, "pick_reason": chosen.reason,
                 "pick_warning": chosen.warning, "confirmation": chosen.confirmation}
        if chosen.confirmation:
            stats = {c["trial_id"]: {"mean": c["mean"], "se": c["se"], "seeds": len(c["per_seed"])}
                     for c in chosen.confirmation["configs"]}
            outputs["results.csv"] = report.table_csv(rows, cfg.tune.space, metric, stats).encode()
        for key, fname in (("picked_config_path", "picked_config.yaml"), ("baseline_config_path", "baseline_config.yaml")):
            if fname in files:
                multi[key] = os.path.join(local, fname)
    for fname, data in outputs.items():
        store.write_bytes(storage.join(exp_uri, fname), data)
        with open(os.path.join(local, fname), "wb") as f:
            f.write(data)
    if best is not None:
        best_path = os.path.join(local, "best_config.yaml")
    log(table.rstrip())
    n_stopped = sum(r.status == report.STOPPED for r in rows)
    log(f"tune: {len(rows)} trials ({sum(r.status == report.COMPLETED for r in rows)} completed, {n_stopped} "
        f"stopped early, {sum(r.status == report.ERROR for r in rows)} failed) in {exp_uri}")
    if interrupted:
        log("tune: the experiment was interrupted; run the same command again to finish the remaining trials")
    if best_path:
        log(f"tune: best config -> {best_path}  (train it: gammaray pretrain --config {best_path})")
    if multi:
        log(f"tune: Pareto front of {', '.join(cfg.tune.objectives)}: {len(multi['front'])} trials "
            f"({', '.join(r.trial_id for r in multi['front'])}) -> {os.path.join(local, 'pareto_front.json')}, .png")
        log(f"tune: pick: {multi['pick_reason']}")
        if multi.get("pick_warning"):
            log(f"tune: warning: {multi['pick_warning']}")
        if multi.get("picked_config_path"):
            log(f"tune: picked config -> {multi['picked_config_path']}  (baseline: {multi['baseline_config_path']})")
    return TuneOutcome(experiment_uri=exp_uri, rows=rows, best=best, best_config=best_cfg, best_config_path=best_path,
                       output_dir=local, table=table, resumed=resumed, interrupted=interrupted, plan=plan,
                       trial_max_steps=budget, wall_s=time.perf_counter() - t0, **multi)
