"""Benchmarks: ``python -m bench.run_bench`` (see bench/README.md)."""
