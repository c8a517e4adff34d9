"""Sampling helpers shared by the benchmarks: each sample is one call's wall-clock seconds."""

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
