"""Per-layer progress bars on a terminal, silence everywhere else."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable


class PullProgress:
    """The quiet default: pipes, files and tests get no bars."""

    def layer(self, digest: str, total: int) -> Callable[[int], None]:
        return lambda n: None

    def done(self, digest: str, note: str = "") -> None:
        pass

    def __enter__(self) -> PullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


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
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=Console(stderr=True), transient=False,
        )  # fmt: skip
        self._tasks: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def _task(self, digest: str, total: int) -> int:
        with self._lock:
            if digest not in self._tasks:
                self._tasks[digest] = self._progress.add_task(digest.removeprefix("sha256:")[:12], total=total)
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


def for_stderr() -> PullProgress:
    return TerminalProgress() if sys.stderr.isatty() else PullProgress()
