"""Waiting for a quiet machine before a measurement.

Benchmarks and `distserve profile --in-stack` measure the local stack on a shared machine. On a
2-core VM another process using one core for a minute halves a worker's speed and makes that one
measurement say the stack saturates at half its real rate (a fidelity run started while the box
was busy put the knee at 1.7 req/s; on a quiet box the same requests pass at 2.4). So each
measurement first waits, while our own stack is idle, until the whole machine is.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user time
    return total - idle, total


def busy_cores(window_s: float = 2.0) -> float:
    """Cores' worth of CPU the whole machine used over the next `window_s` seconds."""
    busy0, total0 = _cpu_times()
    time.sleep(window_s)
    busy1, total1 = _cpu_times()
    cpus = os.cpu_count() or 1
    return cpus * (busy1 - busy0) / max(total1 - total0, 1e-9)


@dataclass(frozen=True)
class Quiet:
    busy_cores: float  # the last window's reading
    waited_s: float
    quiet: bool  # False: gave up after the timeout and measured anyway


def wait_quiet(
    max_busy: float = 0.3, timeout_s: float = 300.0, window_s: float = 2.0, label: str = "[bench]"
) -> Quiet:
    """Wait until the machine uses at most `max_busy` cores over a window (our idle stack polls a
    little; anything above that is someone else's work), at most `timeout_s`. Prints why it waits."""
    if not os.path.exists("/proc/stat"):
        return Quiet(0.0, 0.0, True)  # not Linux: nothing to read, measure as before
    started = time.perf_counter()
    said = 0.0
    while True:
        busy = busy_cores(window_s)
        waited = time.perf_counter() - started
        if busy <= max_busy:
            return Quiet(round(busy, 2), round(waited, 1), True)
        if waited >= timeout_s:
            print(
                f"{label} machine still busy ({busy:.2f} cores) after {waited:.0f} s; measuring anyway",
                file=sys.stderr,
                flush=True,
            )
            return Quiet(round(busy, 2), round(waited, 1), False)
        if waited - said >= 20 or said == 0.0:
            said = waited or 1e-9
            print(
                f"{label} waiting for a quiet machine: {busy:.2f} cores busy (at most {max_busy})",
                file=sys.stderr,
                flush=True,
            )
