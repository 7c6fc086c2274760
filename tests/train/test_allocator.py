"""vermeil.train.keep_freed_memory: glibc keeps freed big blocks, so the next step does not page-fault them in.

Run in subprocesses: the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Resident memory before and after freeing a 256 MiB tensor that was written (so its pages were faulted in).
PROBE = textwrap.dedent(
    """
    import os, sys
    import torch
    from vermeil.train import allocator

    applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else None
    page = os.sysconf("SC_PAGE_SIZE")

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2**20

    x = torch.ones(64 * 2**20)  # 256 MiB, written
    held = rss_mib()
    del x
    print(applied, held - rss_mib())
    """
)


def _freed_mib(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_keeps_big_blocks_mapped():
    applied, returned_keep = _freed_mib("keep")
    if applied != "True":
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    _, returned_default = _freed_mib("default")
    assert returned_default > 200  # glibc's default: the block was an mmap, gone on free
    assert returned_keep < 16  # kept in the heap for the next allocation


def test_keep_freed_memory_is_a_no_op_off_linux(monkeypatch):
    from vermeil.train import allocator

    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
