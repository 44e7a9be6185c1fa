"""The application layer: the `gammaray` CLI, its subcommands, the demo, the benchmarks and the docs
generator.

It imports every layer below it (gammaray's config and schema, pipelines, workers, tuning, infra);
nothing imports it (tests excepted). tests/test_layers.py checks both.
"""
