"""`gammaray bench recipe`: which contrastive loss, with which settings, at which micro-batch?

The study behind the loss defaults. On real image-text data sets that a package registry ships
(pipelines/public_catalogues.py: `openclipart`, Debian's clip art; `emoji`, npm's Noto emoji with
their CLDR names and keywords) and on the project's synthetic catalogue, each split three ways with
a fixed seed (train / val for tuning / test for the figures, never seen by the tuning):

  regime `locked` (the default, the only one that fits a CPU): pretrained EfficientNet-Lite0 and
  all-MiniLM-L6-v2 towers, locked; their pooled features are computed once per record with
  `gammaray embed --features` (Ray Data) and the heads (+ temperature) train on them in one process
  (workers/training/heads.py) for `--epochs` epochs at every micro-batch, each loss with

    settings "default": the shipped defaults of the config tree, and
    settings "tuned":   its own hyperparameters searched with `gammaray tune` (Ray Tune, Optuna TPE,
                        ASHA on validation R@1; heads trials) at the same trial budget for every loss,
                        separately at each micro-batch,

  then `--seeds` seeds per cell evaluated on the test split: R@1 and R@5 (means of image->text and
  text->image; ties count against) and zero-shot category accuracy, at the end of training (no
  early stopping on the test split).

Losses (`--losses`): infonce (CLIP, in-batch negatives of one worker), siglip, sogclr, gamma. InfoNCE
with gathered negatives at 2 workers x micro-batch B is, by construction and by test
(tests/test_loss_distributed.py), the same loss and gradient as InfoNCE at batch 2B in one process;
its rows (`infonce_gather2`) are the InfoNCE runs at 2B, reported at B.

Writes `--json PATH` (one row per run: {dataset, regime, loss, settings, batch_size, seed, epochs,
steps, r_at_1, r_at_5, zero_shot_acc, peak_mem_mb, wall_s}), PATH with .png (R@1 against micro-batch,
a line per loss, mean and spread over seeds), PATH with .tuning.json (every search: space, trials,
best values) and PATH with .details.json (per-run curves, every 5th epoch and the last, with the
memory diagnostics). `--quick` runs a tiny grid (CI). Data and features are cached under `--cache` (default ~/.cache/gammaray/recipe).

Length (about 700 lines): one study, read top to bottom: data, regimes, the grid, tuning, ablations and
the report that the docs generate from its JSON; the live regime is in recipe_live.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from gammaray.app.benchmarks.common import peak_rss, pretrained_towers, reset_peak_rss

DATASETS = ("openclipart", "emoji", "synthetic")
LOSSES = ("infonce", "siglip", "sogclr", "gamma")
BATCH_SIZES = (8, 16, 32, 64, 128, 256)
# (validation, test) records per data set: the rest trains
SPLITS = {"openclipart": (500, 500), "emoji": (300, 400), "synthetic": (500, 500)}
SYNTHETIC_TRAIN = 3000
IMAGE_SIZE = 224          # the locked image tower's input (its features are computed once)
QUICK_IMAGE_SIZE = 64
ROW_KEYS = ("dataset", "regime", "loss", "settings", "batch_size", "seed", "epochs", "steps", "r_at_1", "r_at_5",
            "zero_shot_acc", "peak_mem_mb", "wall_s")


def default_cache() -> str:
    from pipelines.public_catalogues import cache_dir

    return os.path.join(cache_dir(), "recipe")


# --------------------------------------------------------------------------------------------
# data: raw splits -> prepared catalogues -> feature stores


def raw_splits(dataset: str, cache: str, quick: bool = False) -> dict[str, str]:
    from pipelines import public_catalogues as pc

    out = os.path.join(cache, dataset + ("-quick" if quick else ""), "raw")
    n_val, n_test = SPLITS[dataset]
    if quick:
        n_val, n_test = 60, 60
    if dataset == "synthetic":
        return pc.synthetic_splits(out, 240 if quick else SYNTHETIC_TRAIN, n_val, n_test, seed=0)
    if os.path.exists(os.path.join(out, "test.jsonl")):
        return {s: os.path.join(out, f"{s}.jsonl") for s in ("train", "val", "test")}
    records = pc.openclipart_all(pc.cache_dir()) if dataset == "openclipart" else pc.emoji_all(pc.cache_dir())
    if quick:
        records = [records[i] for i in np.random.default_rng(0).permutation(len(records))[:360]]
    return pc.write_splits(records, out, n_val, n_test, seed=0)


def prepared(dataset: str, cache: str, quick: bool = False) -> dict[str, str]:
    """The three splits through `gammaray prepare` (validated, sample_index, shards, quarantine)."""
    from pipelines.prepare import PrepareOptions, prepare

    base = os.path.join(cache, dataset + ("-quick" if quick else ""), "catalog")
    raw = raw_splits(dataset, cache, quick)
    out = {}
    for split, path in raw.items():
        dst = os.path.join(base, split)
        if not os.path.exists(os.path.join(dst, "manifest.json")):
            res = prepare(path, dst, PrepareOptions(progress=False))
            print(f"recipe: {dataset} {split}: {res.num_written} records prepared, {res.num_quarantined} quarantined "
                  f"{res.quarantine_by_reason or ''}", flush=True)
        out[split] = dst
    return out


def locked_base(cache: str, image_size: int = 224, max_tokens: int = 48):
    """The config of the locked regime: pretrained towers, locked; everything else the defaults."""
    from gammaray.config import load

    image, text = pretrained_towers(cache)
    return load(None, {"model.image.pretrained": image, "model.text.pretrained": text, "model.text.pooling": "mean",
                       "data.tokenizer": text, "data.image_size": image_size, "data.max_text_tokens": max_tokens,
                       "model.image.locked": True, "model.text.locked": True})


def feature_stores(dataset: str, cache: str, quick: bool = False, image_size: int = 224) -> dict[str, str]:
    """Cached pooled tower features of every split (`gammaray embed --features`, Ray Data)."""
    from workers.evaluation.embed import EmbedOptions, embed_catalogue

    cats = prepared(dataset, cache, quick)
    base = locked_base(cache, image_size)
    out = {}
    for split, cat in cats.items():
        dst = os.path.join(cache, dataset + ("-quick" if quick else ""), f"features-{image_size}", split)
        if not os.path.exists(os.path.join(dst, "prompts.parquet")):
            res = embed_catalogue(None, cat, dst, EmbedOptions(progress=False, batch_size=64), features=True,
                                  config=base)
            print(f"recipe: {dataset} {split}: features of {res.records_written} records "
                  f"({res.records_quarantined} quarantined) in {res.wall_s:.0f} s", flush=True)
        out[split] = dst
    return out


# --------------------------------------------------------------------------------------------
# the losses and their search spaces

_COMMON = {
    "train.optim.lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-1},
    "model.temperature": {"kind": "loguniform", "low": 0.01, "high": 0.2},
    "model.learn_temperature": {"kind": "choice", "values": [True, False]},
}
_MEMORY = {
    "loss.gamma.gamma": {"kind": "loguniform", "low": 0.01, "high": 1.0},
    "loss.gamma.gamma_schedule": {"kind": "choice", "values": ["constant", "cosine"]},
    "loss.gamma.gamma_min": {"kind": "loguniform", "low": 0.01, "high": 1.0},
}
SPACES = {
    "infonce": dict(_COMMON),
    "siglip": dict(_COMMON),
    "sogclr": {**_COMMON, **_MEMORY},
    "gamma": {**_COMMON, **_MEMORY, "loss.gamma.alpha": {"kind": "uniform", "low": 0.5, "high": 2.0},
              "loss.gamma.include_positive": {"kind": "choice", "values": [False, True]}},
}
# one-key changes of the tuned gamma settings, measured at one micro-batch (--ablation-batch)
ABLATIONS = {
    "mode=sample": {"loss.gamma.mode": "sample"},
    "include_positive": {"loss.gamma.include_positive": True},
    "rescale_memory": {"loss.gamma.rescale_memory": True},
    "gamma=1 (no memory)": {"loss.gamma.gamma": 1.0, "loss.gamma.gamma_schedule": "constant"},
    "alpha=1": {"loss.gamma.alpha": 1.0},
    "learned temperature": {"model.learn_temperature": True},
    "fixed temperature": {"model.learn_temperature": False},
    "cosine over half the run": {"loss.gamma.gamma_schedule": "cosine", "loss.gamma.gamma_decay_fraction": 0.5},
}


def loss_config(base, loss: str, batch_size: int, seed: int, epochs: int, settings: dict | None = None):
    from gammaray.config import apply_overrides

    over = {"loss.kind": loss, "data.batch_size": batch_size, "run.seed": seed, "train.epochs": epochs,
            "loss.gamma.track_age": True}  # the study reports the memory's age (gamma/memory_age_mean)
    over.update(settings or {})
    return apply_overrides(base, over)


# --------------------------------------------------------------------------------------------
# one run (a pool process: one torch thread)

_FEATURES: dict[str, object] = {}


def _features(uri: str):
    from workers.evaluation.features import load_feature_store

    if uri not in _FEATURES:
        _FEATURES[uri] = load_feature_store(uri)
    return _FEATURES[uri]


def run_cell(job: dict) -> dict:
    """Train one (dataset, loss, settings, batch, seed) on the train split; evaluate on the test split
    at the end of training (and keep the validation curve)."""
    import torch

    if job["regime"] != "locked":
        from .recipe_live import run_live_cell

        return run_live_cell(job)

    from gammaray.config import from_dict
    from workers.evaluation.heads import evaluate_heads
    from workers.training.heads import train_heads

    torch.set_num_threads(1)
    cfg = from_dict(job["config"])
    train, val, test = (_features(job["stores"][s]) for s in ("train", "val", "test"))
    base = reset_peak_rss()
    res = train_heads(cfg, train, val, diagnostics=job.get("diagnostics", True))
    peak = peak_rss() - base
    final = evaluate_heads(res.model, test)
    row = {"dataset": job["dataset"], "regime": job["regime"], "loss": job["loss"], "settings": job["settings"],
           "batch_size": cfg.data.batch_size, "seed": cfg.run.seed, "epochs": res.epochs, "steps": res.steps,
           "r_at_1": final["r_at_1"], "r_at_5": final["r_at_5"], "zero_shot_acc": final.get("zero_shot_acc"),
           "peak_mem_mb": round(peak / 2**20, 2), "wall_s": round(res.train_s, 2)}
    if job.get("label"):
        row["variant"] = job["label"]
    keep = ("step", "epoch", "loss", "logit_scale", "val_r_at_1", "val_r_at_5", "val_zero_shot_acc",
            "gamma/memory_age_mean", "gamma/log_memory_over_exact_mean", "gamma/log_memory_over_exact_std",
            "gamma/log_memory_over_exact_abs", "gamma/gamma_t", "gamma/weight_mean")
    row["_curve"] = [{k: m[k] for k in keep if k in m} for m in res.history]
    row["_test"] = final
    return row


# --------------------------------------------------------------------------------------------
# tuning: `gammaray tune` (heads trials) per (data set, loss, micro-batch), the same budget for all


def tune_cell(base, stores: dict[str, str], dataset: str, loss: str, batch_size: int, epochs: int, trials: int,
              experiments: str, cpus: int) -> dict:
    """Search SPACES[loss] on the validation split; returns {"values": best values, "val_r_at_1", "trials"}.
    The shipped defaults are the first trial (points_to_evaluate=[{}]) for every loss alike."""
    from gammaray.config import apply_overrides
    from tuning.search import run_tune

    cfg = loss_config(base, loss, batch_size, 0, epochs)
    cfg = apply_overrides(cfg, {
        "data.features.train": stores["train"], "data.features.val": stores["val"],
        "run.storage": experiments, "run.name": f"{dataset}-{loss}-b{batch_size}",
        "tune.space": SPACES[loss], "tune.samples": trials, "tune.trial_cpus": 1, "tune.max_concurrent": cpus,
        "tune.points_to_evaluate": [{}], "tune.seed": 0,
        # ASHA rungs from a quarter of the run: a trial is judged after several epochs, not one
        "tune.asha.grace_period": max(1, epochs * math.ceil(_count(stores["train"]) / batch_size) // 4),
    })
    out = run_tune(cfg, progress=False, log=lambda s: None)
    best = out.best
    return {"values": dict(best.values) if best else {}, "val_r_at_1": best.metric if best else None,
            "trials": [{"values": r.values, "val_r_at_1": r.metric, "steps": r.steps, "status": r.status}
                       for r in out.rows], "wall_s": round(out.wall_s, 1)}


def _count(store: str) -> int:
    from pipelines import storage

    n = 0
    for f in storage.list_files(os.path.join(store, "embeddings"), ".parquet"):
        import pyarrow.parquet as pq

        n += pq.ParquetFile(f).metadata.num_rows
    return n


# --------------------------------------------------------------------------------------------
# the study


@dataclass
class Plan:
    datasets: list[str]
    losses: list[str]
    batch_sizes: list[int]
    seeds: list[int]
    epochs: int
    trials: int
    tune_batch_sizes: list[int]
    ablation_batch: int | None
    jobs: int
    quick: bool
    live: dict[str, int] = dataclasses.field(default_factory=dict)   # regime -> epochs (finetune, scratch)
    live_datasets: list[str] = dataclasses.field(default_factory=list)
    live_losses: list[str] = dataclasses.field(default_factory=list)
    live_batch_sizes: list[int] = dataclasses.field(default_factory=list)


def _key(row: dict) -> tuple:
    s = row["settings"]
    return (row["dataset"], row["regime"], row["loss"], json.dumps(s, sort_keys=True), row.get("variant", ""),
            row["batch_size"], row["seed"])


def _differs(values: dict, base) -> dict:
    """The tuned values that differ from the shipped defaults (the row's `settings`)."""
    from gammaray.config import GammarayConfig, get_value

    out, defaults = {}, GammarayConfig()
    for path, v in sorted(values.items()):
        node = get_value(defaults, path)
        if node != v and not (isinstance(v, float) and isinstance(node, float) and math.isclose(v, node)):
            out[path] = v
    return out


def run_study(plan: Plan, cache: str, json_path: str, tuning_path: str, log=print) -> list[dict]:
    import multiprocessing as mp

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, plan.jobs), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
    image_size = QUICK_IMAGE_SIZE if plan.quick else IMAGE_SIZE
    base = locked_base(cache, image_size)
    rows = _read(json_path)
    done = {_key(r) for r in rows}
    tuning = _read_obj(tuning_path)

    stores = {d: feature_stores(d, cache, plan.quick, image_size) for d in plan.datasets}
    # 1. tuning: every loss, the same budget, on the validation split, at each tuned micro-batch
    if plan.trials:
        for d in plan.datasets:
            for loss in plan.losses:
                for B in plan.tune_batch_sizes:
                    key = f"{d}/{loss}/{B}"
                    if key in tuning:
                        continue
                    t0 = time.perf_counter()
                    tuning[key] = tune_cell(base, stores[d], d, loss, B, plan.epochs, plan.trials,
                                            os.path.join(cache, "tune", _stem(tuning_path)), plan.jobs)
                    _write(tuning_path, tuning)
                    log(f"recipe: tuned {key}: val R@1 {tuning[key]['val_r_at_1']:.4f} with "
                        f"{_differs(tuning[key]['values'], base) or 'the defaults'} ({time.perf_counter() - t0:.0f} s)")

    def tuned_for(d: str, loss: str, B: int) -> dict | None:
        if not plan.trials:
            return None
        near = min(plan.tune_batch_sizes, key=lambda b: (abs(math.log(B / b)), b))
        return tuning[f"{d}/{loss}/{near}"]["values"]

    # 2. final runs on the test split
    jobs = []
    for d in plan.datasets:
        for loss in plan.losses:
            for B in plan.batch_sizes:
                for settings_kind in ("default", "tuned") if plan.trials else ("default",):
                    values = tuned_for(d, loss, B) if settings_kind == "tuned" else {}
                    settings = "default" if settings_kind == "default" else _differs(values, base) or {}
                    for seed in plan.seeds:
                        cfg = loss_config(base, loss, B, seed, plan.epochs, values)
                        job = {"dataset": d, "regime": "locked", "loss": loss, "settings": settings,
                               "batch_size": B, "seed": seed, "config": cfg.model_dump(mode="json"), "stores": stores[d]}
                        if _key(job) not in done:
                            jobs.append(job)
        if plan.ablation_batch and plan.trials and "gamma" in plan.losses:
            tuned = tuned_for(d, "gamma", plan.ablation_batch)
            for label, change in ABLATIONS.items():
                values = {**tuned, **change}
                if loss_config(base, "gamma", 16, 0, 1, values) == loss_config(base, "gamma", 16, 0, 1, tuned):
                    continue  # the tuned settings already are this
                for seed in plan.seeds:
                    cfg = loss_config(base, "gamma", plan.ablation_batch, seed, plan.epochs, values)
                    job = {"dataset": d, "regime": "locked", "loss": "gamma", "settings": _differs(values, base),
                           "variant": label, "label": label, "batch_size": plan.ablation_batch, "seed": seed,
                           "config": cfg.model_dump(mode="json"), "stores": stores[d]}
                    if _key(job) not in done:
                        jobs.append(job)
    jobs += live_jobs(plan, cache, done)
    log(f"recipe: {len(jobs)} runs to go ({len(rows)} done), {plan.jobs} at a time")
    if jobs:
        from tqdm.auto import tqdm

        ctx = mp.get_context("spawn")
        with ctx.Pool(plan.jobs, maxtasksperchild=50) as pool:
            for row in tqdm(pool.imap_unordered(run_cell, jobs), total=len(jobs), desc="recipe runs", mininterval=5):
                rows.append(row)
                _write(json_path, rows)
    return rows


