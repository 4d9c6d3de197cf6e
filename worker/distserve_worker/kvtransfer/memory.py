"""Keep the memory a KV transfer frees for the next one, instead of handing it back to the kernel.

Every pull receives the whole cache into fresh buffers (gRPC's slices, then one Python `bytes` per
chunk, which become the tensors), and frees them soon after. With glibc's defaults those buffers
are `mmap`ped (a chunk is above the 128 KiB threshold) or the freed top of the heap is trimmed
(`M_TRIM_THRESHOLD`), so the next pull page-faults the same amount of memory in again, and the
kernel zero-fills every page first: on the shared dev box that was most of a 64 MiB pull's CPU time
on each side (measured in BENCHMARKS.md, "Serving runtime"). Raising the two thresholds keeps
chunk-sized blocks on the heap, where freed ones are reused warm. The same holds for the model's own
per-step tensors (activations, logits), so every worker process sets it at start-up
(`cli_worker.run`) and `distserve profile` sets it before timing, so a profile times the
allocator the workers run with.

The cost is that a process keeps up to `TRIM_THRESHOLD_BYTES` of freed heap mapped (resident)
instead of returning it at once. glibc only; elsewhere, or when the operator set the thresholds
through glibc's own environment variables, nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MAX_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
ENV_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

_tuned_for = 0


def keep_freed_memory(max_chunk_bytes: int) -> bool:
    """Set glibc's thresholds so that blocks up to a few chunks in size are reused, not refaulted.
    Idempotent (only ever raises the threshold); True when the allocator was tuned."""
    global _tuned_for
    if not sys.platform.startswith("linux") or any(v in os.environ for v in ENV_VARS):
        return False
    # Room for a chunk plus gRPC framing and its read buffers (up to 4 MiB by default).
    mmap_threshold = min(MAX_MMAP_THRESHOLD_BYTES, max(8 * 1024 * 1024, 2 * max_chunk_bytes))
    if mmap_threshold <= _tuned_for:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has a no-op mallopt; others none)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = (
        mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
    if ok:
        _tuned_for = mmap_threshold
    return ok
