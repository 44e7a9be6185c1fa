from __future__ import annotations

import argparse
import json

from gammaray.config import apply_overrides

from . import EPILOG, add_config_args, config_from_args


def run(args: argparse.Namespace) -> int:
    from workers.training.trainer import pretrain

    cfg = config_from_args(args)
    if args.force:
        cfg = apply_overrides(cfg, {"train.resume_force": True})
    res = pretrain(cfg, progress=not args.quiet)
    out = {"checkpoint": res.checkpoint_uri, "run_dir": res.run_dir, "wall_s": round(res.wall_s, 1), **res.metrics}
    print(json.dumps({k: out[k] for k in out if not k.endswith("per_worker")}, indent=2, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="train encoders on Ray Train with DeepSpeed (resumes a run of the same name)",
                       description="Train with the config tree. Re-running with the same run.name and "
                                   "run.storage resumes from the latest checkpoint.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--json", metavar="PATH", help="write the final metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="resume even if the checkpoint was trained under another catalogue, run.seed, data.shuffle, "
                        "data.batch_size or gradient accumulation (train.resume_force=true); refused by default")
    p.set_defaults(func=run)
