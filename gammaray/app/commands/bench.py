"""`gammaray bench <what>`: benchmarks that print their figures side by side and write JSON + a PNG.

BENCHES maps a name to a module with `add_arguments(parser)` and `run(args) -> int` (or
`run(args, cfg)`: then the benchmark also takes --config/--set and gets the config tree); each area
adds its own line. A benchmark's module (torch and all) is imported only when that benchmark runs or
its help is asked for: `gammaray bench WHAT --help`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect

BENCHES = {
    "synthetic": "gammaray.app.benchmarks.synthetic",
    "batch": "gammaray.app.benchmarks.batch",
    "structure": "gammaray.app.benchmarks.structure",
    "recipe": "gammaray.app.benchmarks.recipe",
    "tune-structure": "gammaray.app.benchmarks.tune_structure",
    "scaling": "gammaray.app.benchmarks.scaling",
    "step": "gammaray.app.benchmarks.step",
    "ingest": "gammaray.app.benchmarks.ingest",
    "decode": "gammaray.app.benchmarks.decode",
    "scale": "gammaray.app.benchmarks.scale",
    "prepare-stream": "gammaray.app.benchmarks.prepare_stream",
    "image-max-side": "gammaray.app.benchmarks.image_max_side",
    "demo": "gammaray.app.benchmarks.demo_runs",
    "search": "gammaray.app.benchmarks.search",
}


def _wants_config(module) -> bool:
    return len(inspect.signature(module.run).parameters) > 1


def bench_parser(what: str) -> tuple[argparse.ArgumentParser, object]:
    from . import EPILOG, add_config_args

    module = importlib.import_module(BENCHES[what])
    wants_config = _wants_config(module)
    p = argparse.ArgumentParser(prog=f"gammaray bench {what}", description=module.__doc__,
                                epilog=EPILOG if wants_config else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    if wants_config:
        add_config_args(p)
    return p, module


def _run(args: argparse.Namespace) -> int:
    from . import config_from_args

    parser, module = bench_parser(args.what)
    bench_args = parser.parse_args(args.bench_args)
    if _wants_config(module):
        return int(module.run(bench_args, config_from_args(bench_args)) or 0)
    return int(module.run(bench_args) or 0)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (" + ", ".join(BENCHES) + "): figures, JSON and a PNG",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=list(BENCHES), help="which benchmark; `gammaray bench WHAT --help` lists its options")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                   help="the benchmark's own options, e.g. --json PATH")
    p.set_defaults(func=_run)
