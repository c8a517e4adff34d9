"""An asyncio loop on a thread that lives as long as the fixture that made it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any


class LoopThread:
    """QEMU gets a parent-death signal tied to the thread that started it, so a sandbox
    shared by several sync tests must be created and closed from one long-lived thread.

    `setup` runs first on that thread (e.g. to enter a private mount namespace); an
    exception from it is raised here, in the creator.
    """

    def __init__(self, setup: Callable[[], None] | None = None, name: str = "test-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, args=(setup,), name=name, daemon=True)
        self.thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error

    def _main(self, setup: Callable[[], None] | None) -> None:
        try:
            if setup is not None:
                setup()
        except BaseException as exc:  # noqa: BLE001 - handed to the creator
            self._error = exc
            return
        finally:
            self._started.set()
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 180) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()
