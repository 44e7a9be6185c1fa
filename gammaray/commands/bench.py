"""`gammaray bench <what>`: benchmarks that print their figures side by side and write JSON + a PNG.

BENCHES maps a name to a module with `add_arguments(parser)` and `run(args) -> int`; each area adds
its own line. A benchmark's module (torch and all) is imported only when that benchmark runs or its
help is asked for: `gammaray bench WHAT --help`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "synthetic": "workers.benchmarks.synthetic",
    "batch": "workers.benchmarks.batch",
    "structure": "workers.benchmarks.structure",
    "scaling": "workers.benchmarks.scaling",
}


def bench_parser(what: str) -> tuple[argparse.ArgumentParser, object]:
    module = importlib.import_module(BENCHES[what])
    p = argparse.ArgumentParser(prog=f"gammaray bench {what}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    return p, module


def _run(args: argparse.Namespace) -> int:
    parser, module = bench_parser(args.what)
    return int(module.run(parser.parse_args(args.bench_args)) or 0)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (" + ", ".join(BENCHES) + "): figures, JSON and a PNG",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=list(BENCHES), help="which benchmark; `gammaray bench WHAT --help` lists its options")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                   help="the benchmark's own options, e.g. --json PATH")
    p.set_defaults(func=_run)
