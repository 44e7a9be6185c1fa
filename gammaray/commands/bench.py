"""`gammaray bench <what>`: one dispatcher for every benchmark.

Each entry of BENCHES maps a name to a module with `add_arguments(parser)` and `run(args) -> int`
(and a docstring whose first line is the help). Benchmark modules keep heavy imports inside `run`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "structure": "workers.benchmarks.structure",
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: figures side by side (see `gammaray bench WHAT --help`)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or name).strip()
        bp = bsub.add_parser(name, help=doc.splitlines()[0], description=doc,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)
