"""Benchmarks for steerserve (run as modules, e.g. `python -m benchmarks.frontend`)."""
