"""A private, temporary MATCHLOCK_STATE_DIR for one benchmark run, removed when it ends."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

STATE_ENV = "MATCHLOCK_STATE_DIR"


@contextlib.contextmanager
def private_state_dir() -> Iterator[Path]:
    """Use $MATCHLOCK_STATE_DIR if the caller set one (and leave it); else a temporary one, deleted after."""
    if os.environ.get(STATE_ENV):
        yield Path(os.environ[STATE_ENV])
        return
    with tempfile.TemporaryDirectory(prefix="matchlock-bench-") as state:
        os.environ[STATE_ENV] = state
        try:
            yield Path(state)
        finally:
            del os.environ[STATE_ENV]
