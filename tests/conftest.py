"""Shared fixtures.

VM tests boot real QEMU machines. They need the guest kernel and runtime
built by `scripts/setup.sh`; when those are missing the tests FAIL with the
fix, they are never skipped. Every test gets its own state directory
(MATCHLOCK_STATE_DIR) and shares the expensive caches in ~/.cache/matchlock.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MATCHLOCK = str(Path(sys.executable).parent / "matchlock")
ISOLATED_ENV = "MATCHLOCK_TESTS_ISOLATED"


def pytest_configure(config) -> None:
    """Run the whole session in a private network namespace with only loopback.

    Sandboxes have networking by default and their proxy dials out from the
    namespace of the process that owns them. Inside this namespace nothing
    can reach the outside world: network tests add their own stand-in hosts
    (documentation addresses in namespaces they create), and every other
    test simply has nowhere to send traffic.
    """
    if os.environ.get(ISOLATED_ENV) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0:
        pytest.exit("the tests boot VMs and create network namespaces: run them as root", returncode=2)
    os.environ[ISOLATED_ENV] = "1"
    sys.stdout.flush()
    os.execvp("unshare", ["unshare", "--net", "--", sys.executable, "-m", "pytest", *sys.argv[1:]])


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(state))
    return state


@pytest.fixture(scope="session")
def vm_prerequisites() -> None:
    """Fail (not skip) with the fix when VMs cannot boot here."""
    from matchlock.api.errors import MatchlockError
    from matchlock.image.runtime import ensure_runtime_disk
    from matchlock.kernel import resolve

    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/setup.sh (apt-get install qemu-system-x86)")
    try:
        resolve(build_fallback=True)
        ensure_runtime_disk()
    except MatchlockError as exc:
        pytest.fail(f"VM tests cannot run: {exc}\nfix: run scripts/setup.sh")


class CLIResult:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def __repr__(self) -> str:
        return f"<rc={self.returncode} stdout={self.stdout[-2000:]!r} stderr={self.stderr[-2000:]!r}>"


@pytest.fixture
def cli(state_dir):
    """Run the real `matchlock` console script; returns a CLIResult."""

    def run(*args: str, input: bytes | str | None = None, timeout: float = 180, env: dict | None = None) -> CLIResult:
        full_env = {**os.environ, **(env or {})}
        text = not isinstance(input, bytes)
        proc = subprocess.run(
            [MATCHLOCK, *args], input=input, capture_output=True, timeout=timeout, env=full_env, text=text
        )
        return CLIResult(proc)

    return run


class LoopThread:
    """An asyncio loop on a thread that lives for the whole fixture.

    QEMU gets a parent-death signal tied to the thread that started it, so
    the sandbox must be created and closed from this long-lived thread.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def module_state_dir(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    old = os.environ.get("MATCHLOCK_STATE_DIR")
    os.environ["MATCHLOCK_STATE_DIR"] = str(state)
    yield state
    if old is None:
        os.environ.pop("MATCHLOCK_STATE_DIR", None)
    else:
        os.environ["MATCHLOCK_STATE_DIR"] = old


@pytest.fixture(scope="module")
def sandbox(vm_prerequisites, loop_thread, module_state_dir):
    """One booted sandbox on the built-in image, shared by a test module."""
    from matchlock.api.config import SandboxConfig
    from matchlock.sandbox.sandbox import Sandbox

    box = loop_thread.run(Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin")))
    yield box
    loop_thread.run(box.close())
