from __future__ import annotations

import argparse

from gammaray.config import describe, to_yaml

from . import add_config_args, config_from_args


def run(args: argparse.Namespace) -> int:
    if args.action == "reference":
        rows = describe()
        width = max(len(r[0]) for r in rows)
        for path, default, desc in rows:
            print(f"{path:<{width}}  {default:<24}  {desc}")
        return 0
    print(to_yaml(config_from_args(args)), end="")
    return 0


def register(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config, or the reference of every key",
                       description="show: the config after --config and --set, as YAML. "
                                   "reference: every key, its default and its meaning.")
    p.add_argument("action", choices=["show", "reference"], nargs="?", default="show",
                   help="show (default): resolved config as YAML; reference: every key documented")
    add_config_args(p)
    p.set_defaults(func=run)
