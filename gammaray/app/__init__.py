"""The application layer: the CLI, its commands, the demo, the benchmarks and the docs generator; nothing imports it."""
