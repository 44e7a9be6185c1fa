"""Benchmarks behind `gammaray bench <what>`: each module has `add_arguments(parser)` and `run(args) -> int`.

They print their figures side by side, write JSON (and a PNG) and are never part of the timed tests.
"""