def live_jobs(plan: Plan, cache: str, done: set) -> list[dict]:
    """The regimes whose towers train: every loss at its shipped defaults (a search per cell does not
    fit a CPU budget), fewer cells."""
    from .recipe_live import arrays, live_base, scratch_tokenizer

    jobs = []
    for regime, epochs in plan.live.items():
        for d in plan.live_datasets:
            cats = prepared(d, cache, plan.quick)
            root = os.path.join(cache, d + ("-quick" if plan.quick else ""), regime)
            tok = scratch_tokenizer(cats["train"], os.path.join(root, "tokenizer")) if regime == "scratch" else None
            base = live_base(regime, cache, tok)
            data = {s: arrays(base, cats[s], os.path.join(root, f"{s}-{base.data.image_size}.npz"))
                    for s in ("train", "test")}
            for loss in plan.live_losses:
                for B in plan.live_batch_sizes:
                    for seed in plan.seeds:
                        cfg = loss_config(base, loss, B, seed, epochs)
                        job = {"dataset": d, "regime": regime, "loss": loss, "settings": "default", "batch_size": B,
                               "seed": seed, "config": cfg.model_dump(mode="json"), "arrays": data}
                        if _key(job) not in done:
                            jobs.append(job)
    return jobs


def _stem(path: str) -> str:
    """The study's name (its JSON's file name without suffixes): the Tune experiments' folder."""
    return os.path.basename(path).split(".")[0]


