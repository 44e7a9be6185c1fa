"""`gammaray bench tune-structure`: does the configuration Ray Tune picked beat plain contrastive on data
the search never saw?

Takes a multi-objective search's outputs (`gammaray tune` with tune.objectives: picked_config.yaml and
baseline_config.yaml, the latter being plain: the base config of the search) and trains each, for
several seeds, exactly as the search's in-process trials did (workers/training/inprocess.py: same model, data,
epochs and schedule; a seed fixes the initial weights, the data order and the augmentations, the same
for both variants). Then, on frozen embeddings of a TEST split (default: `test` beside data.train,
never read by the search, which ranked trials on data.val):

  r_at_1            retrieval R@1, mean of image->text and text->image
  probe_image_only  linear probes fitted on the training split's embeddings, tested on the test split:
  probe_text_only   eval.specific_attributes' image attributes from the image embedding, text ones from
  probe_shared      the text embedding; shared attributes (--shared) from both

Done when, over the seeds, the tuned mean R@1 is at least plain's minus --r1-margin (0.005) and the
tuned mean modality-specific probe ((image-only + text-only) / 2) at least plain's plus --probe-gain
(0.02). Writes --json (rows {variant, seed, r_at_1, probe_image_only, probe_text_only, probe_shared,
config}), a PNG beside it and PATH with .details.json; `--markdown PATH` prints the docs table of an
existing JSON without training.
"""

from __future__ import annotations

import argparse
import json
import os
import time

VARIANTS = ("plain", "tuned")
CATALOGUES = ("synthetic", "openclipart")
OPENCLIPART_IMAGE_SIDE = 96  # stored at the synthetic catalogue's side; the towers see data.image_size (64)
ROW_KEYS = ("variant", "seed", "r_at_1", "probe_image_only", "probe_text_only", "probe_shared", "config")
METRICS = ("r_at_1", "probe_image_only", "probe_text_only", "probe_shared", "probe_specific")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", metavar="DIR",
                   help="the search's output folder: reads picked_config.yaml (tuned) and baseline_config.yaml (plain)")
    p.add_argument("--tuned", metavar="YAML", help="tuned config (default: DIR/picked_config.yaml)")
    p.add_argument("--plain", metavar="YAML", help="plain config (default: DIR/baseline_config.yaml)")
    p.add_argument("--test", metavar="URI", help="prepared test catalogue (default: 'test' beside data.train)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument("--first-seed", type=int, default=1,
                   help="seeds first-seed .. first-seed+seeds-1 (default 1: the search's trials trained with seed 0)")
    p.add_argument("--shared", default="colour,product", help="attributes both modalities carry (probe_shared)")
    p.add_argument("--r1-margin", type=float, default=0.005, help="tuned mean R@1 >= plain's - this (default 0.005)")
    p.add_argument("--probe-gain", type=float, default=0.02,
                   help="tuned mean modality-specific probe >= plain's + this (default 0.02)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the rows here (JSON list), a PNG and PATH.details.json beside")
    p.add_argument("--png", metavar="PATH", help="plot (default: PATH of --json with .png)")
    p.add_argument("--markdown", metavar="JSON", help="print the docs table and verdict of an existing JSON; no training")
    p.add_argument("--make-catalogue", metavar="DIR",
                   help="only make and prepare the catalogue the search and this benchmark use: "
                        "DIR/catalog/{train,val,test,tokenizer}, then exit. synthetic: 3,000 / --val-records / 1,000 "
                        "records, seed 0; openclipart: --val-records / --test-records, the rest trains")
    p.add_argument("--catalogue", choices=CATALOGUES, default="synthetic",
                   help="what --make-catalogue makes (default synthetic). openclipart: Debian's clip art (fetched "
                        "once into the cache with apt-get download), its top-level category held out of the text as "
                        "the attribute `category` (an image-only attribute: eval.specific_attributes {image: [category]})")
    p.add_argument("--test-records", type=int, default=500, help="openclipart: test records (default 500)")
    p.add_argument("--input-probes", metavar="JSON",
                   help="with --make-catalogue: also probe every attribute of the catalogue from the raw inputs, "
                        "no model (16 x 16 pixels; a bag of the training split's 512 most frequent words of the text "
                        "view), fitted on train, scored on test, and write the accuracies and the majority class's "
                        "share here: how much of an attribute each modality's input carries")
    p.add_argument("--val-records", type=int, default=500,
                   help="validation records of --make-catalogue (default 500). The search warns when the binomial "
                        "standard error of R@1 there exceeds tune.pick.margin and says how many would resolve it")
    p.add_argument("--labels", default="plain,tuned",
                   help="names of the two variants in the rows (default plain,tuned; e.g. pairs_mean,paper to compare "
                        "two forms of one config)")


