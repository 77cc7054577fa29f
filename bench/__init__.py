"""Benchmarks (run as modules, e.g. ``python -m bench.replay``); not part of the test suite."""
