"""Pull progress: bars on a terminal, a line per layer on other stderr, silence for library callers.

Retries and notes (why a pull started) are reported the same way, so a slow or
failing registry never looks like a hang.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import TaskID


_MB = 1024 * 1024


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


class PullProgress:
    """The quiet default for library callers (the RPC server), which own no terminal."""

    def layer(self, digest: str, total: int) -> Callable[[int], None]:
        return lambda n: None

    def done(self, digest: str, note: str = "") -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def retry(self, delay: float, reason: str) -> None:
        pass

    def __enter__(self) -> PullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class LineProgress(PullProgress):
    """A line per finished layer, retry and note: what a log file or a pipe can show."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()  # layers finish on worker threads

    def _line(self, text: str) -> None:
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()

    def layer(self, digest: str, total: int) -> Callable[[int], None]:
        with self._lock:
            self._sizes[digest] = total
        return lambda n: None

    def done(self, digest: str, note: str = "") -> None:
        size = self._sizes.get(digest, 0)
        shown = f"{size / _MB:.1f} MB" if size >= _MB else f"{size / 1024:.1f} kB"
        self._line(f"{short(digest)}: {'already present' if note == 'exists' else note or 'downloaded'} ({shown})")

    def note(self, text: str) -> None:
        self._line(text)

    def retry(self, delay: float, reason: str) -> None:
        self._line(f"retrying in {delay:.1f}s: {reason}")


class TerminalProgress(PullProgress):
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def _task(self, digest: str, total: int) -> TaskID:
        with self._lock:
            if digest not in self._tasks:
                self._tasks[digest] = self._progress.add_task(short(digest), total=total)
            return self._tasks[digest]

    def layer(self, digest: str, total: int) -> Callable[[int], None]:
        task = self._task(digest, total)
        return lambda n: self._progress.advance(task, n)

    def done(self, digest: str, note: str = "") -> None:
        task = self._tasks.get(digest)
        if task is None:
            return
        current = self._progress.tasks[task]
        label = current.description.split(" ")[0]
        self._progress.update(task, completed=current.total, description=f"{label} {note}".strip())

    def note(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def retry(self, delay: float, reason: str) -> None:
        self.note(f"retrying in {delay:.1f}s: {reason}")


def for_stderr() -> PullProgress:
    return TerminalProgress() if sys.stderr.isatty() else LineProgress(sys.stderr)
