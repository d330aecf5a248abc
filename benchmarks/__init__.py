"""Benchmarks and hardware litmus tests (runnable scripts, importable from tests)."""
