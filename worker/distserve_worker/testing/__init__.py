"""Helpers for tests and benchmarks: tiny random-weight models built in code (no downloads)."""
