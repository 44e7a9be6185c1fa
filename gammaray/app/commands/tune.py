from __future__ import annotations

import argparse
import json

from gammaray.config import ConfigError, apply_overrides, parse_override

from . import EPILOG, add_config_args, config_from_args

DESCRIPTION = """Search the config tree with Ray Tune: each trial trains with the training loop of
`gammaray pretrain` (a TorchTrainer) under the trial's values; ASHA stops weak trials on the
validation R@1 reported every train.eval_every steps; Optuna proposes the values.

The search space is tune.space in the config: dotted path -> {kind, low, high | values, zero}.
Defaults: the regularizer weights loss.structure.lambda_{sep,br,gc} (log-uniform, 0 allowed), the
bridge t, the temperature, the gamma loss's alpha and gamma. The experiment lives in
<run.storage>/<tune.name>; running the same command again resumes it (finished trials are kept).
At the end: a results table, metric_vs_values.png and best_config.yaml (train it with
`gammaray pretrain --config best_config.yaml`).

Several objectives (tune.objectives, e.g. [val_r_at_1, val_probe_specific] with eval.specific_attributes):
Optuna's multi-objective TPE, ASHA on tune.metric, pareto_front.json/.png, picked_config.yaml (the
highest second objective among trials whose first is within tune.pick.margin of the baseline trial's,
tune.points_to_evaluate[0]) and baseline_config.yaml. tune.trial_kind=in_process trains each trial in
its own process (small models: far cheaper than a TorchTrainer per trial)."""


def run(args: argparse.Namespace) -> int:
    from tuning.search import run_tune

    cfg = config_from_args(args)
    if args.name:
        cfg = apply_overrides(cfg, {"tune.name": args.name})
    if args.space:
        cfg = apply_overrides(cfg, {"tune.space": edit_space(cfg.tune.model_dump(mode="json")["space"], args.space)})
    from workers.tracking import start_run, tune_callbacks

    parent = start_run(cfg, "tune", name=f"tune {cfg.tune.name}")  # tracking.kind: a parent run, a child per trial
    try:
        out = run_tune(cfg, samples=args.samples, progress=not args.quiet, out_dir=args.out,
                       retry_errored=args.retry_errored, callbacks=tune_callbacks(cfg, parent))
    except BaseException:
        if parent:
            parent.finish(ok=False)
        raise
    if parent:
        if out.best:
            parent.log_metrics({"best_" + cfg.tune.metric: out.best.metric, "trials": len(out.rows)})
            parent.set_tag("best_trial", str(out.best.trial_id))
        parent.finish()
    summary = {
        "experiment": out.experiment_uri, "trials": len(out.rows), "resumed": out.resumed,
        "interrupted": out.interrupted, "trials_at_once": out.plan.max_concurrent, "steps_per_trial": out.trial_max_steps,
        "best_trial": out.best.trial_id if out.best else None, "best_metric": out.best.metric if out.best else None,
        "best_values": out.best.values if out.best else None, "best_config": out.best_config_path,
        "outputs": out.output_dir, "wall_s": round(out.wall_s, 1),
    }
    if cfg.tune.objectives:
        summary.update({
            "objectives": list(cfg.tune.objectives), "front": [r.trial_id for r in out.front],
            "picked_trial": out.picked.trial_id if out.picked else None,
            "picked_objectives": out.picked.objectives if out.picked else None,
            "baseline_trial": out.baseline.trial_id if out.baseline else None,
            "baseline_objectives": out.baseline.objectives if out.baseline else None,
            "pick_reason": out.pick_reason, "picked_config": out.picked_config_path,
            "baseline_config": out.baseline_config_path,
        })
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "rows": [r.__dict__ for r in out.rows]}, f, indent=2, default=str)
    if out.interrupted:
        return 3
    if cfg.tune.objectives:
        return 0 if out.picked is not None else 1
    return 0 if out.best is not None else 1


def edit_space(space: dict, items: list[str]) -> dict:
    """--space PATH=SPEC adds or replaces one dimension (SPEC in YAML: {kind: uniform, low: 0.1,
    high: 0.9}); --space PATH=off removes it."""
    space = dict(space)
    for item in items:
        path, spec = parse_override(item)
        if spec == "off" or spec is False:
            if path not in space:
                raise ConfigError(f"--space {item}: {path} is not in tune.space ({', '.join(space)})")
            del space[path]
        elif isinstance(spec, dict):
            space[path] = spec
        else:
            raise ConfigError(f"--space {item}: give a mapping such as {{kind: uniform, low: 0.1, high: 0.9}}, or off")
    return space


def register(sub) -> None:
    p = sub.add_parser("tune", help="search regularizer weights (any config key) with Ray Tune; writes the best config",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--space", metavar="PATH=SPEC", action="append", default=[],
                   help="add/replace one search dimension, e.g. --space 'train.optim.lr={kind: loguniform, low: 1e-4, "
                        "high: 1e-2}', or drop one: --space loss.gamma.alpha=off (repeatable)")
    p.add_argument("--samples", type=int, metavar="N", help="number of trials (tune.samples)")
    p.add_argument("--name", metavar="NAME", help="experiment name (tune.name); the same name resumes")
    p.add_argument("--out", metavar="DIR",
                   help="local folder for results.txt/.csv, metric_vs_values.png, best_config.yaml "
                        "(default: the experiment folder when run.storage is local, else ./<experiment>)")
    p.add_argument("--retry-errored", action="store_true", help="when resuming, run failed trials again")
    p.add_argument("--json", metavar="PATH", help="write the summary and every trial's row as JSON")
    p.add_argument("--quiet", action="store_true", help="no Ray Tune status tables")
    p.set_defaults(func=run)
