"""The quiet-machine gate of the benchmarks and the in-stack profile reads real CPU use."""

import os
import threading
import time

import pytest

from distserve_worker.testing.quiet import busy_cores, wait_quiet

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


def test_a_busy_core_is_seen_and_the_gate_gives_up_after_its_timeout():
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        busy = busy_cores(1.0)
        assert 0.6 <= busy <= (os.cpu_count() or 1) + 0.01
        started = time.perf_counter()
        gate = wait_quiet(max_busy=0.4, timeout_s=1.0, window_s=0.5, label="[test]")
        assert not gate.quiet and gate.busy_cores > 0.4
        assert time.perf_counter() - started < 10  # it gave up rather than waiting for ever
    finally:
        stop.set()
        spinner.join()
