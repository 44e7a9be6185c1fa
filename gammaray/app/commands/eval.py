from __future__ import annotations

import argparse
import json
import math
import os



def format_summary(s: dict) -> str:
    m = s["metrics"]

    def f(v, d=3):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"

    lines = [f"evaluated {s['model']} on {s['data']} ({m['records']} records, {s['device']})",
             f"   {'retrieval':<22} {'image->text':>12} {'text->image':>12}"]
    for k in (1, 5, 10):
        lines.append(f"   {'R@' + str(k):<22} {f(m[f'r_at_{k}_i2t']):>12} {f(m[f'r_at_{k}_t2i']):>12}")
    lines.append(f"   chance R@1             {f(m['chance_r_at_1'], 4)}")
    if "zero_shot_acc" in m:
        lines.append(f"   zero-shot category     {f(m['zero_shot_acc'])}  (chance {f(m['zero_shot_chance'])})")
    lines.append(f"   modality gap           {f(m['modality_gap'])}")
    if s["probes"]:
        ks = [k for k in s["probes"][0] if k.startswith("k") and k[1:].isdigit()]
        lines.append(f"   {'probe':<30} {'linear':>7} " + " ".join(f"{k + '-shot':>7}" for k in
                                                               [k[1:] for k in ks]) + f" {'chance':>7}")
        for p in s["probes"]:
            name = f"{p['embedding']}/{p['label']}"
            lines.append(f"   {name:<30} {f(p['linear']):>7} " + " ".join(f"{f(p[k]):>7}" for k in ks)
                         + f" {f(p['chance']):>7}")
    if s.get("report"):
        lines.append(f"   report                 {s['report']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from workers.evaluation.evaluate import evaluate_checkpoint

    report = args.report
    if report is None:
        report = (os.path.splitext(args.json)[0] + ".png") if args.json else "eval_report.png"
    summary = evaluate_checkpoint(args.checkpoint, args.data, overrides=args.overrides, device=args.device,
                                  report_path=report or None)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=float)
        print(f"   json                   {args.json}")
    track_eval(args, summary)
    return 0


def track_eval(args: argparse.Namespace, summary: dict) -> None:
    """With --set tracking.kind=mlflow|wandb: one run with the metrics, the JSON and the PNG report."""
    from gammaray.config import GammarayConfig, apply_overrides
    from workers.tracking import start_run

    cfg = apply_overrides(GammarayConfig(), [o for o in args.overrides if o.startswith("tracking.")])
    run = start_run(cfg, "eval", name=f"eval {os.path.basename(str(args.checkpoint).rstrip('/'))}")
    if run is None:
        return
    run.log_metrics(summary["metrics"], step=0)
    run.set_tag("checkpoint_uri", str(args.checkpoint))
    run.set_tag("data", str(args.data))
    for path in (args.json, summary.get("report")):
        if path and os.path.exists(path):
            run.log_artifact(path)
    run.finish()


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: retrieval R@K, zero-shot, linear/k-shot probes, modality gap, PNG report",
        description="Evaluate a trained model on a prepared catalogue with the same code that validates during "
                    "training: image->text and text->image R@1/5/10, zero-shot category accuracy "
                    "(eval.prompt_template), linear probe and k-shot accuracy (eval.k_shots) for the category and "
                    "every attribute on frozen embeddings, the modality gap; writes JSON and a PNG report.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="URI",
                   help="a checkpoint folder (model/ + config.json), a model/ folder, or a run folder (its newest "
                        "checkpoint); local or s3://")
    p.add_argument("--data", required=True, metavar="URI", help="a prepared catalogue (gammaray prepare)")
    p.add_argument("--json", metavar="PATH", help="write the metrics and probe table as JSON")
    p.add_argument("--report", metavar="PNG",
                   help="where the PNG report goes (default: next to --json, else eval_report.png; '' = none)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--set", dest="overrides", metavar="PATH=VALUE", action="append", default=[],
                   help="override a value of the checkpoint's config by dotted path (repeatable), e.g. "
                        "eval.prompt_template='a photo of {}' or storage.endpoint_url=...")
    p.set_defaults(func=run)
