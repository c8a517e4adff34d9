"""stdin/stdout of `matchlock rpc`: one reader thread, one writer thread, asyncio on the other side.

Threads rather than loop pipe transports because stdin/stdout may be pipes, files, sockets or
terminals, and a blocking read or write must never stall the loop or hold up interpreter exit
(both threads are daemons). The writer is the only code that writes protocol lines, so lines
never interleave; it applies backpressure through `send()` once too much output is queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading

from ..jsonrpc import Message, encode

log = logging.getLogger("matchlock.rpc")

READ_SIZE = 1024 * 1024
# Above this many queued bytes, senders of output wait for the client to read.
HIGH_WATER = 4 * 1024 * 1024


READ_AHEAD = 4  # chunks the thread reads before the server takes them
LOOP_CHECK_SECONDS = 0.5  # how often a thread waiting for room looks whether the server is gone


class StdinReader:
    """Reads `fd` on a daemon thread; `read()` returns the next chunk, b"" at EOF or on a read error.

    The thread hands chunks over with `call_soon_threadsafe`, never a coroutine or a future: when the
    server ends with input still unread (after `close`), there is nothing to cancel, so the thread ends
    quietly instead of dying with a traceback (or leaving a coroutine never awaited)."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._loop = loop
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._room = threading.Semaphore(READ_AHEAD)  # released as the server takes chunks
        self._thread = threading.Thread(target=self._run, name="rpc-stdin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def read(self) -> bytes:
        chunk = await self._queue.get()
        self._room.release()
        return chunk

    def _run(self) -> None:
        while True:
            while not self._room.acquire(timeout=LOOP_CHECK_SECONDS):
                if self._loop.is_closed():
                    return
            try:
                chunk = os.read(self._fd, READ_SIZE)
            except OSError as exc:
                log.warning("reading stdin failed: %s", exc)
                chunk = b""
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
            except RuntimeError:
                return  # the loop is gone: nobody is listening any more
            if not chunk:
                return


class StdoutWriter:
    """Writes encoded messages to `fd` in order from one daemon thread."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, high_water: int = HIGH_WATER) -> None:
        self._fd = fd
        self._loop = loop
        self._high_water = high_water
        self._lines: collections.deque[bytes] = collections.deque()
        self._wake = threading.Condition()
        self._queued = 0  # bytes accepted but not yet written; touched on the loop only
        self._drained = asyncio.Event()
        self._drained.set()
        self._room = asyncio.Event()
        self._room.set()
        self.broken = asyncio.Event()  # set when a write failed: the client is gone
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="rpc-stdout", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send_nowait(self, message: Message) -> None:
        """Queue a line now (responses and control replies: never blocked by the high-water mark)."""
        if self.broken.is_set() or self._closing:
            return
        line = encode(message)
        self._queued += len(line)
        self._drained.clear()
        if self._queued >= self._high_water:
            self._room.clear()
        with self._wake:
            self._lines.append(line)
            self._wake.notify()

    async def send(self, message: Message) -> None:
        """Queue a line, first waiting while the client is behind (flow control for output)."""
        while not self._room.is_set() and not self.broken.is_set():
            await self._room.wait()
        self.send_nowait(message)

    async def flush(self, timeout: float) -> None:
        """Wait until everything queued is written (or the pipe broke), at most `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._drained.wait()  # also set when the pipe breaks

    def close(self) -> None:
        """Stop accepting lines; the thread exits once its queue is empty."""
        self._closing = True
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._lines and not self._closing:
                    self._wake.wait()
                if not self._lines:
                    return
                line = self._lines.popleft()
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                log.warning("writing stdout failed: %s", exc)
                self._call(self._failed)
                return
            self._call(self._written, len(line))

    def _call(self, callback, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed
            self._loop.call_soon_threadsafe(callback, *args)

    def _written(self, nbytes: int) -> None:
        self._queued -= nbytes
        if self._queued < self._high_water:
            self._room.set()
        if self._queued == 0:
            self._drained.set()

    def _failed(self) -> None:
        self.broken.set()
        self._room.set()
        self._drained.set()
