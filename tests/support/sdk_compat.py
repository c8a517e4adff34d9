"""The published Python SDK in a throwaway venv, for tests/vm/test_sdk_compat.py and tests/vm/test_vfs.py.

The venv is cached per version under ~/.cache/matchlock/sdk-compat/<version>/venv. The test session runs
in a network namespace with only loopback, where PyPI is unreachable, so tests/conftest.py calls
`prefetch` before it enters the namespace, and records a failure in $MATCHLOCK_SDK_COMPAT_ERROR for
the test to report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PUBLISHED_VERSION = "0.2.17"
ERROR_ENV = "MATCHLOCK_SDK_COMPAT_ERROR"
# The tests that run the published SDK: selecting either prefetches it.
TEST_FILES = ("tests/vm/test_sdk_compat.py", "tests/vm/test_vfs.py")


def venv_dir(version: str = PUBLISHED_VERSION) -> Path:
    return Path.home() / ".cache" / "matchlock" / "sdk-compat" / version / "venv"


def venv_python(version: str = PUBLISHED_VERSION) -> Path:
    return venv_dir(version) / "bin" / "python"


def installed_version(version: str = PUBLISHED_VERSION) -> str | None:
    python = venv_python(version)
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('matchlock'))"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure(version: str = PUBLISHED_VERSION) -> Path:
    """The venv's python with `matchlock==version` from PyPI; raises RuntimeError naming the failure."""
    if installed_version(version) == version:
        return venv_python(version)
    target = venv_dir(version)
    shutil.rmtree(target, ignore_errors=True)  # a half-built venv from an interrupted install
    target.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(target)],
        [str(target / "bin" / "python"), "-m", "pip", "install", "--no-input", "--quiet", f"matchlock=={version}"],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"installing the published SDK failed: {' '.join(argv)} exited {done.returncode}:\n"
                f"{done.stderr.strip()[-2000:]}\nfix: make PyPI reachable (or a pip index with "
                f"matchlock=={version}) and rerun"
            )
    if installed_version(version) != version:
        raise RuntimeError(f"the venv at {target} does not provide matchlock=={version} after installing it")
    return venv_python(version)


def wanted(argv: list[str]) -> bool:
    """Does this pytest command line select a test of TEST_FILES (a full run, or a path that covers one)?"""
    paths = [arg.split("::")[0].rstrip("/") for arg in argv if not arg.startswith("-")]
    paths = [path for path in paths if os.path.exists(path)]
    if not paths:
        return True
    return any(
        file == path or file.startswith(path + "/") or path in ("tests", ".") for path in paths for file in TEST_FILES
    )


def prefetch(argv: list[str]) -> None:
    """Called outside the test namespace; never raises, so the rest of the session is unaffected."""
    if not wanted(argv):
        return
    try:
        ensure()
    except (RuntimeError, OSError) as exc:
        os.environ[ERROR_ENV] = str(exc)
