"""Workload traces: a CSV of request lengths the planner replays instead of sampling them."""

from __future__ import annotations

import csv
from pathlib import Path


def read_trace(path: str | Path) -> list[tuple[int, int]]:
    """A CSV with columns input_tokens,output_tokens (header required, extra columns ignored)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"input_tokens", "output_tokens"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the trace needs a header with input_tokens,output_tokens columns")
        rows = [(int(r["input_tokens"]), int(r["output_tokens"])) for r in reader]
    if not rows or any(i < 1 or o < 1 for i, o in rows):
        raise ValueError(f"{path}: the trace needs at least one row, every length at least 1")
    return rows
