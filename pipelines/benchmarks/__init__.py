"""Benchmarks of the data path (`gammaray bench <name>`): scripts that print figures side by side."""
