"""`gammaray bench <name>`: one dispatcher for every benchmark.

Each entry of BENCHES maps a name to a module with `add_arguments(parser)` and `run(args) -> int`
(or `run(args, cfg)`: then the module also gets the config tree from --config/--set).
"""

from __future__ import annotations

import argparse
import importlib
import inspect

from . import EPILOG, add_config_args, config_from_args

BENCHES = {
    "ingest": "pipelines.benchmarks.ingest",
}


def run(args: argparse.Namespace) -> int:
    mod = importlib.import_module(BENCHES[args.bench])
    if len(inspect.signature(mod.run).parameters) > 1:
        return int(mod.run(args, config_from_args(args)) or 0)
    return int(mod.run(args) or 0)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures side by side (see `gammaray bench NAME --help`)",
                       description="Run a benchmark by name: " + ", ".join(sorted(BENCHES)), epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    names = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        q = names.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0],
                             description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(q)
        add_config_args(q)
        q.set_defaults(func=run)
