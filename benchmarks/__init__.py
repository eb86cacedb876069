"""Benchmarks: `python -m benchmarks.run` (benchmarks/README.md)."""
