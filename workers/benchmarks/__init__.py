"""Benchmarks behind `gammaray bench <what>`: scripts that print figures side by side (not timed tests)."""
