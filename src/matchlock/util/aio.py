"""Blocking work on a thread that a cancelled caller still waits for, so no cleanup races it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def finish_in_thread(function: Callable[..., object], *args: object) -> None:
    """Run `function(*args)` on a thread; cancelled, wait for it to finish, then raise CancelledError."""
    work = asyncio.get_running_loop().run_in_executor(None, function, *args)
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        if not work.cancelled():
            work.exception()  # retrieved: a failure nobody awaits any more is not logged
        raise
