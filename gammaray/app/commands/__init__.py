"""Subcommands of the `gammaray` CLI, one module each (see gammaray/app/cli.py)."""

from __future__ import annotations

import argparse

from gammaray.config import GammarayConfig, load

EPILOG = """config: --config FILE (YAML) then any number of --set dotted.path=value (YAML-typed values),
e.g. --set loss.gamma.alpha=2 --set train.workers=4. `gammaray config reference` lists every key."""


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: the embedded defaults)")
    p.add_argument("--set", dest="overrides", metavar="PATH=VALUE", action="append", default=[],
                   help="override one config value by dotted path (repeatable)")


def config_from_args(args: argparse.Namespace) -> GammarayConfig:
    return load(args.config, args.overrides)