# --------------------------------------------------------------------------------------------
# one run: train a config for a seed, evaluate on the test split


def run_one(job: dict) -> tuple[dict, dict]:
    import numpy as np
    import torch

    from gammaray.config import apply_overrides, from_dict
    from pipelines import storage
    from pipelines.tokenizer import load as load_tokenizer
    from workers.evaluation.metrics import modality_gap, retrieval_metrics, specific_probes
    from workers.training.inprocess import LocalRun, load_split, planned_steps, preprocess, train
    from pipelines.tokenizer import tokenizer_uri

    torch.set_num_threads(job.get("threads") or 1)
    cpu0, t0 = time.process_time(), time.perf_counter()
    cfg = apply_overrides(from_dict(job["config"]), {"run.seed": job["seed"]})
    tok_uri = tokenizer_uri(cfg)
    store = storage.Store.of(cfg.storage)
    tok = load_tokenizer(tok_uri, store)
    tr, te = load_split(cfg.data.train, store), load_split(job["test"], store)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    run = LocalRun(cfg, job["seed"], len(tok), tok.pad_token_id, tr.size, planned_steps(cfg, tr.size), device)
    train(cfg, run, tr, tok, tok_uri, job["seed"])
    emb_tr = run.embed(preprocess(tr, tok, tok_uri, cfg, 0, 0, train=False, with_aug=False))
    emb_te = run.embed(preprocess(te, tok, tok_uri, cfg, 0, 0, train=False, with_aug=False))
    vi, vt = torch.from_numpy(emb_te["image"]), torch.from_numpy(emb_te["text"])
    r = retrieval_metrics(vi, vt, ks=(1, 5))
    attrs = {side: list(v) for side, v in cfg.eval.specific_attributes.items()}
    spec = specific_probes(emb_te, te.labels, attrs, job["seed"], cfg.eval.probe_l2, fit=(emb_tr, tr.labels))
    shared = specific_probes(emb_te, te.labels, {"image": job["shared"], "text": job["shared"]}, job["seed"],
                             cfg.eval.probe_l2, fit=(emb_tr, tr.labels))
    # each side's attributes probed from the OTHER embedding: how much of it leaks into the other modality
    other = specific_probes(emb_te, te.labels, {"text": attrs.get("image", []), "image": attrs.get("text", [])},
                            job["seed"], cfg.eval.probe_l2, fit=(emb_tr, tr.labels))
    row = {"variant": job["variant"], "seed": job["seed"], "r_at_1": 0.5 * (r["r_at_1_i2t"] + r["r_at_1_t2i"]),
           "probe_image_only": spec.get("probe_image_only"), "probe_text_only": spec.get("probe_text_only"),
           "probe_shared": shared.get("probe_specific"), "config": job["values"]}
    details = {**row, "r_at_1_i2t": r["r_at_1_i2t"], "r_at_1_t2i": r["r_at_1_t2i"], "r_at_5_i2t": r["r_at_5_i2t"],
               "r_at_5_t2i": r["r_at_5_t2i"], "modality_gap": modality_gap(vi, vt), "test_records": te.size,
               "probes": {k: v for k, v in spec.items() if "_only_" in k},
               "probes_shared": {k.replace("_only_", "_"): v for k, v in shared.items() if "_only_" in k},
               "probes_other_side": {k.replace("_only_", "_embedding_"): v for k, v in other.items() if "_only_" in k},
               "steps": run.step, "train_s": round(run.train_s, 1), "cpu_s": round(time.process_time() - cpu0, 1),
               "wall_s": round(time.perf_counter() - t0, 1), "last_terms": run.last,
               "chance_r_at_1": r["chance_r_at_1"], "probe_fit_records": tr.size}
    assert np.isfinite(row["r_at_1"])
    return {k: row[k] for k in ROW_KEYS}, details


