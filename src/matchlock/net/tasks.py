"""A TaskGroup that outlives the call that starts it, for services with connections of their own.

The proxy and the DNS forwarder are started by one call and stopped by
another, and spawn a task per connection or query from accept loops and
datagram callbacks. `Supervisor` gives all of those one owner: a
`TaskGroup` running in a single home task. `aclose()` cancels the home
task, which makes the group cancel every child and wait for them all, so
nothing outlives the service. One connection's failure is logged (by type
only: messages may quote request data) and never ends its siblings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("matchlock.net")


class Supervisor:
    def __init__(self, name: str) -> None:
        self.name = name
        self._group: asyncio.TaskGroup | None = None
        self._home: asyncio.Task | None = None
        self._closed = False
        self.active = 0  # children still running

    async def start(self) -> None:
        if self._home is not None or self._closed:
            raise RuntimeError(f"{self.name} supervisor was already started")
        ready = asyncio.get_running_loop().create_future()
        # The one spawn that no group owns: the group's own home, cancelled and awaited by aclose().
        self._home = asyncio.get_running_loop().create_task(self._run(ready), name=f"{self.name} supervisor")
        await ready

    async def _run(self, ready: asyncio.Future) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            ready.set_result(None)
            await asyncio.Event().wait()  # until aclose() cancels us, and with us every child

    @property
    def running(self) -> bool:
        return self._group is not None and not self._closed

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str = "") -> None:
        if self._group is None or self._closed:
            coroutine.close()  # never awaited: close it, or Python warns
            raise RuntimeError(f"{self.name} is not running: start() it first, and not after aclose()")
        self.active += 1
        self._group.create_task(self._guarded(coroutine, name or self.name))

    async def _guarded(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coroutine
        except Exception as exc:  # noqa: BLE001 - one connection's failure must not end the others
            log.warning("%s failed: %s", name, type(exc).__name__)
        finally:
            self.active -= 1

    async def aclose(self) -> None:
        """Cancel every child and wait until all have finished; safe to call more than once."""
        self._closed = True
        if self._home is not None:
            self._home.cancel()
            await asyncio.wait([self._home])
        self._group = None
