"""`gammaray bench <name>`: benchmarks that print figures side by side (and write them as JSON).

Each entry of BENCHES maps a name to a module with `add_arguments(parser)` and `run(args) -> int`;
the modules keep their heavy imports inside `run`, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "scaling": "workers.benchmarks.scaling",
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (scaling, ...): figures printed side by side",
                       description="Run a benchmark; see `gammaray bench NAME --help`.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or name).strip().splitlines()[0]
        bp = bsub.add_parser(name, help=doc, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)