# --------------------------------------------------------------------------------------------
# summaries


def specific(row: dict) -> float:
    """The mean of the sides that have modality-specific attributes (a catalogue may have one side only)."""
    sides = [row[k] for k in ("probe_image_only", "probe_text_only") if row.get(k) is not None]
    return sum(sides) / len(sides)


def summarize(rows: list[dict], variants=VARIANTS) -> dict:
    """{variant: {metric: (mean, std, n) or None where no row has the metric (no such attribute)}}."""
    import numpy as np

    out = {}
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            vals = {m: [specific(r) if m == "probe_specific" else r[m] for r in rs] for m in METRICS}
            out[v] = {m: (float(np.mean(x)), float(np.std(x)), len(x)) if None not in x else None
                      for m, x in vals.items()}
    return out


def verdict(rows: list[dict], r1_margin: float = 0.005, probe_gain: float = 0.02,
            variants=VARIANTS) -> tuple[bool, str]:
    import numpy as np

    base, new = variants
    s = summarize(rows, variants)
    if set(s) != set(variants):
        return False, "   verdict: needs rows of both variants"
    d_r1 = s[new]["r_at_1"][0] - s[base]["r_at_1"][0]
    d_sp = s[new]["probe_specific"][0] - s[base]["probe_specific"][0]
    plain = {r["seed"]: r for r in rows if r["variant"] == base}
    pairs = [(r["seed"], r["r_at_1"] - plain[r["seed"]]["r_at_1"], specific(r) - specific(plain[r["seed"]]))
             for r in rows if r["variant"] == new and r["seed"] in plain]
    ok = d_r1 >= -r1_margin and d_sp >= probe_gain
    lines = [f"   {new} - {base}, mean over {s[new]['r_at_1'][2]} seeds: R@1 {d_r1:+.4f} (needs >= {-r1_margin:+.3f}), "
             f"modality-specific probe {d_sp:+.4f} (needs >= {probe_gain:+.3f})",
             "   per seed (R@1, probe): " + ", ".join(f"seed {sd}: {a:+.4f}, {b:+.4f}" for sd, a, b in pairs),
             f"   verdict: {'MET' if ok else 'NOT MET'}"]
    if pairs:
        lines.insert(1, f"   paired std over seeds: R@1 {np.std([p[1] for p in pairs]):.4f}, "
                        f"probe {np.std([p[2] for p in pairs]):.4f}")
    return ok, "\n".join(lines)


