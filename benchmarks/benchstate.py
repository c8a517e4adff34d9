"""A private, temporary MATCHLOCK_STATE_DIR for one benchmark run, removed when it ends."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

STATE_ENV = "MATCHLOCK_STATE_DIR"
ISOLATED_ENV = "MATCHLOCK_BENCH_ISOLATED"


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


def isolate(name: str, *, private_mounts: bool = False) -> None:
    """Re-run this script in a fresh network namespace (and mount namespace if asked), with only loopback up:
    the sandboxes' proxies and anything else it starts can reach nothing beyond this machine."""
    if os.environ.get(ISOLATED_ENV) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0:
        sys.exit(f"{name} makes network namespaces: run it as root")
    os.environ[ISOLATED_ENV] = "1"
    mounts = ["--mount", "--propagation", "private"] if private_mounts else []
    os.execvp("unshare", ["unshare", "--net", *mounts, "--", sys.executable, *sys.argv])
