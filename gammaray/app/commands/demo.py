from __future__ import annotations

import argparse

from . import EPILOG, add_config_args, config_from_args


def run(args: argparse.Namespace) -> int:
    from gammaray.app.demo import DemoOptions, run_demo

    cfg = config_from_args(args)
    run_demo(cfg, DemoOptions(storage=args.storage, n_train=args.n_train, n_val=args.n_val,
                              bad_records=args.bad_records, json_path=args.json, progress=not args.quiet))
    return 0


def register(sub) -> None:
    import gammaray.app.demo

    p = sub.add_parser("demo", help="end-to-end local run: S3 server, synthetic catalogue, prepare, train, evaluate",
                       description=gammaray.app.demo.__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--storage", metavar="URL",
                   help="use this s3://bucket/prefix or local dir instead of starting a local S3 server")
    p.add_argument("--n-train", type=int, default=3000, help="synthetic training products (default 3000)")
    p.add_argument("--n-val", type=int, default=500, help="synthetic held-out products (default 500)")
    p.add_argument("--bad-records", type=int, default=10,
                   help="deliberately broken records to show the quarantine (default 10)")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
