"""Local terminal helpers shared by `run` and `exec` (no sandbox imports: `exec` stays light)."""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections.abc import Callable, Iterator

from ..wire.agent import TerminalSize

BROKEN_PIPE_EXIT = 128 + 13  # what a shell reports for a command killed by SIGPIPE


class OutputSink:
    """Writes to a local fd and tees into the console log.

    When the reader goes away (EPIPE), it stops writing and calls `on_broken`
    once, so the caller can cancel the command instead of draining it forever.
    """

    def __init__(self, fd: int, log=None, on_broken: Callable[[OSError], None] | None = None) -> None:
        self.fd = fd
        self.log = log
        self.on_broken = on_broken
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
            except OSError as exc:  # EPIPE, and any other reason the output is gone (ENOSPC)
                self.broken = True
                if self.on_broken is not None:
                    self.on_broken(exc)


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
