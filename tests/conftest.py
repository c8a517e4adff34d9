"""Shared fixtures.

VM tests boot real QEMU machines. They need the guest kernel and runtime
built by `scripts/setup.sh`; when those are missing the tests FAIL with the
fix, they are never skipped. Every test gets its own state directory
(MATCHLOCK_STATE_DIR) and shares the expensive caches in ~/.cache/matchlock;
a test that writes to the cache takes `cache_dir` (a private, empty one).
Helpers that are not fixtures live in tests/support.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import run_matchlock
from support.loop_thread import LoopThread

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
    from support.sdk_compat import prefetch

    prefetch(sys.argv[1:])  # PyPI is out of reach inside the namespace
    os.environ[ISOLATED_ENV] = "1"
    sys.stdout.flush()
    os.execvp("unshare", ["unshare", "--net", "--", sys.executable, "-m", "pytest", *sys.argv[1:]])


def pytest_collection_finish(session) -> None:
    """VM tests run on one kernel: a tuned kernel building in the background (`matchlock setup`) is waited for.

    Otherwise it would land mid-session and switch the kernel under half the tests.
    """
    if not any(item.get_closest_marker("vm") for item in session.items):
        return
    from matchlock.kernel import background

    if background.status().state == "running":
        background.wait(log=lambda message: print(f"\n{message} (VM tests run on one kernel)", flush=True))


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(state))
    return state


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private, empty MATCHLOCK_CACHE_DIR: images, kernels and packages the test makes stay in it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def busybox_path(tmp_path_factory) -> Path:
    """Debian's static busybox, from the package cache that scripts/setup.sh filled."""
    from matchlock.util import debian

    root = tmp_path_factory.mktemp("busybox")
    debian.extract(debian.download(["busybox-static"])["busybox-static"], root)
    return root / "bin" / "busybox"


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


@pytest.fixture
def cli(state_dir):
    """Run the real `matchlock` console script (support.cli.run_matchlock); returns a CLIResult."""
    return run_matchlock


@pytest.fixture(scope="module")
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def module_state_dir(tmp_path_factory):
    """`state_dir` for a test module whose tests share one sandbox."""
    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MATCHLOCK_STATE_DIR", str(state))
        yield state


@pytest.fixture(scope="module")
def sandbox(vm_prerequisites, loop_thread, module_state_dir):
    """One booted sandbox on the built-in image, shared by a test module."""
    from matchlock.api.config import SandboxConfig
    from matchlock.sandbox.sandbox import Sandbox

    box = loop_thread.run(Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin")))
    yield box
    loop_thread.run(box.aclose())
