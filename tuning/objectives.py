"""A search with several objectives (`tune.objectives`): the searcher, the Pareto front, and the rule
that picks one configuration from it.

- Searcher: Optuna's multi-objective TPE through Ray Tune's OptunaSearch (metric and mode as lists,
  every objective maximised). Optuna takes no intermediate values in multi-objective mode, so each
  trial is told once, when it ends: with its final values when it ran its whole budget, as PRUNED
  when ASHA stopped it at a rung (rung values are not comparable with finished ones), as FAIL when
  an objective is missing or not finite.
- Scheduler: ASHA needs one metric; it compares trials at its rungs on `tune.metric` (R@1 by
  default: the pick rule below keeps R@1 within a small margin of the baseline's, so a trial already
  behind on R@1 at a rung is the one least likely to be picked). The baseline trial is never stopped:
  the rule needs its final values.
- Front: the completed trials that no other completed trial beats on every objective.
- Pick (two objectives [a, b]): the baseline is the trial of `tune.points_to_evaluate[0]` (put plain
  there, e.g. `{}` = the base config's values). With tune.pick.confirm_seeds (3 by default) the
  front's trials and the baseline train again with fresh seeds and the pick compares means in
  standard errors (tuning/confirm.py). With confirm_seeds 0, on the search's single runs: among
  completed trials whose a is at least the baseline's a minus `tune.pick.margin`, the one with the
  highest b (ties: higher a, then the baseline). The baseline itself qualifies, so either rule picks
  it when no regularized point pays on b at that cost on a.

Outputs next to the search's table: pareto_front.json, pareto_front.png, picked_config.yaml (train it
with `gammaray pretrain --config`) and baseline_config.yaml (the baseline's config: the comparison).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ray.tune.search.optuna import OptunaSearch

from gammaray.config import GammarayConfig, to_yaml

from . import report, space


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def with_every_objective(metrics: dict, objectives: list[str]) -> dict:
    """Tune refuses a result without every searcher metric: an objective the validation could not
    compute (a probe on too few records) is reported as NaN, which the searcher tells Optuna as FAIL."""
    missing = {m: float("nan") for m in objectives if m not in metrics}
    return {**metrics, **missing} if missing else metrics


class ParetoOptunaSearch(OptunaSearch):
    """OptunaSearch in multi-objective mode, told the truth about early-stopped trials (see above)."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and not error:
            if not result.get("final"):
                result = None  # stopped at a rung: PRUNED
            elif not all(finite(result.get(m)) for m in self.metric):
                result, error = None, True  # an objective is missing or not finite: FAIL
        super().on_trial_complete(trial_id, result=result, error=error)


def searcher(cfg: GammarayConfig, seed: int, points: list[dict] | None) -> ParetoOptunaSearch:
    objectives = list(cfg.tune.objectives)
    return ParetoOptunaSearch(metric=objectives, mode=["max"] * len(objectives), seed=seed,
                              points_to_evaluate=points)


def baseline_params(cfg: GammarayConfig) -> dict | None:
    """The Tune params of the baseline trial (tune.points_to_evaluate[0]), or None without one."""
    points = space.start_points(cfg)
    return points[0] if points else None


