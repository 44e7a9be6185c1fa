"""`gammaray bench structure`: do the structure regularizers keep what only one modality knows?

On the synthetic catalogue (pipelines/synthetic.py: colour + product type in both modalities, pattern +
size only in the image, material + brand (verbatim in the title) and care + warranty (a paraphrase in
the description) only in the text) train, at equal budget (same epochs,
batches, data order, initial weights per seed):

  plain  the base contrastive loss alone
  sep    + lambda_sep * L_sep (deep feature separation)
  br     + lambda_br * L_br (Brownian bridge)
  gc     + lambda_gc * L_gc (geometric consistency, with its augmented form)
  all    all three

for each model kind and seed. The base is L_con = 1/4 (V2T + T2V + V2V + T2T) (`--base lcon`, the
paper's) or the cross-modal term alone (`--base clip`). Then, on frozen embeddings of the held-out
split: retrieval R@1 (mean of image->text and text->image), linear-probe accuracy (logistic regression
fitted on the training split's embeddings) for image-only attributes from the image embedding,
text-only attributes from the text embedding and shared attributes from both, and the modality gap
(distance between the two modalities' centroids).

Training runs in one process with the library code of workers/ (workers/training/inprocess.py: build_model,
Objective, the same AdamW groups, warm-up + cosine schedule and gradient clipping as the DeepSpeed
engine) over the records `gammaray prepare` writes, preprocessed by pipelines/preprocess.py
(augmentations keyed by seed, epoch and sample_index). Ray and DeepSpeed are left out: they do not
change the maths and would only add start-up time to 30 short runs.

Text-only attributes: `probe_text_only` is the mean over care and warranty, which only a paraphrase in
the description carries; material and brand (verbatim in the title, about 1.00 for every model) are in
the details file.

Writes `--json PATH` (one row per variant x model x seed with the issue's keys), a PNG beside it,
PATH with `.details.json` (per-attribute accuracies, probes on [shared, specific] features, timings,
the configuration) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

VARIANTS = ("plain", "sep", "br", "gc", "all")
MODELS = ("two_tower", "fusion")
ROW_KEYS = ("variant", "model", "seed", "r_at_1", "probe_image_only", "probe_text_only", "probe_shared",
            "modality_gap")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gammaray.app.commands import add_config_args

    p.add_argument("--json", metavar="PATH", required=True, help="write the result rows here (JSON list)")
    p.add_argument("--png", metavar="PATH", help="plot (default: PATH of --json with .png)")
    p.add_argument("--models", default="two_tower", help="comma-separated: two_tower,fusion (default two_tower)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of plain,sep,br,gc,all")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs per run (default 4)")
    p.add_argument("--n-train", type=int, default=3000, help="synthetic training products (default 3000)")
    p.add_argument("--n-val", type=int, default=500, help="synthetic held-out products (default 500)")
    p.add_argument("--base", choices=["lcon", "clip"], default="lcon",
                   help="base loss: lcon = 1/4 (V2T+T2V+V2V+T2T) (default), clip = cross-modal only")
    p.add_argument("--loss", default="infonce", choices=["infonce", "gamma", "sogclr", "siglip"],
                   help="cross-modal term (default infonce, as in the paper)")
    p.add_argument("--lambda-sep", type=float, default=1.0, help="weight of L_sep in sep and all (default 1)")
    p.add_argument("--lambda-br", type=float, default=1.0, help="weight of L_br in br and all (default 1)")
    p.add_argument("--lambda-gc", type=float, default=1.0, help="weight of L_gc in gc and all (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train the (model, seed) groups in this many processes at once (default 1; on a GPU the "
                        "tiny models leave room for several)")
    p.add_argument("--workdir", help="keep the generated catalogue here (default: a temporary directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(p)


# --------------------------------------------------------------------------------------------
# data: the synthetic catalogue, prepared by the pipeline code, held in memory (workers/training/inprocess.py)


def make_catalogue(workdir: str, n_train: int, n_val: int, progress: bool, n_test: int = 0) -> dict:
    """Generate (seed 0), prepare and load the synthetic catalogue: {"train", "val"[, "test"]: Split,
    "tokenizer": uri}. The same sizes give the same records, so a search on train/val and a
    confirmation on test (`bench tune-structure`) see one catalogue."""
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.synthetic import write_raw_catalogue
    from pipelines.tokenizer import build_for_catalogue
    from workers.training.inprocess import load_split

    raw = os.path.join(workdir, "raw")
    paths = write_raw_catalogue(raw, n_train=n_train, n_val=n_val, seed=0, bad_records=0, n_test=n_test)
    opts = PrepareOptions(progress=progress)
    res = {s: prepare(paths[s], os.path.join(workdir, "catalog", s), opts) for s in paths}
    tok = os.path.join(workdir, "catalog", "tokenizer")
    if not os.path.exists(os.path.join(tok, "tokenizer_config.json")):
        build_for_catalogue(os.path.join(workdir, "catalog", "train"), tok, res["train"].manifest, vocab_size=1000)
    out: dict = {s: load_split(os.path.join(workdir, "catalog", s)) for s in paths}
    out["tokenizer"] = tok
    return out


def variant_overrides(variant: str, args) -> dict:
    lam = {"sep": {"loss.structure.lambda_sep": args.lambda_sep},
           "br": {"loss.structure.lambda_br": args.lambda_br},
           "gc": {"loss.structure.lambda_gc": args.lambda_gc}}
    out = {}
    if variant == "all":
        for v in lam.values():
            out.update(v)
    elif variant != "plain":
        out.update(lam[variant])
    return out


# --------------------------------------------------------------------------------------------
# frozen-embedding evaluation


def linear_probe(x_train, y_train, x_test, y_test, l2: float = 1e-3, iters: int = 100) -> float:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, float64).

    Single-threaded: these tensors are tiny, and intra-op threads only add synchronisation."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _linear_probe(x_train, y_train, x_test, y_test, l2, iters)
    finally:
        torch.set_num_threads(threads)


def _linear_probe(x_train, y_train, x_test, y_test, l2: float, iters: int) -> float:
    import torch

    xt = torch.as_tensor(x_train, dtype=torch.float64)
    xe = torch.as_tensor(x_test, dtype=torch.float64)
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt, xe = (xt - mu) / sd, (xe - mu) / sd
    yt = torch.as_tensor(y_train, dtype=torch.long)
    k = int(max(int(yt.max()), int(max(y_test))) + 1)
    w = torch.zeros(xt.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xe @ w + b).argmax(1).numpy()
    return float((pred == y_test).mean())


def label_ids(fit: list, test: list) -> tuple:
    """String labels -> class indices of the fitting split (a class it never saw is -1: a miss)."""
    import numpy as np

    classes = {c: i for i, c in enumerate(sorted(set(fit)))}
    return np.asarray([classes[v] for v in fit]), np.asarray([classes.get(v, -1) for v in test])


def evaluate_run(emb_train: dict, emb_val: dict, train, val) -> tuple[dict, dict]:
    import numpy as np
    import torch

    from pipelines.synthetic import IMAGE_ONLY, SHARED, TEXT_ONLY, TEXT_VERBATIM
    from workers.evaluation.metrics import modality_gap, retrieval_metrics

    vi, vt = torch.from_numpy(emb_val["image"]), torch.from_numpy(emb_val["text"])
    r = retrieval_metrics(vi, vt, ks=(1, 5))
    details: dict = {"r_at_1_i2t": r["r_at_1_i2t"], "r_at_1_t2i": r["r_at_1_t2i"], "r_at_5_i2t": r["r_at_5_i2t"],
                     "r_at_5_t2i": r["r_at_5_t2i"], "chance_r_at_1": r["chance_r_at_1"]}

    def probe(modality: str, attr: str, feats: str = "shared") -> float:
        xtr, xva = emb_train[modality], emb_val[modality]
        if feats == "concat":
            xtr = np.concatenate([xtr, emb_train[f"{modality}_specific"]], 1)
            xva = np.concatenate([xva, emb_val[f"{modality}_specific"]], 1)
        ytr, yva = label_ids(train.labels[f"attr:{attr}"], val.labels[f"attr:{attr}"])
        return linear_probe(xtr, ytr, xva, yva)

    acc = {}
    for attr in IMAGE_ONLY + SHARED:
        acc[f"image/{attr}"] = probe("image", attr)
    for attr in TEXT_ONLY + TEXT_VERBATIM + SHARED:
        acc[f"text/{attr}"] = probe("text", attr)
    details["probe"] = acc
    if "image_specific" in emb_train:
        details["probe_concat_specific"] = {
            **{f"image/{a}": probe("image", a, "concat") for a in IMAGE_ONLY},
            **{f"text/{a}": probe("text", a, "concat") for a in TEXT_ONLY},
        }
    row = {
        "r_at_1": 0.5 * (r["r_at_1_i2t"] + r["r_at_1_t2i"]),
        "probe_image_only": float(np.mean([acc[f"image/{a}"] for a in IMAGE_ONLY])),
        "probe_text_only": float(np.mean([acc[f"text/{a}"] for a in TEXT_ONLY])),
        "probe_shared": float(np.mean([acc[f"{m}/{a}"] for m in ("image", "text") for a in SHARED])),
        "modality_gap": modality_gap(vi, vt),
    }
    return row, details


# --------------------------------------------------------------------------------------------
# the benchmark


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_group(job: dict) -> tuple[list[dict], list[dict]]:
    """Every variant of one (model kind, seed), trained side by side on the same batches; then the
    frozen-embedding evaluation of each. Runs in the main process or in a worker process (--jobs)."""
    import numpy as np
    import torch

    from gammaray.config import apply_overrides, from_dict
    from pipelines.tokenizer import load as load_tokenizer
    from workers.training.inprocess import LocalRun, preprocess

    args = argparse.Namespace(**job["args"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = _device(args.device)
    base_cfg = from_dict(job["config"])
    train, val, tok_uri = job["train"], job["val"], job["tokenizer"]
    model_kind, seed, total_steps = job["model"], job["seed"], job["total_steps"]
    tokenizer = load_tokenizer(tok_uri)
    eval_train = preprocess(train, tokenizer, tok_uri, base_cfg, 0, 0, train=False, with_aug=False)
    eval_val = preprocess(val, tokenizer, tok_uri, base_cfg, 0, 0, train=False, with_aug=False)
    B = base_cfg.data.batch_size
    runs = {}
    for v in job["variants"]:
        ov = {"model.kind": model_kind, "loss.kind": args.loss, "run.seed": seed,
              "loss.structure.in_modal": args.base == "lcon", **variant_overrides(v, args)}
        cfg = apply_overrides(base_cfg, ov)
        runs[v] = LocalRun(cfg, seed, len(tokenizer), tokenizer.pad_token_id, train.size, total_steps, device)
    needs_aug = any(r.objective.needs_augmented_views for r in runs.values())
    progress = job.get("progress")
    for epoch in range(args.epochs):
        order = np.random.default_rng([seed, epoch, 7]).permutation(train.size)
        data = preprocess(train, tokenizer, tok_uri, base_cfg, seed, epoch, train=True, with_aug=needs_aug, order=order)
        tensors = {k: torch.from_numpy(v) for k, v in data.items()}
        for s in range(0, train.size, B):
            for v, r in runs.items():
                keys = [k for k in tensors if r.objective.needs_augmented_views or not k.endswith("_aug")]
                r.train_step({k: tensors[k][s:s + B].to(device, non_blocking=True) for k in keys})
            if progress is not None:
                progress.update(len(runs))
    rows, details = [], []
    for v, r in runs.items():
        t0 = time.perf_counter()
        row, det = evaluate_run(r.embed(eval_train), r.embed(eval_val), train, val)
        row = {"variant": v, "model": model_kind, "seed": seed, **row}
        rows.append({k: row[k] for k in ROW_KEYS})
        details.append({**row, **det, "train_s": round(r.train_s, 1), "eval_s": round(time.perf_counter() - t0, 1),
                        "last_terms": r.last, "structure": r.cfg.loss.structure.model_dump(mode="json")})
    return rows, details


def _write_partial(path: str, rows: list[dict]) -> None:
    """Rows so far (a long run stopped early still leaves its finished groups)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(rows, f, indent=1)


