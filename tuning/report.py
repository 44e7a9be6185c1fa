"""What a search hands back: a results table, a plot of the metric against each searched value, and
the best trial's values applied to the base config as a YAML file `gammaray pretrain --config`
reads unchanged."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any, Mapping

from gammaray.config import GammarayConfig, SearchDim, apply_overrides, to_yaml

from .space import fmt, is_log

# trial status as the table shows it
COMPLETED = "completed"      # ran its whole budget (the loop's final report arrived)
STOPPED = "stopped early"    # the scheduler (ASHA) stopped it at a rung
ERROR = "error"
RUNNING = "interrupted"      # was running when the experiment was interrupted
PENDING = "pending"          # not started yet


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]           # the config values it trained with (switches applied)
    metric: float | None             # last reported validation metric
    steps: int | None                # optimizer steps reached
    status: str
    train_workers: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, float] = field(default_factory=dict)   # last values of tune.objectives


def short_names(paths: list[str]) -> dict[str, str]:
    """The shortest unambiguous tail of each dotted path (lambda_sep, bridge_t, gamma.alpha...)."""
    out: dict[str, str] = {}
    for p in paths:
        parts = p.split(".")
        for k in range(1, len(parts) + 1):
            tail = ".".join(parts[-k:])
            if sum(1 for q in paths if q == tail or q.endswith("." + tail)) == 1:
                out[p] = tail
                break
        else:
            out[p] = p
    return out


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The best trial among those that ran their whole budget; if none did, the best of all."""
    scored = [r for r in rows if r.metric is not None]
    full = [r for r in scored if r.status == COMPLETED]
    pool = full or scored
    if not pool:
        return None
    return max(pool, key=lambda r: (r.metric, r.steps or 0))


def table_text(rows: list[TrialRow], space: Mapping[str, SearchDim], metric: str, best: TrialRow | None,
               objectives: list[str] | None = None) -> str:
    """One line per trial; `objectives` other than `metric` get a column each (their last values)."""
    names = short_names(list(space))
    extra = [m for m in objectives or [] if m != metric]
    header = ["trial", *[names[p] for p in space], "R@1" if metric == "val_r_at_1" else metric,
              *[m.removeprefix("val_") for m in extra], "steps", "status"]
    body = []
    for r in rows:
        cells = [r.trial_id + (" *" if best is not None and r.trial_id == best.trial_id else "")]
        cells += [fmt(r.values[p]) if p in r.values else "-" for p in space]
        cells += [f"{r.metric:.4f}" if r.metric is not None else "-"]
        cells += [f"{r.objectives[m]:.4f}" if m in r.objectives else "-" for m in extra]
        cells += [str(r.steps) if r.steps is not None else "-", r.status]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(c) for c in body]
    if best is not None:
        out.append(f"* best: {best.trial_id} ({metric}={best.metric:.4f})")
    return "\n".join(out) + "\n"


def table_csv(rows: list[TrialRow], space: Mapping[str, SearchDim], metric: str,
              confirmed: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """One line per trial; with `confirmed` ({trial_id: {"mean": {m: x}, "se": {m: x}, "seeds": n}}, the
    confirmation runs of a two-objective search) each objective's mean and standard error over seeds."""
    objs = sorted({m for c in (confirmed or {}).values() for m in c.get("mean", {})})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", *space, metric, "steps", "status", "train_workers", "error",
                *([f"{m}_{s}" for m in objs for s in ("mean", "se")] + ["confirm_seeds"] if objs else [])])
    for r in rows:
        c = (confirmed or {}).get(r.trial_id)
        conf = [] if not objs else ["" for _ in range(2 * len(objs) + 1)] if c is None else [
            *["" if c[s].get(m) is None else c[s][m] for m in objs for s in ("mean", "se")], c.get("seeds", "")]
        w.writerow([r.trial_id, *[r.values.get(p, "") for p in space],
                    "" if r.metric is None else r.metric, "" if r.steps is None else r.steps, r.status,
                    "" if r.train_workers is None else r.train_workers, r.error or "", *conf])
    return buf.getvalue()


def plot_png(rows: list[TrialRow], space: Mapping[str, SearchDim], metric: str, best: TrialRow | None,
             title: str = "") -> bytes:
    """One panel per searched key: the metric of every scored trial against the value it used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    paths = list(space)
    names = short_names(paths)
    ncols = min(4, len(paths))
    nrows = (len(paths) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    scored = [r for r in rows if r.metric is not None and r.status != PENDING]
    styles = {COMPLETED: dict(marker="o", color="tab:blue"), STOPPED: dict(marker="x", color="tab:orange"),
              RUNNING: dict(marker="s", color="tab:gray"), ERROR: dict(marker="v", color="tab:red")}
    for i, path in enumerate(paths):
        ax = axes[i // ncols][i % ncols]
        dim = space[path]
        cats = [str(v) for v in dim.values] if dim.kind == "choice" and not is_log(dim) else None
        for status, style in styles.items():
            pts = [(r.values[path], r.metric) for r in scored if r.status == status and path in r.values]
            if not pts:
                continue
            xs = [cats.index(str(x)) if cats else x for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], label=status, s=36, **style)
        if best is not None and path in best.values:
            bx = cats.index(str(best.values[path])) if cats else best.values[path]
            ax.scatter([bx], [best.metric], marker="*", s=220, facecolors="none", edgecolors="tab:red",
                       linewidths=1.5, label="best")
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=30)
        elif dim.kind == "loguniform":  # the x range is the searched range
            lo, hi = float(dim.low), float(dim.high)
            if dim.zero:  # 0 (term off) sits left of the log-spaced range
                ax.set_xscale("symlog", linthresh=lo)
                ax.set_xlim(-0.3 * lo, hi * 1.3)
            else:
                ax.set_xscale("log")
                ax.set_xlim(lo / 1.3, hi * 1.3)
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif dim.kind in ("uniform", "randint"):
            pad = 0.05 * (float(dim.high) - float(dim.low))
            ax.set_xlim(float(dim.low) - pad, float(dim.high) + pad)
        elif is_log(dim):
            ax.set_xscale("log")
        ax.set_xlabel(names[path])
        ax.set_ylabel("R@1" if metric == "val_r_at_1" else metric)
        ax.grid(alpha=0.3)
    for j in range(len(paths), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(title or f"{metric} per trial vs each searched value")
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def best_config(base: GammarayConfig, best: TrialRow, run_name: str) -> GammarayConfig:
    """The base config (as the user gave it, without tune.trial_overrides) with the best values,
    under its own run name so training it never resumes some other run."""
    return apply_overrides(base, {**best.values, "run.name": run_name})


def best_config_yaml(cfg: GammarayConfig, best: TrialRow, experiment: str, metric: str) -> str:
    lines = [f"# best trial {best.trial_id} of Ray Tune experiment {experiment}: {metric}={best.metric:.4f} "
             f"after {best.steps} steps", "# train it: gammaray pretrain --config THIS_FILE"]
    for path, value in best.values.items():
        lines.append(f"#   {path} = {fmt(value)}")
    return "\n".join(lines) + "\n" + to_yaml(cfg)
