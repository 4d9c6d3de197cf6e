"""The running topology as `distserve up` prints it: the router's `GET /v1/distserve/instances`,
one row per tensor-parallel rank."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

INSTANCES_PATH = "/v1/distserve/instances"


def fetch_topology(url: str, expect: int = 0, timeout: float = 30.0, api_key: str = "") -> dict[str, Any]:
    """The router's instance list; waits (up to `timeout`) until it lists `expect` instances, all
    ready, so that a freshly started stack is shown once every instance has answered a poll.
    Returns the last answer either way; raises OSError when the router never answered."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    error: Exception | None = None
    while True:
        try:
            request = urllib.request.Request(url.rstrip("/") + INSTANCES_PATH, headers=headers)
            with urllib.request.urlopen(request, timeout=5.0) as response:
                last = json.loads(response.read())
            listed = last.get("instances", [])
            if len(listed) >= expect and all(i.get("ready") for i in listed):
                return last
        except (urllib.error.URLError, OSError, ValueError) as exc:
            error = exc
        if time.monotonic() > deadline:
            if last is None:
                raise OSError(f"{url}{INSTANCES_PATH} did not answer: {error}")
            return last
        time.sleep(0.2)


def _count(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _span(value: dict[str, int] | None) -> str:
    return f"[{value['start']}, {value['end']})" if value else "-"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


HEADER = (
    "instance",
    "role",
    "state",
    "stage",
    "layers",
    "tp",
    "rank",
    "device",
    "params",
    "KV tokens",
    "KV heads",
    "ready",
)


def _state(inst: dict[str, Any]) -> str:
    if inst.get("ready"):
        return "ready"
    return "not ready" if inst.get("reachable") else "unreachable"


def topology_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per rank (the instance's columns on its first row only); one row for an instance
    that reports no ranks (an older worker, or one not polled yet)."""
    rows: list[tuple[str, ...]] = []
    for inst in doc.get("instances", []):
        # With pipeline stages, each stage's ranks under its own stage number and layers.
        parts = inst.get("stages") or [inst]
        for n, part in enumerate(parts):
            rows.extend(_part_rows(inst, part, first=n == 0))
    return rows


def _part_rows(inst: dict[str, Any], part: dict[str, Any], first: bool) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    head = (
        inst["address"] if first else "",
        inst["role"] if first else "",
        _state(inst) if first else "",
        _dash(part.get("stage")),
        _span(part.get("layers")),
        _dash(inst.get("tp")),
    )
    ranks = part.get("ranks") or []
    if not ranks:
        rows.append((*head, "-", "-", "-", "-", "-", "-"))
        return rows
    for i, rank in enumerate(ranks):
        rows.append(
            (
                *(head if i == 0 else ("",) * len(head)),
                str(rank["rank"]),
                rank.get("device") or "-",
                _count(rank.get("parameters")),
                f"{rank['kv_capacity_tokens']:,}" if rank.get("kv_capacity_tokens") else "-",
                _span(rank.get("kv_heads")),
                "yes" if rank.get("ready") else "no",
            )
        )
    return rows


def format_topology(doc: dict[str, Any]) -> str:
    """The table, then one line per instance that is not ready, with the router's reason."""
    rows = [HEADER, *topology_rows(doc)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [
        f"  {inst['role']} {inst['address']}: {inst['error']}"
        for inst in doc.get("instances", [])
        if not inst.get("ready") and inst.get("error")
    ]
    return "\n".join(lines)
