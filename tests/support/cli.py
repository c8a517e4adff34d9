"""The real `matchlock` console script, run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")


@dataclass
class CLIResult:
    returncode: int
    stdout: str | bytes
    stderr: str | bytes

    def __repr__(self) -> str:
        return f"<rc={self.returncode} stdout={self.stdout[-3000:]!r} stderr={self.stderr[-2000:]!r}>"


def run_matchlock(
    *args: str,
    input: bytes | str | None = None,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> CLIResult:
    """`matchlock *args` with os.environ plus `env`; text mode unless `input` is bytes.

    `wrap` turns the argv into the command that runs it (e.g. inside a private mount namespace).
    """
    argv = [MATCHLOCK, *args]
    proc = subprocess.run(
        wrap(argv) if wrap else argv,
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        text=not isinstance(input, bytes),
    )
    return CLIResult(proc.returncode, proc.stdout, proc.stderr)
