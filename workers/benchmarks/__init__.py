"""Benchmarks behind `gammaray bench <name>`: each module has `add_arguments(parser)` and `run(args) -> int`."""