def _sibling(path: str, suffix: str) -> str:
    return os.path.splitext(path)[0] + suffix


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data


def _read_obj(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# outputs: rows, details, summary table, plot


def public_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        row = {k: r[k] for k in ROW_KEYS}
        if r.get("variant"):
            row["variant"] = r["variant"]
        out.append(row)
    return sorted(out, key=lambda r: (r["dataset"], r["loss"], str(r["settings"]), r.get("variant", ""),
                                      r["batch_size"], r["seed"]))


def settings_label(r: dict) -> str:
    if r.get("variant"):
        return f"tuned, {r['variant']}"
    return "default" if r["settings"] == "default" else "tuned"


def cells(rows: list[dict], metric: str = "r_at_1", regime: str = "locked") -> dict[tuple, list[float]]:
    """(dataset, loss, settings label, batch) -> the metric per seed, for one regime."""
    out: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get(metric) is None or r["regime"] != regime:
            continue
        out.setdefault((r["dataset"], r["loss"], settings_label(r), r["batch_size"]), []).append(float(r[metric]))
    return out


def mean_std(v: list[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def gathered_rows(rows: list[dict]) -> list[dict]:
    """InfoNCE with negatives gathered over 2 workers at micro-batch B = InfoNCE at 2B in one process."""
    out = []
    for r in rows:
        if r["loss"] == "infonce" and not r.get("variant") and r["batch_size"] % 2 == 0:
            out.append({**r, "loss": "infonce_gather2", "batch_size": r["batch_size"] // 2})
    return out


def summary_table(rows: list[dict], metric: str = "r_at_1", regime: str = "locked") -> str:
    rows = [r for r in rows if not r.get("variant")]  # the ablations have their own table
    c = cells(rows + gathered_rows(rows), metric, regime)
    batches = sorted({k[3] for k in c})
    if not c:
        return ""
    lines = ["| dataset | loss | settings | " + " | ".join(f"B={b}" for b in batches) + " |",
             "|---|---|---|" + "---|" * len(batches)]
    for d, loss, s in sorted({k[:3] for k in c}):
        vals = []
        for b in batches:
            v = c.get((d, loss, s, b))
            vals.append(f"{mean_std(v)[0]:.3f} ± {mean_std(v)[1]:.3f}" if v else "")
        lines.append(f"| {d} | {loss} | {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict], batch: int = 16, big: int = 64) -> list[str]:
    """The issue's test per data set: gamma (shipped defaults) at `batch` against InfoNCE at `batch` and
    at `big`, equal epochs, mean test R@1 ± std over seeds (default and tuned InfoNCE alike); `>=` is
    the comparison of the means only, which the spreads beside it qualify."""
    c = cells(rows)
    out = []
    for d in sorted({k[0] for k in c}):
        g = c.get((d, "gamma", "default", batch))
        if not g:
            continue
        gm, gs = mean_std(g)
        parts = [f"{d}: gamma default @ {batch} = {gm:.4f} ± {gs:.4f}"]
        for s in ("default", "tuned"):
            for b in (batch, big):
                v = c.get((d, "infonce", s, b))
                if v:
                    m, sd = mean_std(v)
                    parts.append(f"InfoNCE {s} @ {b} = {m:.4f} ± {sd:.4f} ({'>=' if gm >= m else '<'})")
        out.append("; ".join(parts))
    return out


def plot(rows: list[dict], png: str, metrics: tuple[str, ...] = ("r_at_1", "zero_shot_acc")) -> None:
    """One column per data set, one row per metric: the metric against the micro-batch, a line per loss
    (solid: tuned, dotted: shipped defaults), mean and std over seeds (locked regime)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("variant")]
    datasets = sorted({r["dataset"] for r in rows if r["regime"] == "locked"})
    if not datasets:
        return
    fig, axes = plt.subplots(len(metrics), len(datasets), figsize=(4.8 * len(datasets), 3.6 * len(metrics) + 0.8),
                             squeeze=False)
    colours = {"infonce": "tab:blue", "infonce_gather2": "tab:cyan", "siglip": "tab:green", "sogclr": "tab:purple",
               "gamma": "tab:red"}
    for i, metric in enumerate(metrics):
        c = cells(rows + gathered_rows(rows), metric)
        for ax, d in zip(axes[i], datasets):
            for loss, s in sorted({k[1:3] for k in c if k[0] == d}):
                bs = sorted(b for (x, l_, ss, b) in c if (x, l_, ss) == (d, loss, s))
                m = [mean_std(c[(d, loss, s, b)])[0] for b in bs]
                e = [mean_std(c[(d, loss, s, b)])[1] for b in bs]
                ax.errorbar(bs, m, yerr=e, marker="o" if s == "tuned" else "x", capsize=2, markersize=4,
                            linestyle="-" if s == "tuned" else ":", color=colours.get(loss, "gray"),
                            label=f"{loss} ({s})", alpha=1.0 if s == "tuned" else 0.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks([4, 8, 16, 32, 64, 128, 256])
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("micro-batch (one worker)")
            ax.set_ylabel(f"test {metric.replace('_', ' ')}")
            ax.set_title(f"{d} (locked towers, heads trained)", fontsize=10)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, 2 * len(datasets) + 1), fontsize=8, frameon=False)
    fig.suptitle("mean ± std over seeds, equal epochs\nsolid: tuned on the validation split; dotted: defaults",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def shipped_defaults() -> dict:
    """The shipped value of every key the study searches or ablates: the "default" rows were made
    with these (tests/test_recipe_defaults.py fails when a default moves away from the study)."""
    from gammaray.config import get_value, load

    cfg = load(None, {})
    keys = sorted({k for space in SPACES.values() for k in space} | {k for a in ABLATIONS.values() for k in a})
    return {k: get_value(cfg, k) for k in keys}


def _rounded(obj, digits: int = 4):
    """Curves at 4 significant digits: the details file stays small enough to commit."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _thinned(curve: list | None, every: int = 5) -> list | None:
    """Every `every`-th epoch's record and the last: the shape of a run, in a file small enough to commit."""
    if not curve:
        return curve
    return [c for i, c in enumerate(curve) if i % every == 0 or i == len(curve) - 1]


def write_outputs(rows: list[dict], json_path: str, command: str) -> None:
    public = public_rows(rows)
    with open(json_path, "w") as f:
        json.dump({"command": command, "defaults": shipped_defaults(), "rows": public}, f, indent=1)
    details = {"command": command,
               "runs": [{**{k: r[k] for k in ROW_KEYS}, "variant": r.get("variant"), "test": _rounded(r.get("_test")),
                         "curve": _rounded(_thinned(r.get("_curve")))} for r in rows]}
    with open(_sibling(json_path, ".details.json"), "w") as f:
        json.dump(details, f, indent=None, default=float)
    plot(rows, _sibling(json_path, ".png"))


# --------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", required=True,
                   help="rows here (+ .png, .tuning.json, .details.json beside it); an existing file is resumed")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated subset of {','.join(LOSSES)}")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES), help="micro-batches (one worker)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of the final runs (default 3)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of every run, equal across micro-batches (default 30)")
    p.add_argument("--tune-trials", type=int, default=24,
                   help="Ray Tune trials per (data set, loss, tuned micro-batch), the same for every loss; 0 = defaults only")
    p.add_argument("--tune-batch-sizes", type=int, nargs="+", default=[16, 64],
                   help="micro-batches searched separately; other micro-batches take the nearest one's values")
    p.add_argument("--ablation-batch", type=int, default=16,
                   help="micro-batch of the one-key ablations of the tuned gamma settings (0 = none)")
    p.add_argument("--jobs", type=int, default=2, help="runs (and Tune trials) at once, one CPU each")
    p.add_argument("--live", metavar="REGIME:EPOCHS", action="append", default=[],
                   help="also train the towers: finetune (the pretrained towers) or scratch (the small default "
                        "towers), e.g. --live scratch:30 --live finetune:5; shipped defaults only")
    p.add_argument("--live-datasets", default="emoji", help="data sets of the --live regimes (default emoji)")
    p.add_argument("--live-losses", default="infonce,gamma", help="losses of the --live regimes")
    p.add_argument("--live-batch-sizes", type=int, nargs="+", default=[16, 64], help="micro-batches of the --live regimes")
    p.add_argument("--cache", metavar="DIR", help="data, features and Tune experiments (CACHE/tune/<json name>/; "
                                                  "default ~/.cache/gammaray/recipe)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: print the markdown tables of an existing --json (what the docs show)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny grid for CI: 360 records per data set, 2 losses x 2 micro-batches, 2 seeds, 2 epochs, 2 trials")


def report(json_path: str) -> str:
    """The markdown the docs show, generated from a committed result file."""
    with open(json_path) as f:
        data = json.load(f)
    rows = data["rows"]
    out = [f"Generated from `{json_path}` by `gammaray bench recipe --json {json_path} --report-only`; "
           f"made by `{data['command']}`.", ""]
    for regime in sorted({r["regime"] for r in rows}, key=lambda r: (r != "locked", r)):
        for metric in ("r_at_1", "r_at_5", "zero_shot_acc"):
            table = summary_table(rows, metric, regime)
            if table:
                out += [f"**{regime}: test {metric}** (mean ± std over seeds; steps differ by micro-batch, epochs do not)",
                        "", table, ""]
    ablation = [r for r in rows if r.get("variant")]
    if ablation:
        c = cells(ablation)
        out += ["**Ablations of the tuned gamma settings** (one key changed, test R@1)", "",
                "| dataset | change | batch | R@1 |", "|---|---|---|---|"]
        for (d, _loss, s, b), v in sorted(c.items()):
            m, sd = mean_std(v)
            out.append(f"| {d} | {s.removeprefix('tuned, ')} | {b} | {m:.3f} ± {sd:.3f} |")
        out.append("")
    out += verdict(rows)
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    import sys

    if args.report_only:
        print(report(args.json))
        return 0

    cache = os.path.abspath(args.cache or default_cache())
    plan = Plan(datasets=args.datasets.split(","), losses=args.losses.split(","), batch_sizes=args.batch_sizes,
                seeds=list(range(args.seeds)), epochs=args.epochs, trials=args.tune_trials,
                tune_batch_sizes=args.tune_batch_sizes, ablation_batch=args.ablation_batch or None,
                jobs=args.jobs, quick=args.quick,
                live={r.split(":")[0]: int(r.split(":")[1]) for r in args.live},
                live_datasets=args.live_datasets.split(","), live_losses=args.live_losses.split(","),
                live_batch_sizes=args.live_batch_sizes)
    for regime in plan.live:
        if regime not in ("finetune", "scratch"):
            raise SystemExit(f"bench recipe: --live {regime}: unknown regime; known: finetune, scratch")
    if args.quick:
        plan = Plan(datasets=plan.datasets, losses=["infonce", "gamma"], batch_sizes=[8, 16], seeds=[0, 1], epochs=2,
                    trials=2, tune_batch_sizes=[16], ablation_batch=None, jobs=plan.jobs, quick=True,
                    live={r: 1 for r in plan.live}, live_datasets=plan.datasets[:1], live_losses=["infonce", "gamma"],
                    live_batch_sizes=[16])
    for name, values, known in (("--datasets", plan.datasets, DATASETS), ("--losses", plan.losses, LOSSES)):
        bad = [v for v in values if v not in known]
        if bad:
            raise SystemExit(f"bench recipe: {name}: unknown {bad}; known: {', '.join(known)}")
    from pipelines.public_catalogues import Unavailable

    keep = []
    for d in plan.datasets:
        try:
            raw_splits(d, cache, plan.quick)
            keep.append(d)
        except Unavailable as err:
            print(f"recipe: {err}", flush=True)
    plan.datasets = keep
    work = _sibling(args.json, ".work.json")
    t0 = time.perf_counter()
    rows = run_study(plan, cache, work, _sibling(args.json, ".tuning.json"))
    command = "gammaray bench recipe " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "recipe"] else sys.argv[1:])
    write_outputs(rows, args.json, command)
    for regime in ("locked", *plan.live):
        print(f"\ntest R@1, regime {regime} (mean ± std over seeds)")
        print(summary_table(rows, "r_at_1", regime))
    for line in verdict(rows):
        print(line)
    print(f"recipe: {len(rows)} runs, {time.perf_counter() - t0:.0f} s; wrote {args.json} (+ .png, .details.json, "
          f".tuning.json)")
    return 0
