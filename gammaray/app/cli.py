"""`gammaray`: one CLI, a thin dispatcher over the entry points of pipelines/, workers/, tuning/, infra/.

Each subcommand lives in `gammaray/app/commands/<name>.py` with a `register(subparsers)` function that
adds its parser and sets `func`; add a module name to COMMANDS to add a subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from gammaray.config import ConfigError, RunError

COMMANDS = ["demo", "prepare", "pretrain", "config", "eval", "embed", "index", "search", "serve", "export", "bench", "tune",
            "submit"]

EPILOG = """config: every subcommand that trains reads one config tree: --config FILE (YAML) then any
number of --set dotted.path=value (YAML-typed values), e.g. --set loss.gamma.alpha=2
--set train.workers=4. `gammaray config reference` lists every key with its default and meaning."""


def _setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ:
        try:
            import torch

            os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:  # noqa: BLE001
            os.environ["DS_ACCELERATOR"] = "cpu"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gammaray",
        description="Contrastive pretraining of multimodal product encoders on Ray: the gamma-augmented "
                    "decomposable loss, latent modality structure regularizers, Ray Data ingest from object "
                    "storage, Ray Train + DeepSpeed, Ray Tune.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"gammaray.app.commands.{name}").register(sub)
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
    except RunError as err:  # the message says what happened and what to do next
        print(f"gammaray {args.command}: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:
        print(f"gammaray {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