def same_values(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if finite(x) and finite(y):
            if not math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif x != y:
            return False
    return True


# --------------------------------------------------------------------------------------------
# front and pick


def scored(row: report.TrialRow, objectives: list[str]) -> bool:
    return row.status == report.COMPLETED and all(finite(row.objectives.get(m)) for m in objectives)


def pareto_front(rows: list[report.TrialRow], objectives: list[str]) -> list[report.TrialRow]:
    """Completed trials with every objective, not dominated by another such trial (>= on every
    objective and > on one), sorted by the first objective."""
    pool = [r for r in rows if scored(r, objectives)]

    def dominates(p, q) -> bool:
        a = [p.objectives[m] for m in objectives]
        b = [q.objectives[m] for m in objectives]
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    front = [r for r in pool if not any(dominates(o, r) for o in pool if o is not r)]
    return sorted(front, key=lambda r: r.objectives[objectives[0]])


@dataclass
class Pick:
    row: report.TrialRow | None
    baseline: report.TrialRow | None
    threshold: float | None          # the first objective the picked trial had to reach (single-run rule)
    reason: str
    warning: str | None = None       # the validation split cannot resolve tune.pick.margin
    confirmation: dict | None = None  # tuning/confirm.py as_json: the confirmed means, SEs and decisions


def pick(rows: list[report.TrialRow], objectives: list[str], baseline: report.TrialRow | None,
         margin: float) -> Pick:
    a, b = objectives[0], objectives[1]
    if baseline is None:
        return Pick(None, None, None, "no baseline trial (tune.points_to_evaluate[0]) in the experiment")
    if not scored(baseline, objectives):
        return Pick(None, baseline, None, f"the baseline trial {baseline.trial_id} has no final {a} and {b} "
                                          f"(status {baseline.status})")
    threshold = baseline.objectives[a] - margin
    feasible = [r for r in rows if scored(r, objectives) and r.objectives[a] >= threshold]
    # ties: the higher first objective, then the baseline (a regularizer that gains nothing is not picked)
    best = max(feasible, key=lambda r: (r.objectives[b], r.objectives[a], r.trial_id == baseline.trial_id))
    if best.trial_id == baseline.trial_id:
        reason = (f"no completed trial beats the baseline's {b}={baseline.objectives[b]:.4f} with {a} >= "
                  f"{threshold:.4f} (the baseline's {baseline.objectives[a]:.4f} - margin {margin:g}): the baseline")
    else:
        reason = (f"highest {b} ({best.objectives[b]:.4f}, baseline {baseline.objectives[b]:.4f}) among the "
                  f"{len(feasible)} completed trials with {a} >= {threshold:.4f} (baseline {baseline.objectives[a]:.4f}"
                  f" - margin {margin:g})")
    return Pick(best, baseline, threshold, reason)


def find_baseline(rows: list[report.TrialRow], cfg: GammarayConfig) -> report.TrialRow | None:
    params = baseline_params(cfg)
    if params is None:
        return None
    values = space.effective(params, cfg.tune.space)
    same = [r for r in rows if same_values(r.values, values)]
    # the searcher may propose the baseline's values again (a weight switched off by its `#zero`
    # variable whatever its value): the seeded point is the one ASHA protects, so prefer a completed one
    return min(same, key=lambda r: (r.status != report.COMPLETED, r.trial_id)) if same else None


# --------------------------------------------------------------------------------------------
# outputs


def front_json(rows: list[report.TrialRow], front: list[report.TrialRow], chosen: Pick, objectives: list[str],
               margin: float, experiment: str, rung_metric: str) -> str:
    on_front = {r.trial_id for r in front}
    doc = {
        "experiment": experiment,
        "objectives": objectives,
        "rung_metric": rung_metric,
        "rule": {"margin": margin, "baseline": chosen.baseline.trial_id if chosen.baseline else None,
                 "threshold": chosen.threshold,
                 "text": (f"highest {objectives[1]} among completed trials with {objectives[0]} >= "
                          f"baseline's {objectives[0]} - margin") if chosen.confirmation is None else
                         (f"confirmed with seeds {chosen.confirmation['seeds']}: highest mean {objectives[1]} among "
                          f"trials with mean {objectives[0]} >= baseline's - {chosen.confirmation['margin_se']:g} SE "
                          f"and mean {objectives[1]} > baseline's + {chosen.confirmation['gain_se']:g} SE")},
        "picked": chosen.row.trial_id if chosen.row else None,
        "reason": chosen.reason,
        "warning": chosen.warning,
        "confirmation": chosen.confirmation,
        "front": [r.trial_id for r in front],
        "trials": [{"trial_id": r.trial_id, "status": r.status, "steps": r.steps, "values": r.values,
                    "objectives": r.objectives, "on_front": r.trial_id in on_front,
                    "baseline": chosen.baseline is not None and r.trial_id == chosen.baseline.trial_id,
                    "picked": chosen.row is not None and r.trial_id == chosen.row.trial_id}
                   for r in rows],
    }
    return json.dumps(doc, indent=1, default=str) + "\n"


def front_png(rows: list[report.TrialRow], front: list[report.TrialRow], chosen: Pick, objectives: list[str],
              title: str = "") -> bytes:
    """The first objective (x) against the second (y): every trial that reported both, the front
    connected, the baseline, the feasible region of the pick rule, the picked trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = objectives[0], objectives[1]
    label = {"val_r_at_1": "validation R@1", "val_probe_specific": "modality-specific probe (validation)"}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for status, style in ((report.COMPLETED, dict(marker="o", color="tab:blue", alpha=0.7)),
                          (report.STOPPED, dict(marker="x", color="tab:gray", alpha=0.6))):
        pts = [(r.objectives[a], r.objectives[b]) for r in rows if r.status == status
               and finite(r.objectives.get(a)) and finite(r.objectives.get(b))]
        if pts:
            name = status if status == report.COMPLETED else f"{status} (values at its last rung)"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, label=name, **style)
    if front:
        ax.plot([r.objectives[a] for r in front], [r.objectives[b] for r in front], "-o", color="tab:red", ms=7,
                mfc="none", lw=1.2, label="Pareto front")
    if chosen.baseline is not None and scored(chosen.baseline, objectives):
        ax.scatter([chosen.baseline.objectives[a]], [chosen.baseline.objectives[b]], marker="s", s=90,
                   facecolors="none", edgecolors="black", linewidths=1.5, label="baseline", zorder=4)
    if chosen.row is not None:
        ax.scatter([chosen.row.objectives[a]], [chosen.row.objectives[b]], marker="*", s=260, color="gold",
                   edgecolors="black", linewidths=0.8, label="picked", zorder=5)
    if chosen.threshold is not None:  # last: the axis limits are final
        lo, hi = ax.get_xlim()
        ax.axvspan(chosen.threshold, hi, color="tab:green", alpha=0.08, label=f"{a} >= baseline - margin")
        ax.set_xlim(lo, hi)
    ax.set_xlabel(label.get(a, a))
    ax.set_ylabel(label.get(b, b))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"{b} vs {a}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def config_yaml(base: GammarayConfig, row: report.TrialRow, run_name: str, header: list[str]) -> tuple[GammarayConfig, str]:
    """The base config as the user gave it (tune.trial_overrides left out) with the trial's values."""
    cfg = report.best_config(base, row, run_name)
    lines = [f"# {h}" for h in header] + ["# train it: gammaray pretrain --config THIS_FILE"]
    lines += [f"#   {p} = {space.fmt(v)}" for p, v in row.values.items()]
    return cfg, "\n".join(lines) + "\n" + to_yaml(cfg)


def resolution_warning(r_at_1: float | None, records: int | None, margin: float) -> str | None:
    """A warning when the binomial standard error of R@1 at the observed R@1 on `records` validation
    records is larger than `margin` (tune.pick.margin): the split cannot tell such a drop from chance."""
    if not finite(r_at_1) or not records or margin <= 0:
        return None
    p = min(max(float(r_at_1), 0.0), 1.0)
    se = math.sqrt(p * (1 - p) / records)
    if se <= margin:
        return None
    need = math.ceil(p * (1 - p) / margin ** 2)
    return (f"the validation split has {records} records: at R@1 {p:.3f} the binomial standard error of R@1 is {se:.4f}, "
            f"more than tune.pick.margin={margin:g}; a drop that small cannot be resolved there (about {need} records "
            f"would resolve it). Means over the confirmation seeds narrow the training noise, not this one")


def outputs(user_cfg: GammarayConfig, cfg: GammarayConfig, rows: list[report.TrialRow], name: str,
            chosen: Pick | None = None) -> tuple[dict[str, bytes], Pick, list[report.TrialRow]]:
    """pareto_front.json / .png, picked_config.yaml and baseline_config.yaml (when there is a pick).
    `chosen`: a pick already made (tuning/confirm.py, on the confirmation runs); None = the rule on
    the search's single runs here."""
    objectives = list(cfg.tune.objectives)
    front = pareto_front(rows, objectives)
    files: dict[str, bytes] = {}
    if chosen is None:
        baseline = find_baseline(rows, cfg)
        chosen = pick(rows, objectives, baseline, cfg.tune.pick.margin)
        if objectives[0] == "val_r_at_1" and baseline is not None:
            chosen.warning = resolution_warning(baseline.objectives.get(objectives[0]),
                                                baseline.extra.get("val_records"), cfg.tune.pick.margin)
    files.update({
        "pareto_front.json": front_json(rows, front, chosen, objectives, cfg.tune.pick.margin, name,
                                        cfg.tune.metric).encode(),
        "pareto_front.png": front_png(rows, front, chosen, objectives,
                                      title=f"{name}: {len(rows)} trials, {len(front)} on the front"),
    })
    if chosen.row is not None and chosen.baseline is not None:
        vals = ", ".join(f"{m}={chosen.row.objectives[m]:.4f}" for m in objectives)
        header = [f"picked trial {chosen.row.trial_id} of Ray Tune experiment {name}: {vals}", f"rule: {chosen.reason}"]
        conf = {c["trial_id"]: c for c in (chosen.confirmation or {}).get("configs", [])}
        if chosen.row.trial_id in conf:  # the figures the pick was made on
            c = conf[chosen.row.trial_id]
            header.insert(1, f"confirmed over seeds {chosen.confirmation['seeds']}: " + ", ".join(
                f"{m}={c['mean'][m]:.4f} ± {c['se'][m]:.4f}" for m in objectives if c["mean"].get(m) is not None))
        _, text = config_yaml(user_cfg, chosen.row, f"{name}-picked", header)
        files["picked_config.yaml"] = text.encode()
        bvals = ", ".join(f"{m}={chosen.baseline.objectives[m]:.4f}" for m in objectives)
        _, text = config_yaml(user_cfg, chosen.baseline, f"{name}-baseline",
                              [f"baseline trial {chosen.baseline.trial_id} of Ray Tune experiment {name}: {bvals}"])
        files["baseline_config.yaml"] = text.encode()
    return files, chosen, front
