"""Selection that knows its noise: the Pareto front's trials and the baseline train again with fresh
seeds before a multi-objective search picks (tune.pick.confirm_seeds).

Which: the baseline and the Pareto front of the other completed trials (at most
tune.pick.confirm_candidates of it, highest second objective first).

Why: a search trial is one run, scored on one validation split. Two runs of the same config with
different seeds differ on R@1 by about the binomial standard error of R@1 on that split (0.009 on 500
records at R@1 0.09), and a front is selected on those single values: the trial at its top is partly
there by luck (the winner's curse). So the search's own run is not reused; each confirmed config
trains with seeds run.seed+1 .. run.seed+k, as a second Ray Tune experiment `<tune.name>-confirm`
beside the search's (FIFO, the same trainable and resources; an interrupted one resumes).

The rule (`pick`, deterministic, on the per-seed values):
  d_a = mean_a(trial) - mean_a(baseline), se_a = sqrt(se_a(trial)^2 + se_a(baseline)^2) (se: the
  sample std over seeds / sqrt(k)); likewise d_b, se_b for the second objective.
  A trial qualifies when d_a >= -margin_se * se_a and gains when d_b > gain_se * se_b. The qualifying
  trial with a gain and the highest mean b is picked (ties: higher mean a, then trial id); none: the
  baseline (a regularizer whose gain is inside the noise is not picked).

`resolution_warning` (tuning/objectives.py) says when the validation split is too small for the margin a user cares about
(tune.pick.margin): the binomial standard error of R@1 at the baseline's R@1 on n records above it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from gammaray.config import ConfigError, GammarayConfig, SearchDim, apply_overrides
from pipelines.storage import Store

from . import report, space
from .objectives import Pick, find_baseline, pareto_front, resolution_warning, same_values

SEED_KEY = "run.seed"


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Confirmed:
    """One config's confirmation runs: the search trial it re-runs and each seed's final objectives."""

    trial_id: str
    values: dict[str, Any]
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)

    def samples(self, m: str) -> list[float]:
        return [v[m] for _, v in sorted(self.per_seed.items()) if finite(v.get(m))]

    def n(self, m: str) -> int:
        return len(self.samples(m))

    def mean(self, m: str) -> float:
        xs = self.samples(m)
        return sum(xs) / len(xs) if xs else math.nan

    def se(self, m: str) -> float:
        """Standard error of the mean over seeds (sample std, ddof 1 / sqrt(n)); NaN under 2 seeds."""
        xs = self.samples(m)
        if len(xs) < 2:
            return math.nan
        mu = sum(xs) / len(xs)
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


@dataclass
class Decision:
    trial_id: str
    d_a: float
    se_a: float
    d_b: float
    se_b: float
    qualifies: bool      # d_a >= -margin_se * se_a
    gains: bool          # d_b > gain_se * se_b

    @property
    def z_a(self) -> float:
        return self.d_a / self.se_a if self.se_a > 0 else (0.0 if self.d_a == 0 else math.copysign(math.inf, self.d_a))


@dataclass
class ConfirmedPick:
    trial_id: str | None            # the picked config's search trial (the baseline's when nothing pays)
    reason: str
    decisions: list[Decision]


def _diff(c: Confirmed, base: Confirmed, m: str) -> tuple[float, float]:
    return c.mean(m) - base.mean(m), math.sqrt(c.se(m) ** 2 + base.se(m) ** 2)


def pick(confirmed: list[Confirmed], baseline: Confirmed | None, objectives: list[str], margin_se: float,
         gain_se: float, min_seeds: int = 2) -> ConfirmedPick:
    """The rule of the module docstring. `confirmed` are the candidates (the baseline may be among
    them: it is skipped); a candidate with fewer than min_seeds finite runs of both objectives is
    left out, named in the decisions as not qualifying."""
    a, b = objectives[0], objectives[1]
    if baseline is None or min(baseline.n(a), baseline.n(b)) < min_seeds:
        got = 0 if baseline is None else min(baseline.n(a), baseline.n(b))
        return ConfirmedPick(None, f"the baseline has {got} confirmation runs with both objectives (needs {min_seeds}):"
                                   " no pick", [])
    decisions = []
    for c in confirmed:
        if c.trial_id == baseline.trial_id:
            continue
        if min(c.n(a), c.n(b)) < min_seeds:
            decisions.append(Decision(c.trial_id, math.nan, math.nan, math.nan, math.nan, False, False))
            continue
        d_a, se_a = _diff(c, baseline, a)
        d_b, se_b = _diff(c, baseline, b)
        decisions.append(Decision(c.trial_id, d_a, se_a, d_b, se_b, qualifies=d_a >= -margin_se * se_a,
                                  gains=d_b > gain_se * se_b))
    by_id = {c.trial_id: c for c in confirmed}
    paying = [d for d in decisions if d.qualifies and d.gains]
    rule = (f"{a} mean >= baseline's - {margin_se:g} SE of the difference, {b} mean > baseline's + {gain_se:g} SE, "
            f"over {baseline.n(a)} seeds")
    if not paying:
        return ConfirmedPick(baseline.trial_id, f"no confirmed trial keeps {a} and gains {b} beyond the noise ({rule}):"
                                                f" the baseline", decisions)
    best = max(paying, key=lambda d: (by_id[d.trial_id].mean(b), by_id[d.trial_id].mean(a), d.trial_id))
    reason = (f"highest mean {b} ({by_id[best.trial_id].mean(b):.4f}, baseline {baseline.mean(b):.4f}, "
              f"{best.d_b / best.se_b if best.se_b > 0 else math.inf:+.1f} SE) among {len(paying)} of {len(decisions)} "
              f"confirmed trials that pay ({rule}); its {a} {best.d_a:+.4f} ({best.z_a:+.1f} SE)")
    return ConfirmedPick(best.trial_id, reason, decisions)


def candidates(rows: list[report.TrialRow], baseline: report.TrialRow, objectives: list[str],
               limit: int) -> list[report.TrialRow]:
    """The baseline, then at most `limit` trials of the Pareto front of the other completed trials
    (those with the baseline's values left out: one lucky baseline run must not hide them all),
    highest second objective first."""
    b = objectives[1]
    others = pareto_front([r for r in rows if r.trial_id != baseline.trial_id and not _same(r.values, baseline.values)],
                          objectives)
    others.sort(key=lambda r: (-r.objectives[b], r.trial_id))
    return [baseline, *others[:limit]]


def _same(x: Mapping[str, Any], y: Mapping[str, Any]) -> bool:
    return same_values(x, y)


def seeds(cfg: GammarayConfig, k: int) -> list[int]:
    """Fresh seeds: the search's trials trained with run.seed."""
    s0 = space.trial_config(cfg, {}).run.seed
    return [s0 + i for i in range(1, k + 1)]


def params_of(values: Mapping[str, Any], dims: Mapping[str, SearchDim]) -> dict[str, Any]:
    """Tune params that give these effective values (a weight of 0 through its `#zero` switch)."""
    out: dict[str, Any] = {}
    for path, dim in dims.items():
        if path not in values:
            continue
        v = values[path]
        if dim.zero:
            out[path + space.ZERO_SUFFIX] = v == 0
            out[path] = float(dim.low) if v == 0 else float(v)
        else:
            out[path] = v
    return out


def confirm_config(cfg: GammarayConfig, seed_values: list[int]) -> GammarayConfig:
    """The search's config with run.seed as one more (choice) dimension: the trainables apply it."""
    dims = {p: d.model_dump(mode="json") for p, d in cfg.tune.space.items()}
    dims[SEED_KEY] = {"kind": "choice", "values": list(seed_values)}
    return apply_overrides(cfg, {"tune.space": dims, "tune.name": f"{cfg.tune.name or cfg.run.name + '-tune'}-confirm"})


def points(rows: list[report.TrialRow], cfg: GammarayConfig, seed_values: list[int]) -> list[dict[str, Any]]:
    return [{**params_of(r.values, cfg.tune.space), SEED_KEY: s} for r in rows for s in seed_values]


def gather(rows: list[report.TrialRow], runs: list[report.TrialRow], objectives: list[str]) -> list[Confirmed]:
    """Each candidate's confirmation runs (matched on their values without the seed)."""
    out = []
    for r in rows:
        c = Confirmed(r.trial_id, dict(r.values))
        for run in runs:
            vals = {k: v for k, v in run.values.items() if k != SEED_KEY}
            if run.status == report.COMPLETED and SEED_KEY in run.values and _same(vals, r.values):
                c.per_seed[int(run.values[SEED_KEY])] = {m: run.objectives[m] for m in objectives if m in run.objectives}
        out.append(c)
    return out


# --------------------------------------------------------------------------------------------
# the confirmation experiment (Ray Tune)

# the points the confirmation experiment was started with (not .json: Tune copies those on resume)
POINTS_FILE = "confirm.points"


def _canonical(pts: list[dict[str, Any]]) -> str:
    return json.dumps(pts, sort_keys=True, default=str)


def write_points(uri: str, pts: list[dict[str, Any]], store: Store) -> None:
    from pipelines import storage

    store.write_bytes(storage.join(uri, POINTS_FILE), _canonical(pts).encode())


def check_points(uri: str, pts: list[dict[str, Any]], store: Store) -> None:
    """A resumed confirmation trains the points it started with: other candidates (the search grew,
    tune.pick changed) are refused, naming the folder, rather than compared on missing runs."""
    from pipelines import storage

    f = storage.join(uri, POINTS_FILE)
    if not store.exists(f):
        return
    if json.loads(store.read_bytes(f).decode()) != json.loads(_canonical(pts)):
        raise ConfigError(f"tune: the confirmation experiment {uri} was started with other candidates or seeds "
                          f"(the search or tune.pick changed since): remove that folder to confirm again")


def run(cfg: GammarayConfig, store: Store, rows: list[report.TrialRow], max_concurrent: int, exp_root: str, fs,
        progress: bool, log: Callable[[str], None], make_trainable: Callable, collect: Callable,
        trial_dirname: Callable) -> tuple[list[Confirmed], list[int], bool]:
    """Train `rows` (the baseline first) with tune.pick.confirm_seeds fresh seeds each, as the Ray Tune
    experiment <tune.name>-confirm under the same storage; resumes one that was interrupted.
    `make_trainable(cfg, store, experiment_uri)`, `collect(path, fs, cfg)` and `trial_dirname` are the
    search's own (tuning/search.py)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from pipelines import storage

    from . import state_check

    k = cfg.tune.pick.confirm_seeds
    seed_values = seeds(cfg, k)
    ccfg = confirm_config(cfg, seed_values)
    pts = points(rows, cfg, seed_values)
    ccfg = apply_overrides(ccfg, {"tune.samples": len(pts)})
    name = ccfg.tune.name
    uri = storage.join(cfg.run.storage, name)
    path = f"{exp_root}/{name}"
    trainable = make_trainable(ccfg, store, uri)
    state_check.check_experiment(uri, store)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        check_points(uri, pts, store)
        log(f"tune: resuming the confirmation runs {uri}")
        tuner = tune.Tuner.restore(path, trainable=trainable, param_space=space.param_space(ccfg.tune.space),
                                   resume_unfinished=True, storage_filesystem=fs)
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            local.get_run_config().verbose = 1 if progress else 0
    else:
        log(f"tune: confirming {len(rows)} configs (the baseline and {len(rows) - 1} of the front) with seeds "
            f"{seed_values}: {len(pts)} runs in {uri}")
        # (the generator holds the concurrency limit: Tune applies max_concurrent_trials to a Searcher only)
        gen = state_check.CheckableVariantGenerator(points_to_evaluate=pts, max_concurrent=max_concurrent)
        tuner = tune.Tuner(
            trainable, param_space=space.param_space(ccfg.tune.space),
            tune_config=tune.TuneConfig(search_alg=gen, scheduler=FIFOScheduler(), num_samples=len(pts),
                                        trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=exp_root, storage_filesystem=fs,
                                      verbose=1 if progress else 0))
        write_points(uri, pts, store)
    tuner.fit()
    state_check.check_experiment(uri, store)
    runs, interrupted = collect(path, fs, ccfg)  # interrupted: the caller makes no pick on part of the runs
    return gather(rows, runs, list(cfg.tune.objectives)), seed_values, interrupted


# --------------------------------------------------------------------------------------------
# outputs


def decide(cfg: GammarayConfig, rows: list[report.TrialRow], confirmed: list[Confirmed],
           seed_values: list[int]) -> tuple[Pick, dict[str, bytes]]:
    """The pick on the confirmation runs, as tuning/objectives.py's Pick (the search's row of the
    picked config), and confirm.txt / confirm.csv."""
    objectives = list(cfg.tune.objectives)
    p = cfg.tune.pick
    baseline = find_baseline(rows, cfg)
    base_c = next((c for c in confirmed if baseline is not None and c.trial_id == baseline.trial_id), None)
    cp = pick(confirmed, base_c, objectives, p.margin_se, p.gain_se)
    by_id = {r.trial_id: r for r in rows}
    chosen = Pick(by_id.get(cp.trial_id) if cp.trial_id else None, baseline, None, cp.reason)
    if objectives[0] == "val_r_at_1" and baseline is not None:
        chosen.warning = resolution_warning(base_c.mean(objectives[0]) if base_c else None,
                                            baseline.extra.get("val_records"), p.margin)
    dims = list(cfg.tune.space)
    base_id = baseline.trial_id if baseline is not None else None
    chosen.confirmation = as_json(confirmed, cp, objectives, seed_values, p.margin_se, p.gain_se, chosen.warning)
    files = {"confirm.txt": table_text(confirmed, cp, objectives, dims, base_id, chosen.warning).encode(),
             "confirm.csv": table_csv(confirmed, cp, objectives, dims, base_id).encode()}
    return chosen, files


def table_text(confirmed: list[Confirmed], chosen: ConfirmedPick, objectives: list[str], dims: list[str],
               baseline_id: str | None, warning: str | None) -> str:
    names = report.short_names(dims)
    short = {m: ("R@1" if m == "val_r_at_1" else m.removeprefix("val_")) for m in objectives}
    dec = {d.trial_id: d for d in chosen.decisions}
    header = ["trial", *[names[p] for p in dims], "seeds", *[f"{short[m]} mean ± se" for m in objectives],
              f"d {short[objectives[0]]} (SE)", f"d {short[objectives[1]]} (SE)", "verdict"]
    body = []
    for c in confirmed:
        d = dec.get(c.trial_id)
        cells = [c.trial_id + (" *" if c.trial_id == chosen.trial_id else "")]
        cells += [space.fmt(c.values[p]) if p in c.values else "-" for p in dims]
        cells += [",".join(str(s) for s in sorted(c.per_seed))]
        cells += [f"{c.mean(m):.4f} ± {c.se(m):.4f}" if c.n(m) else "-" for m in objectives]
        if c.trial_id == baseline_id:
            cells += ["", "", "baseline"]
        elif d is None or not finite(d.d_a):
            cells += ["-", "-", "too few runs"]
        else:
            z_b = d.d_b / d.se_b if d.se_b > 0 else math.copysign(math.inf, d.d_b or 1)
            verdict = "pays" if d.qualifies and d.gains else "no gain" if d.qualifies else f"loses {short[objectives[0]]}"
            cells += [f"{d.d_a:+.4f} ({d.z_a:+.1f})", f"{d.d_b:+.4f} ({z_b:+.1f})", verdict]
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = ["confirmation (validation, fresh seeds; d = mean - baseline's, in SE of the difference):",
           line(header), line(["-" * w for w in widths]), *[line(c) for c in body], f"* pick: {chosen.reason}"]
    if warning:
        out.append(f"warning: {warning}")
    return "\n".join(out) + "\n"


def table_csv(confirmed: list[Confirmed], chosen: ConfirmedPick, objectives: list[str], dims: list[str],
              baseline_id: str | None) -> str:
    dec = {d.trial_id: d for d in chosen.decisions}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", *dims, "seeds", *[f"{m}_{s}" for m in objectives for s in ("mean", "se", "n")],
                "d_" + objectives[0], "se_d_" + objectives[0], "d_" + objectives[1], "se_d_" + objectives[1],
                "baseline", "qualifies", "gains", "picked"])
    for c in confirmed:
        d = dec.get(c.trial_id)
        stats = [x for m in objectives for x in (c.mean(m), c.se(m), c.n(m))]
        diffs = ["", "", "", ""] if d is None else [d.d_a, d.se_a, d.d_b, d.se_b]
        w.writerow([c.trial_id, *[c.values.get(p, "") for p in dims], " ".join(str(s) for s in sorted(c.per_seed)),
                    *stats, *diffs, c.trial_id == baseline_id, "" if d is None else d.qualifies,
                    "" if d is None else d.gains, c.trial_id == chosen.trial_id])
    return buf.getvalue()


def as_json(confirmed: list[Confirmed], chosen: ConfirmedPick, objectives: list[str], seed_values: list[int],
            margin_se: float, gain_se: float, warning: str | None) -> dict:
    dec = {d.trial_id: d for d in chosen.decisions}

    def num(x: float) -> float | None:
        return float(x) if finite(x) else None

    return {"seeds": seed_values, "margin_se": margin_se, "gain_se": gain_se, "picked": chosen.trial_id,
            "reason": chosen.reason, "warning": warning,
            "configs": [{"trial_id": c.trial_id, "values": c.values, "per_seed": {str(s): v for s, v in sorted(c.per_seed.items())},
                         "mean": {m: num(c.mean(m)) for m in objectives}, "se": {m: num(c.se(m)) for m in objectives},
                         **({"d": [num(dec[c.trial_id].d_a), num(dec[c.trial_id].d_b)],
                             "se_d": [num(dec[c.trial_id].se_a), num(dec[c.trial_id].se_b)],
                             "qualifies": dec[c.trial_id].qualifies, "gains": dec[c.trial_id].gains}
                            if c.trial_id in dec else {})}
                        for c in confirmed]}
