"""`gammaray`: one CLI, a thin dispatcher over the entry points of pipelines/, workers/, tuning/, infra/."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gammaray.config import ConfigError, GammarayConfig, describe, load, to_yaml

EPILOG = """config: every subcommand that trains reads one config tree: --config FILE (YAML) then any
number of --set dotted.path=value (YAML-typed values), e.g. --set loss.gamma.alpha=2
--set train.workers=4. `gammaray config reference` lists every key with its default and meaning."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: the embedded defaults)")
    p.add_argument("--set", dest="overrides", metavar="PATH=VALUE", action="append", default=[],
                   help="override one config value by dotted path (repeatable)")


def _config(args: argparse.Namespace) -> GammarayConfig:
    return load(args.config, args.overrides)


def _setup_env() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "reference":
        rows = describe()
        width = max(len(r[0]) for r in rows)
        for path, default, desc in rows:
            print(f"{path:<{width}}  {default:<24}  {desc}")
        return 0
    cfg = _config(args)
    print(to_yaml(cfg), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipelines.prepare import PrepareOptions, prepare
    from pipelines.tokenizer import build_for_catalogue

    cfg = _config(args)
    column_map = {}
    for item in args.map:
        if "=" not in item:
            raise ConfigError(f"--map {item!r} must look like field=column")
        k, v = item.split("=", 1)
        column_map[k.strip()] = v.strip()
    opts = PrepareOptions(column_map=column_map, max_records_per_shard=args.records_per_shard,
                          row_group_size=args.row_group_size, max_image_pixels=cfg.data.max_image_pixels,
                          max_text_chars=cfg.data.max_text_chars, check_images=not args.no_image_check,
                          progress=not args.quiet)
    res = prepare(args.src, args.dst, opts, cfg.storage)
    print(res.summary())
    if args.build_tokenizer:
        uri = args.tokenizer_out or args.dst.rstrip("/").rsplit("/", 1)[0] + "/tokenizer"
        build_for_catalogue(args.dst, uri, res.manifest, vocab_size=args.build_tokenizer, storage_cfg=cfg.storage)
        print(f"tokenizer -> {uri}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"num_input": res.num_input, "num_written": res.num_written,
                       "num_already_present": res.num_already_present, "num_quarantined": res.num_quarantined,
                       "quarantine_by_reason": res.quarantine_by_reason, "shards_written": res.shards_written}, f, indent=2)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from workers.train import pretrain

    cfg = _config(args)
    res = pretrain(cfg, progress=not args.quiet)
    out = {"checkpoint": res.checkpoint_uri, "run_dir": res.run_dir, "wall_s": round(res.wall_s, 1), **res.metrics}
    print(json.dumps({k: out[k] for k in out if not k.endswith("per_worker")}, indent=2, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gammaray.demo import DemoOptions, run_demo

    cfg = _config(args)
    run_demo(cfg, DemoOptions(storage=args.storage, n_train=args.n_train, n_val=args.n_val,
                              bad_records=args.bad_records, json_path=args.json, progress=not args.quiet))
    return 0


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gammaray",
        description="Contrastive pretraining of multimodal product encoders on Ray: the gamma-augmented "
                    "decomposable loss, latent modality structure regularizers, Ray Data ingest from object "
                    "storage, Ray Train + DeepSpeed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="end-to-end local run: S3 server, synthetic catalogue, prepare, train, evaluate",
                       description=__import__("gammaray.demo", fromlist=["x"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--storage", metavar="URL", help="use this s3://bucket/prefix or local dir instead of starting a local S3 server")
    p.add_argument("--n-train", type=int, default=3000, help="synthetic training products (default 3000)")
    p.add_argument("--n-val", type=int, default=500, help="synthetic held-out products (default 500)")
    p.add_argument("--bad-records", type=int, default=10, help="deliberately broken records to show the quarantine (default 10)")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare", help="raw catalogue (JSONL/CSV/Parquet + images) -> validated Parquet shards",
                       description="Validate a raw catalogue, assign a dense sample_index, write Parquet shards, "
                                   "a manifest and a quarantine of rejected records. Idempotent and append-safe.")
    p.add_argument("src", help="source file or directory (local path, file://, s3://)")
    p.add_argument("dst", help="destination catalogue directory (local path, file://, s3://)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="take record field FIELD from source column COLUMN (repeatable)")
    p.add_argument("--records-per-shard", type=int, default=1000, help="records per Parquet shard (default 1000)")
    p.add_argument("--row-group-size", type=int, default=128, help="rows per row group, the shuffle unit (default 128)")
    p.add_argument("--no-image-check", action="store_true", help="skip the full decode of every image")
    p.add_argument("--build-tokenizer", type=int, metavar="VOCAB", help="also train a WordPiece tokenizer of this size")
    p.add_argument("--tokenizer-out", metavar="URL", help="where to write it (default: DST/../tokenizer)")
    p.add_argument("--json", metavar="PATH", help="write the counts as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train encoders on Ray Train with DeepSpeed (resumes a run of the same name)",
                       description="Train with the config tree. Re-running with the same run.name and "
                                   "run.storage resumes from the latest checkpoint.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--json", metavar="PATH", help="write the final metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("config", help="print the resolved config, or the reference of every key",
                       description="show: the config after --config and --set, as YAML. "
                                   "reference: every key, its default and its meaning.")
    p.add_argument("action", choices=["show", "reference"], nargs="?", default="show",
                   help="show (default): resolved config as YAML; reference: every key documented")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"gammaray: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"gammaray {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
