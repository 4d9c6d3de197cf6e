"""kvtransfer/memory.py: freed chunk-sized buffers are reused warm instead of faulted in again."""

import platform
import resource

import pytest

from distserve_worker.kvtransfer import memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator only")


def minor_faults_allocating(nbytes: int, block: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [b"\x01" * block for _ in range(nbytes // block)]  # written: every page touched
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del blocks
    return after - before


@glibc
def test_chunk_sized_blocks_are_reused_without_page_faults():
    assert memory.keep_freed_memory(2 * 1024 * 1024)
    pages = 16 * 1024 * 1024 // resource.getpagesize()
    minor_faults_allocating(16 * 1024 * 1024, 1024 * 1024)  # first time: the heap grows (faults)
    # Freed and allocated again: served from the retained heap. With glibc's defaults each 1 MiB
    # block would be mmapped afresh (or the heap trimmed) and all its pages faulted in again.
    assert minor_faults_allocating(16 * 1024 * 1024, 1024 * 1024) < pages // 4


@glibc
def test_idempotent_and_only_ever_raises_the_threshold():
    assert memory.keep_freed_memory(1024)
    assert memory.keep_freed_memory(2 * 1024 * 1024)
    assert memory._tuned_for >= 8 * 1024 * 1024
    assert memory.keep_freed_memory(1 << 40)  # capped at glibc's maximum, not refused
    assert memory._tuned_for == memory.MAX_MMAP_THRESHOLD_BYTES


def test_operator_settings_through_glibc_environment_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not memory.keep_freed_memory(2 * 1024 * 1024)