def markdown_table(rows: list[dict], variants=VARIANTS) -> str:
    s = summarize(rows, variants)
    head = ("| variant | R@1 | probe image-only | probe text-only | modality-specific (mean of the two) | "
            "probe shared |\n|---|---|---|---|---|---|")
    lines = [head]
    for v, m in s.items():
        cells = [f"{m[k][0]:.3f} ± {m[k][1]:.3f}" if m[k] else "–" for k in (
            "r_at_1", "probe_image_only", "probe_text_only", "probe_specific", "probe_shared")]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "", variants=VARIANTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"r_at_1": "test R@1", "probe_image_only": "probe: image-only (image emb.)",
              "probe_text_only": "probe: text-only (text emb.)", "probe_specific": "modality-specific (mean)",
              "probe_shared": "probe: shared"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.4 * len(METRICS), 3.4))
    seeds = sorted({r["seed"] for r in rows})
    for ax, m in zip(axes, METRICS):
        val = {(r["variant"], r["seed"]): (specific(r) if m == "probe_specific" else r[m]) for r in rows}
        val = {k: x for k, x in val.items() if x is not None}
        if not val:  # no such attribute on this catalogue
            ax.set_title(titles[m] + "\n(none)", fontsize=9)
            ax.set_axis_off()
            continue
        for i, v in enumerate(variants):
            ys = [val[(v, sd)] for sd in seeds if (v, sd) in val]
            if ys:
                ax.bar(i, sum(ys) / len(ys), 0.6, color=("tab:gray", "tab:blue")[i], alpha=0.5)
        for sd in seeds:
            if (variants[0], sd) in val and (variants[1], sd) in val:
                ax.plot([0, 1], [val[(variants[0], sd)], val[(variants[1], sd)]], "k.-", lw=0.8, ms=6)
        lo = min(val.values())
        hi = max(val.values())
        pad = max(0.01, 0.3 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks([0, 1], variants)
        ax.set_title(titles[m], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or f"{variants[1]} vs {variants[0]} on the test split ({len(seeds)} seeds; bars = mean, lines = one seed)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# the real catalogue


def make_openclipart_catalogue(workdir: str, n_val: int, n_test: int, records: list[dict] | None = None,
                               min_records: int = 20) -> dict:
    """openclipart with its top-level category held out of the text (pipelines/public_catalogues.py
    hold_out_category: the attribute `category`, its words gone from every title and description),
    split (seed 0) and prepared like the synthetic one: {"train", "val", "test": Split, "tokenizer":
    uri}, images stored at OPENCLIPART_IMAGE_SIDE. `records`: the raw records (default: fetched with
    openclipart_all, raising Unavailable where apt-get is missing); a category with fewer than
    `min_records` records is no class. Reuses a complete folder."""
    from pipelines import public_catalogues as pc
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.tokenizer import build_for_catalogue
    from workers.training.inprocess import load_split

    raw = os.path.join(workdir, "raw")
    if not os.path.exists(os.path.join(raw, "test.jsonl")):
        held, report = pc.hold_out_category(pc.openclipart_all(pc.cache_dir()) if records is None else records,
                                            min_records=min_records)
        print(f"openclipart: {len(held)} records; the attribute `category` on {sum(report['classes'].values())} "
              f"({len(report['classes'])} classes: {', '.join(f'{c} {n}' for c, n in report['classes'].items())}); "
              f"without it (too few records or not a class): "
              f"{', '.join(f'{c} {n}' for c, n in report['without_attribute'].items()) or 'none'}; "
              f"{len(report['left_out_no_text'])} left out with no text once the class words were removed", flush=True)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "held_out.json"), "w") as f:
            json.dump(report, f, indent=1)
        pc.write_splits(held, raw, n_val, n_test, seed=0)
    paths = {s: os.path.join(raw, f"{s}.jsonl") for s in ("train", "val", "test")}
    opts = PrepareOptions(progress=False, image_max_side=OPENCLIPART_IMAGE_SIDE)
    res = {}
    for split, path in paths.items():
        dst = os.path.join(workdir, "catalog", split)
        if not os.path.exists(os.path.join(dst, "manifest.json")):
            res[split] = prepare(path, dst, opts)
            if res[split].num_quarantined:
                print(f"openclipart {split}: {res[split].num_quarantined} records quarantined "
                      f"{res[split].quarantine_by_reason}", flush=True)
    tok = os.path.join(workdir, "catalog", "tokenizer")
    if not os.path.exists(os.path.join(tok, "tokenizer_config.json")):
        if "train" in res:
            manifest = res["train"].manifest
        else:
            with open(os.path.join(workdir, "catalog", "train", "manifest.json")) as f:
                manifest = json.load(f)
        build_for_catalogue(os.path.join(workdir, "catalog", "train"), tok, manifest, vocab_size=1000)
    out: dict = {s: load_split(os.path.join(workdir, "catalog", s)) for s in paths}
    out["tokenizer"] = tok
    return out


