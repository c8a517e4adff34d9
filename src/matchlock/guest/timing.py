"""Guest uptime (ms) at each step of a start, from the wake to the first exec's exit status.

Taken only until the host's HELLO arrives, unless it carries wire.boot.DEBUG_TIMING_FLAG (a host under
MATCHLOCK_DEBUG_TIMING): then they go out as `stamps`, a list of [label, ms], in `ready` and in
the first exit status, after which no more are taken, so later commands pay nothing. Labels only,
never values. Hosts that do not know the field ignore it.
"""

from __future__ import annotations

import time

from ..wire.replies import MAX_STAMPS

stamps: list[tuple[str, float]] | None = []


def uptime() -> float:
    """Seconds since the kernel started: the clock of the times in HELLO, `ready` and the stamps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def stamp(label: str) -> None:
    # At most the host's bound, the earliest kept: execs started before the first exit status each add
    # theirs, and a longer list would make the host refuse that exit status.
    if stamps is not None and len(stamps) < MAX_STAMPS:
        stamps.append((label, round(uptime() * 1000, 1)))


def add(others: list[tuple[str, float]]) -> None:
    """Another process's stamps (an exec's children), in time order among ours."""
    if stamps is not None and others:
        stamps.extend(others)
        stamps.sort(key=lambda entry: entry[1])
        del stamps[MAX_STAMPS:]


def take(last: bool = False) -> list[tuple[str, float]]:
    """The stamps so far (cleared); `last` stops taking them."""
    global stamps
    taken = stamps or []
    stamps = None if last else []
    return taken
