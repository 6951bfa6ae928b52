"""Benchmark harness: ``python bench/run.py --help``; charts via ``bench/plot.py``."""