def input_probes(train, test, side: int = 16, words: int = 512, l2: float = 1e-4) -> dict:
    """{attribute: {pixels, words, majority, classes, test_records}}: each `attr:` column of the splits
    probed from the raw inputs with the bench's linear probe (fitted on train, scored on test): the
    image at side x side RGB, and the text view (title, category, description as the model reads it)
    as a bag of the training split's `words` most frequent words."""
    import re
    from collections import Counter

    import numpy as np

    from pipelines.images import decode
    from pipelines.preprocess import record_text
    from workers.evaluation.metrics import specific_probes

    def texts(split):
        c = split.columns
        return [record_text(t, d, k).lower() for t, d, k in zip(c["title"], c["description"], c["category"])]

    vocab = [w for w, _ in Counter(w for t in texts(train) for w in set(re.findall(r"[a-z]+", t))).most_common(words)]
    index = {w: i for i, w in enumerate(vocab)}

    def features(split) -> dict:
        pix = []
        for data in split.columns["image"]:
            img, _ = decode(data, 1 << 26, (side, side))
            pix.append(np.asarray(img.convert("RGB").resize((side, side)), dtype=np.float64).ravel() / 255.0)
        bag = np.zeros((split.size, len(vocab)))
        for i, t in enumerate(texts(split)):
            bag[i, [index[w] for w in re.findall(r"[a-z]+", t) if w in index]] = 1.0
        return {"image": np.stack(pix), "text": bag}

    fit, ev = features(train), features(test)
    out = {}
    for col in sorted(c for c in test.labels if c.startswith("attr:")):
        attr = col[5:]
        got = specific_probes(ev, test.labels, {"image": [attr], "text": [attr]}, 0, l2, fit=(fit, train.labels))
        y = [v for v in test.labels[col] if v is not None]
        out[attr] = {"pixels": got["probe_image_only"], "words": got["probe_text_only"],
                     "majority": Counter(y).most_common(1)[0][1] / len(y), "classes": len(set(y)), "test_records": len(y)}
    return out


# --------------------------------------------------------------------------------------------
# the benchmark


def _config_values(plain, tuned) -> tuple[dict, dict]:
    """What sets the two configs apart, as each holds it: every loss.structure key and the other keys
    the search varied (tune.space)."""
    from gammaray.config import get_value

    def values(cfg) -> dict:
        out = {f"loss.structure.{k}": v for k, v in cfg.loss.structure.model_dump(mode="json").items()}
        out.update({k: get_value(cfg, k) for k in tuned.tune.space})
        return out

    return values(plain), values(tuned)


