"""`distserve cache ls|prune`: the de-quantized GGUF copies in the model cache (model_cache.py)."""

from __future__ import annotations

import argparse
import json
import re
import time

from distserve_worker import model_cache

GiB = 1024**3
DEFAULT_MAX_BYTES = 2 * GiB
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_bytes(text: str) -> int:
    """`2147483648`, `2G`, `2GiB`, `500MB`, ... (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 500MiB, 1073741824)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "The cache is $DISTSERVE_CACHE_DIR/gguf (default ~/.cache/distserve/gguf). After each new "
        f"conversion a worker keeps the $DISTSERVE_CACHE_KEEP (default {model_cache.DEFAULT_KEEP}) "
        "most recently used copies."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    ls = actions.add_parser("ls", help="list the cached copies, most recently used first")
    ls.add_argument("-o", "--output", choices=("text", "json"), default="text")
    prune = actions.add_parser("prune", help="remove the least recently used copies")
    bound = prune.add_mutually_exclusive_group()
    bound.add_argument(
        "--max-bytes",
        type=parse_bytes,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help="keep the most recently used copies that fit in SIZE (default 2GiB)",
    )
    bound.add_argument("--all", action="store_true", help="remove every copy")


def run(args: argparse.Namespace) -> int:
    root = model_cache.gguf_root()
    if args.action == "prune":
        removed = model_cache.prune(root, max_bytes=args.max_bytes, everything=args.all)
        for entry in removed:
            print(f"removed {entry.key}  {entry.model}  {entry.dtype}  {human_bytes(entry.size_bytes)}")
        left = model_cache.entries(root)
        print(
            f"{len(removed)} removed ({human_bytes(sum(e.size_bytes for e in removed))}); "
            f"{len(left)} left ({human_bytes(sum(e.size_bytes for e in left))}) in {root}"
        )
        return 0
    listed = model_cache.entries(root)
    if getattr(args, "output", "text") == "json":
        print(json.dumps({"dir": str(root), "entries": [e.as_json() for e in listed]}, indent=2))
        return 0
    print(_table(listed))
    print(f"{len(listed)} entries, {human_bytes(sum(e.size_bytes for e in listed))} in {root}")
    return 0


def _table(listed: list[model_cache.Entry]) -> str:
    rows = [("KEY", "MODEL", "DTYPE", "SIZE", "LAST USED")]
    for e in listed:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        rows.append((e.key, e.model, e.dtype, human_bytes(e.size_bytes), used))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
