"""An owner gives the heap its start freed back to the system once the sandbox is up (cli/owner.py)."""

from __future__ import annotations

import ctypes

from matchlock.cli import owner


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_an_idle_owner_returns_the_heap_its_start_freed() -> None:
    # 1000-byte objects come from malloc (pymalloc takes up to 512). A live block above them keeps
    # free() from trimming the heap's top, as the start's long-lived objects do in a real owner.
    freed = [bytes(1000) for _ in range(24_000)]
    above = [bytes(1000) for _ in range(100)]
    held = _rss_kib()
    del freed
    assert _rss_kib() > held - 8 * 1024, "free() alone returned the blocks: the test shows nothing"
    owner._return_freed_memory()
    assert _rss_kib() < held - 16 * 1024
    assert len(above) == 100


def test_a_libc_without_malloc_trim_is_no_error(monkeypatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    owner._return_freed_memory()
