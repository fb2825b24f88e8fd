"""Benchmarks: `python -m bench train|decode|encode`. Never imported by tests for timing."""
