"""Benchmark suite: ``python -m scripts.bench [--quick] [--only NAME]``."""
