"""Sampling helpers shared by the benchmarks: wall-clock samples (each one call's seconds) and a process's
memory from /proc."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(runs: int, call: Callable[[], object]) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


async def timed_async(runs: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def smaps_rollup(pid: int) -> dict[str, int]:
    """KiB per field of /proc/PID/smaps_rollup (Rss, Pss, Private_Dirty, ...)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {
            key: int(rest.split()[0]) for key, _, rest in (line.partition(":") for line in f) if rest.endswith("kB\n")
        }
