"""Local terminal helpers shared by `run` and `exec` (no sandbox imports: `exec` stays light)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import threading
import tty
from collections.abc import Iterator

from ..wire.agent import TerminalSize

READ_CHUNK = 64 * 1024


class OutputSink:
    """Writes to a local fd and tees into the console log; stops quietly on EPIPE."""

    def __init__(self, fd: int, log=None) -> None:
        self.fd = fd
        self.log = log
        self.broken = False

    def __call__(self, data: bytes) -> None:
        if self.log is not None:
            self.log.write(data)
        view = memoryview(data)
        while view and not self.broken:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError):
                self.broken = True


def start_stdin_reader(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Read stdin on a daemon thread: works for ttys, pipes and regular files
    alike, never flips the shared terminal to non-blocking, and cannot keep
    the process alive at exit."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=16)

    def reader() -> None:
        while True:
            try:
                data = os.read(sys.stdin.fileno(), READ_CHUNK)
            except OSError:
                data = b""
            future = asyncio.run_coroutine_threadsafe(queue.put(data), loop)
            try:
                future.result()
            except Exception:  # noqa: BLE001 - loop closed: nothing left to feed
                return
            if not data:
                return

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    return queue


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size() -> TerminalSize:
    size = os.get_terminal_size(sys.stdout.fileno())
    return TerminalSize(max(size.lines, 1), max(size.columns, 1))


