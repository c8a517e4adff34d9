"""Local terminal helpers shared by `run` and `exec` (no sandbox imports: `exec` stays light)."""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator

from ..wire.agent import TerminalSize


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
