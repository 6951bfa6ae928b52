"""Benchmark suites. ``bench.run`` imports every module here; each registers itself with ``@suite``."""
