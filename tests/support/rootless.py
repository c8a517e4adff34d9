"""Running matchlock code as another (unprivileged) user in tests.

The test venv's interpreter may live under root's home, which other users cannot enter, so code run
as another user uses the system's interpreter of the same version with the venv's packages and the
source tree on its path (CPython 3.11 builds share their extension ABI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def interpreter() -> str:
    """A Python of this version that any user may execute."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}", sys.executable):
        if os.path.exists(candidate) and os.stat(candidate).st_mode & 0o001:
            return candidate
    pytest.fail(f"no {version} that other users can execute; fix: apt-get install {version}")


def environment(**extra: str) -> dict[str, str]:
    """This environment with our packages importable, for a process of another user."""
    path = [str(SRC), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)), **extra}


def as_user(uid: int, gid: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `argv` as uid:gid with no supplementary groups (capture_output and text unless given)."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv not found; fix: apt-get install util-linux"
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("cwd", "/")
    kwargs.setdefault("env", environment())
    return subprocess.run([setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv], **kwargs)