def _row_line(row: dict, train_s: float) -> str:
    return (f"   {row['model']:<9} {row['variant']:<5} seed {row['seed']}: R@1 {row['r_at_1']:.3f}  image-only "
            f"{row['probe_image_only']:.3f}  text-only {row['probe_text_only']:.3f}  shared {row['probe_shared']:.3f}"
            f"  gap {row['modality_gap']:.3f}  ({train_s:.0f} s training)")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from gammaray.app.commands import config_from_args

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"--models: unknown model kind {m!r} (choose from {', '.join(MODELS)})")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    device = _device(args.device)
    base_cfg = config_from_args(args)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="gammaray-bench-structure-") as tmp:
        workdir = args.workdir or tmp
        print(f"== synthetic catalogue: {args.n_train} train + {args.n_val} held-out products -> {workdir}", flush=True)
        cat = make_catalogue(workdir, args.n_train, args.n_val, progress=not args.quiet)
        train, val, tok_uri = cat["train"], cat["val"], cat["tokenizer"]
        B = base_cfg.data.batch_size
        steps_per_epoch = math.ceil(train.size / B)
        total_steps = steps_per_epoch * args.epochs
        groups = [(m, seed) for m in models for seed in range(args.seeds)]
        jobs = max(1, min(args.jobs, len(groups)))
        print(f"== {len(groups) * len(variants)} runs: models {models}, variants {variants}, seeds 0..{args.seeds - 1}, "
              f"{args.epochs} epochs x {steps_per_epoch} steps of {B}, base {args.base}, loss {args.loss}, "
              f"device {device}, {jobs} process(es)", flush=True)
        plain_args = {k: v for k, v in vars(args).items() if k != "func"}
        specs = [{"args": plain_args, "config": base_cfg.model_dump(mode="json"), "train": train, "val": val,
                  "tokenizer": tok_uri, "model": m, "seed": seed, "variants": variants, "total_steps": total_steps,
                  "threads": max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None} for m, seed in groups]
        rows, details = [], []
        if jobs == 1:
            bar = tqdm(total=len(groups) * len(variants) * total_steps, disable=args.quiet, unit="step",
                       dynamic_ncols=True)
            for spec in specs:
                spec["progress"] = bar
                r, d = run_group(spec)
                spec.pop("progress")
                rows += r
                details += d
                for row in d:
                    bar.write(_row_line(row, row["train_s"]))
                _write_partial(args.json, rows)
            bar.close()
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(run_group, spec): spec for spec in specs}
                for fut in tqdm(as_completed(futures), total=len(futures), disable=args.quiet, unit="group"):
                    r, d = fut.result()
                    rows += r
                    details += d
                    for row in d:
                        print(_row_line(row, row["train_s"]), flush=True)
                    _write_partial(args.json, rows)
        order = {(m, s, v): i for i, (m, s, v) in enumerate((m, s, v) for m, s in groups for v in variants)}
        rows.sort(key=lambda r: order[(r["model"], r["seed"], r["variant"])])
        details.sort(key=lambda r: order[(r["model"], r["seed"], r["variant"])])

    wall = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    if os.path.exists(args.json + ".partial"):
        os.remove(args.json + ".partial")
    stem = os.path.splitext(args.json)[0]
    meta = {"command_args": {k: v for k, v in vars(args).items() if k != "func"}, "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "wall_s": round(wall, 1), "steps_per_run": total_steps,
            "chance": {"probe_image_only": 0.5 * (1 / 4 + 1 / 2), "probe_text_only": 0.5 * (1 / 4 + 1 / 4),
                       "probe_shared": 0.5 * (1 / 8 + 1 / 6), "r_at_1": 1 / val.size},
            "runs": details}
    with open(stem + ".details.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)
    png = args.png or stem + ".png"
    plot(rows, png)
    print(format_table(rows))
    print(verdict(rows))
    print(f"   wall time {wall:.0f} s on {meta['device_name']}; rows -> {args.json}, plot -> {png}, "
          f"details -> {stem}.details.json")
    return 0


# --------------------------------------------------------------------------------------------
# summaries


METRICS = ("r_at_1", "probe_image_only", "probe_text_only", "probe_shared", "modality_gap")


def summarize(rows: list[dict]) -> dict:
    import numpy as np

    out: dict = {}
    for r in rows:
        out.setdefault((r["model"], r["variant"]), []).append(r)
    return {k: {m: (float(np.mean([r[m] for r in v])), float(np.std([r[m] for r in v])), len(v)) for m in METRICS}
            for k, v in out.items()}


def format_table(rows: list[dict]) -> str:
    s = summarize(rows)
    head = f"   {'model':<10}{'variant':<8}" + "".join(f"{m:>20}" for m in METRICS)
    lines = ["", "== mean +- std over seeds (held-out split; probes: linear, on frozen embeddings)", head]
    for (model, variant), v in s.items():
        lines.append(f"   {model:<10}{variant:<8}" + "".join(f"{v[m][0]:>13.3f} +-{v[m][1]:.3f}" for m in METRICS))
    return "\n".join(lines)


def paired_gains(rows: list[dict], metric: str) -> dict:
    """(model, variant) -> per-seed differences to plain of the same model and seed."""
    plain = {(r["model"], r["seed"]): r[metric] for r in rows if r["variant"] == "plain"}
    out: dict = {}
    for r in rows:
        if r["variant"] != "plain" and (r["model"], r["seed"]) in plain:
            out.setdefault((r["model"], r["variant"]), []).append(r[metric] - plain[(r["model"], r["seed"])])
    return out


def verdict(rows: list[dict], margin: float = 0.02) -> str:
    """A regularizer beats plain 'by a clear margin' on an attribute group when it gains at least
    `margin` on average over seeds and gains on every seed (paired with plain's run of that seed)."""
    import numpy as np

    lines = [f"\n== gains over plain on modality-specific attributes (paired by seed; clear = mean >= {margin} "
             f"and > 0 on every seed)"]
    any_clear = False
    for metric in ("probe_image_only", "probe_text_only"):
        for (model, variant), d in sorted(paired_gains(rows, metric).items()):
            clear = np.mean(d) >= margin and min(d) > 0
            any_clear |= clear
            lines.append(f"   {metric:<17} {model:<10}{variant:<5} mean {np.mean(d):+.3f}  per seed "
                         f"{' '.join(f'{x:+.3f}' for x in d)}  {'CLEAR' if clear else ''}")
    lines.append("   verdict: " + ("some regularizer beats plain by a clear margin" if any_clear
                                   else "no regularizer beats plain by a clear margin"))
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = summarize(rows)
    models = sorted({m for m, _ in s}, key=MODELS.index)
    variants = [v for v in VARIANTS if any((m, v) in s for m in models)]
    titles = {"r_at_1": "retrieval R@1 (held-out)", "probe_image_only": "probe: image-only attrs (image emb.)",
              "probe_text_only": "probe: text-only attrs (text emb.)", "probe_shared": "probe: shared attrs",
              "modality_gap": "modality gap (centroid distance)"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    width = 0.8 / max(1, len(models))
    for ax, metric in zip(axes, METRICS):
        for i, model in enumerate(models):
            mean = [s.get((model, v), {metric: (np.nan, 0, 0)})[metric][0] for v in variants]
            std = [s.get((model, v), {metric: (np.nan, 0, 0)})[metric][1] for v in variants]
            x = np.arange(len(variants)) + (i - (len(models) - 1) / 2) * width
            ax.bar(x, mean, width, yerr=std, capsize=3, label=model)
            for seed_row in rows:
                if seed_row["model"] == model and seed_row["variant"] in variants:
                    ax.plot(x[variants.index(seed_row["variant"])], seed_row[metric], "k.", ms=5, zorder=3)
        ax.set_xticks(np.arange(len(variants)), variants)
        ax.set_title(titles[metric], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(f"structure regularizers on the synthetic catalogue (mean +- std over {n_seeds} seeds, dots = seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
