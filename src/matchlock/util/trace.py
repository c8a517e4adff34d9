"""`MATCHLOCK_DEBUG_TIMING=1`: a timeline of one command on stderr, for finding where a start goes.

Each `mark()` prints the milliseconds since the start and since the previous mark. The start is
this module's import (just after the CLI imported click), or, when the variable holds a
CLOCK_MONOTONIC reading with a decimal point (benchmarks/bench_run_latency.py sets it just
before it spawns the command), that instant, so the interpreter's own start is in the timeline.
Labels name steps only, never values: no secret can reach it. Off, a mark costs one test.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "MATCHLOCK_DEBUG_TIMING"
_VALUE = os.environ.get(ENV, "")
ENABLED = _VALUE not in ("", "0")


def _start() -> float:
    if "." in _VALUE:
        try:
            return float(_VALUE)  # perf_counter is CLOCK_MONOTONIC on Linux
        except ValueError:
            pass
    return time.perf_counter()


_START = _start() if ENABLED else 0.0
_last = _START


def mark(label: str) -> None:
    global _last
    if not ENABLED:
        return
    now = time.perf_counter()
    print(
        f"[timing] {(now - _START) * 1000:8.1f} ms (+{(now - _last) * 1000:6.1f}) {label}", file=sys.stderr, flush=True
    )
    _last = now


def guest_phases(hello: dict, ready_ms: int | None) -> None:
    """The guest's side of a start, from its own uptime stamps in HELLO and `ready`."""
    if not ENABLED:
        return
    try:
        woke, said_hello, ready = int(hello["init_started_ms"]), int(hello["hello_ms"]), int(ready_ms or 0)
    except (KeyError, TypeError, ValueError):  # a guest's values: never trusted to be there
        mark("  guest side: no timing stamps")
        return
    mark(f"  guest side: init to HELLO {said_hello - woke} ms, HELLO to ready {ready - said_hello} ms")


def guest_stamps(stamps: tuple[tuple[str, float], ...] | None) -> None:
    """The guest's own timeline (its `stamps`: [label, uptime ms] pairs, checked by wire/replies.py), relative
    to its first stamp. Lines start `[timing]   guest`, so they never parse as the host's marks."""
    if not ENABLED or not stamps:
        return
    first = previous = stamps[0][1]
    for label, at in stamps:
        print(f"[timing]   guest {at - first:8.1f} ms (+{at - previous:6.1f}) {label}", file=sys.stderr, flush=True)
        previous = at
