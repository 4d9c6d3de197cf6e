"""Helpers for planner tests and benchmarks (brute force over the placement space)."""