def run(args: argparse.Namespace) -> int:
    from gammaray.config import load
    from pipelines import storage

    if args.make_catalogue:
        from .structure import make_catalogue

        if args.val_records < 1 or args.test_records < 1:
            raise ValueError(f"--val-records and --test-records: at least 1, got {args.val_records}, {args.test_records}")
        if args.catalogue == "openclipart":
            from pipelines.public_catalogues import Unavailable

            try:
                cat = make_openclipart_catalogue(args.make_catalogue, args.val_records, args.test_records)
            except Unavailable as err:
                print(f"tune-structure --catalogue openclipart: {err}")
                return 2
        else:
            cat = make_catalogue(args.make_catalogue, 3000, args.val_records, progress=False, n_test=1000)
        print(f"prepared {', '.join(f'{k} ({v.size})' for k, v in cat.items() if k != 'tokenizer')} and the tokenizer "
              f"under {os.path.join(args.make_catalogue, 'catalog')}")
        if args.input_probes:
            out = input_probes(cat["train"], cat["test"])
            for attr, r in out.items():
                print(f"   {attr}: pixels {r['pixels']:.3f}, words {r['words']:.3f}, majority class {r['majority']:.3f} "
                      f"({r['classes']} classes, {r['test_records']} test records)")
            with open(args.input_probes, "w") as f:
                json.dump({"command_args": {k: v for k, v in vars(args).items() if k != "func"}, "probes": out}, f,
                          indent=1)
        return 0
    labels = tuple(x.strip() for x in args.labels.split(","))
    if len(labels) != 2 or labels[0] == labels[1]:
        raise ValueError(f"--labels: two different names, got {args.labels!r}")
    if args.markdown:
        with open(args.markdown) as f:
            rows = json.load(f)
        print(markdown_table(rows, labels))
        print(verdict(rows, args.r1_margin, args.probe_gain, labels)[1])
        return 0
    tuned_path = args.tuned or (args.experiment and os.path.join(args.experiment, "picked_config.yaml"))
    plain_path = args.plain or (args.experiment and os.path.join(args.experiment, "baseline_config.yaml"))
    if not tuned_path or not plain_path:
        raise ValueError("give --experiment DIR (with picked_config.yaml and baseline_config.yaml) or --tuned and --plain")
    if not args.json:
        raise ValueError("--json PATH is required (unless --markdown)")
    cfgs = {labels[0]: load(plain_path), labels[1]: load(tuned_path)}
    test = args.test or storage.join(cfgs[labels[1]].data.train.rstrip("/").rsplit("/", 1)[0], "test")
    for v, c in cfgs.items():
        if not c.eval.specific_attributes:
            raise ValueError(f"{v} config: eval.specific_attributes is empty (which attributes does each modality alone carry?)")
        if test.rstrip("/") in (str(c.data.val).rstrip("/"), str(c.data.train).rstrip("/")):
            raise ValueError(f"--test {test} is the {v} config's data.val or data.train: the confirmation needs a split the "
                             f"search never saw")
    values = dict(zip(labels, _config_values(cfgs[labels[0]], cfgs[labels[1]])))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    shared = [a.strip() for a in args.shared.split(",") if a.strip()]
    jobs = [{"variant": v, "seed": sd, "config": cfgs[v].model_dump(mode="json"), "values": values[v], "test": test,
             "shared": shared, "threads": 1} for sd in seeds for v in labels]
    print(f"== {len(jobs)} runs ({', '.join(labels)} x seeds {seeds}); test split {test}; {args.jobs} at once", flush=True)
    t0 = time.perf_counter()
    rows, details = [], []

    def done(row, det):
        rows.append(row)
        details.append(det)
        figs = "  ".join(f"{name} {row[k]:.4f}" for name, k in (("image-only", "probe_image_only"),
                         ("text-only", "probe_text_only"), ("shared", "probe_shared")) if row[k] is not None)
        print(f"   {row['variant']:<6} seed {row['seed']}: R@1 {row['r_at_1']:.4f}  {figs}  ({det['cpu_s']:.0f} CPU s)",
              flush=True)
        with open(args.json + ".partial", "w") as f:
            json.dump(rows, f, indent=1)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    if args.jobs <= 1:
        for job in jobs:
            done(*run_one(job))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(run_one, job) for job in jobs]):
                done(*fut.result())
    order = {(v, sd): i for i, (sd, v) in enumerate((sd, v) for sd in seeds for v in labels)}
    rows.sort(key=lambda r: order[(r["variant"], r["seed"])])
    details.sort(key=lambda r: order[(r["variant"], r["seed"])])
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    os.remove(args.json + ".partial")
    ok, text = verdict(rows, args.r1_margin, args.probe_gain, labels)
    stem = os.path.splitext(args.json)[0]
    meta = {"command_args": {k: v for k, v in vars(args).items() if k != "func"}, "tuned_config": tuned_path,
            "plain_config": plain_path, "test": test, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s_runs": round(sum(d["cpu_s"] for d in details), 1), "verdict": text, "met": ok, "runs": details}
    with open(stem + ".details.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)
    png = args.png or stem + ".png"
    plot(rows, png, variants=labels)
    print(markdown_table(rows, labels))
    print(text)
    print(f"   {meta['cpu_s_runs']:.0f} CPU s in the runs, {meta['wall_s']:.0f} s wall; rows -> {args.json}, plot -> {png}, "
          f"details -> {stem}.details.json")
    return 0
