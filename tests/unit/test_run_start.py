"""What `run` does before QEMU's start: its namespace helper begins before the heavy imports, and
`--help` loads none of them (each of these costs every `run -- true` its import time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from matchlock.net import namespace as ns
from matchlock.sandbox import early

pytestmark = pytest.mark.timeout(60)

# Loaded by the sandbox, the owner, the state store, the image store and the proxy: never before the helper starts.
HEAVY = ("asyncio", "sqlite3", "ssl", "matchlock.sandbox.sandbox", "matchlock.cli.owner", "matchlock.state.store",
         "matchlock.image.store", "matchlock.vm.machine", "matchlock.net.proxy", "cryptography")  # fmt: skip

PROBE = """
import json, sys
from matchlock.sandbox import early
seen = {}

def start_early(mtu):
    seen["mtu"], seen["loaded"] = mtu, sorted(m for m in sys.modules if m.split(".")[0] in ("asyncio", "sqlite3", "ssl", "matchlock", "cryptography"))
    raise SystemExit(0)

early.start_early = start_early
from matchlock.cli import main
sys.argv = ["matchlock", *sys.argv[1:]]
try:
    main.main()
except SystemExit:
    pass
print(json.dumps(seen))
"""


def _probe(tmp_path, *args: str) -> dict:
    env = {**os.environ, "MATCHLOCK_STATE_DIR": str(tmp_path / "state"), "MATCHLOCK_CACHE_DIR": str(tmp_path / "c")}
    env.pop("MATCHLOCK_DEBUG_TIMING", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heavy(loaded: list[str]) -> list[str]:
    return [m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY]


def test_run_starts_its_namespace_helper_before_the_heavy_imports(tmp_path):
    seen = _probe(tmp_path, "run", "--mtu", "1400", "--", "true")
    assert seen["mtu"] == 1400
    assert "matchlock.cli.run" in seen["loaded"]  # the probe saw the real `run`, not an early exit
    assert _heavy(seen["loaded"]) == []


@pytest.mark.parametrize("flags", [("--no-network",), ("-d",), ("--from-snapshot", "snap")])
def test_run_starts_no_early_helper_when_it_would_not_take_it(tmp_path, flags):
    # --no-network has no namespace; `-d` hands the run to a child; a snapshot may bring its own network.
    # (--timeout 0 then ends the run with a usage error, before anything else.)
    assert _probe(tmp_path, "run", "--timeout", "0", *flags, "--", "true") == {}
    assert _probe(tmp_path, "run", "--timeout", "0", "--", "true") != {}  # the probe does see an early start


def test_run_help_loads_no_heavy_module(tmp_path):
    env = {**os.environ, "MATCHLOCK_STATE_DIR": str(tmp_path / "state")}
    code = "import sys\nfrom matchlock.cli import main\nsys.argv = ['matchlock', 'run', '--no-network', '--help']\n"
    code += "try:\n    main.main()\nexcept SystemExit:\n    pass\nprint('\\n'.join(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=50)
    assert proc.returncode == 0 and "Usage: matchlock run" in proc.stdout, proc.stderr[-2000:]
    assert _heavy(proc.stdout.splitlines()) == []


def test_a_sandbox_network_takes_the_early_namespace_of_its_mtu():
    early.start_early(1400)
    try:
        began = early._early
        assert began is not None and began._helper is not None  # spawned, running beside the caller
        namespace = early.take_early(1400)
        assert namespace is began and early._early is None
        namespace.create()  # collects the helper's descriptors
        assert namespace.tap_fd is not None and namespace.inode is not None and ns.namespace_alive(namespace.inode)
        namespace.close()
        assert not ns.namespace_alive(namespace.inode)
    finally:
        early.discard_early()


def test_an_early_namespace_nobody_takes_is_released(monkeypatch):
    fds_before = len(os.listdir("/proc/self/fd"))
    early.start_early(1400)
    first = early._early._helper[1]  # type: ignore[union-attr]
    other = early.take_early(1500)  # another MTU: the early helper is killed, a new namespace is made on demand
    assert other.mtu == 1500 and other._helper is None and early._early is None
    assert first.returncode is not None  # killed and reaped: no zombie
    early.start_early(1400)
    helper = early._early._helper[1]  # type: ignore[union-attr]
    early.discard_early()  # `run` failed before its sandbox took it
    assert helper.returncode is not None and early._early is None
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_a_run_that_fails_after_its_flags_releases_the_early_helper(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from matchlock.cli.run import run

    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(tmp_path / "state"))
    spawned = []
    real = early.start_early

    def start_early(mtu):
        real(mtu)
        spawned.append(early._early._helper[1])  # type: ignore[union-attr]

    monkeypatch.setattr(early, "start_early", start_early)
    result = CliRunner().invoke(run, ["--timeout", "0", "--", "true"])  # a usage error after the early start
    assert "invalid --timeout 0" in str(result.exception) + result.output
    assert len(spawned) == 1 and spawned[0].returncode is not None and early._early is None


async def test_aclose_releases_the_tap_on_a_thread_of_its_own():
    namespace = ns.SandboxNamespace(1500)
    namespace.create()
    tap, inode = namespace.tap_fd, namespace.inode
    assert tap is not None and inode is not None
    await namespace.aclose()  # returns without waiting for the device to be unregistered
    assert namespace.tap_fd is None and not ns.namespace_alive(inode)
    for thread in threading.enumerate():
        if thread.name == "tap close":
            thread.join(10)
    with pytest.raises(OSError):
        os.fstat(tap)  # closed by that thread


@pytest.fixture
def no_disks(monkeypatch, tmp_path):
    """Sandbox.create with stand-in image, kernel and runtime files (the namespace and proxy are real)."""
    import types

    from matchlock.api.image import ImageConfig
    from matchlock.image import runtime, store
    from matchlock.sandbox import sandbox

    for name in ("lower.img", "kernel", "runtime.img"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setenv("MATCHLOCK_CACHE_DIR", str(tmp_path / "cache"))
    image = types.SimpleNamespace(config=ImageConfig(), lower_path=tmp_path / "lower.img")
    monkeypatch.setattr(store.ImageStore, "resolve", lambda self, name: image)
    monkeypatch.setattr(runtime, "ensure_runtime_disk", lambda: tmp_path / "runtime.img")
    kernel = types.SimpleNamespace(path=tmp_path / "kernel", initrd=None, cmdline=[], acpi=False)
    monkeypatch.setattr("matchlock.kernel.resolve", lambda kernel_path=None: kernel)
    monkeypatch.setattr(sandbox.SandboxPaths, "of", staticmethod(lambda vm_id: sandbox.SandboxPaths(tmp_path / vm_id)))
    return sandbox


async def test_the_proxy_starts_beside_qemu_and_a_failed_boot_still_closes_it(no_disks, monkeypatch):
    from matchlock.api.config import SandboxConfig
    from matchlock.api.errors import VMError

    seen: dict = {}

    async def boot(self, spec, *, use_template=True, rooted=False):
        seen["beside"] = self._proxy_started is not None and not self._proxy_started.done()
        await self._proxy_started
        seen["sandbox"] = self
        raise VMError("QEMU stand-in: stop here")

    monkeypatch.setattr(no_disks.Sandbox, "_boot", boot)
    with pytest.raises(VMError, match="stop here"):  # the boot's own error, not a group
        await no_disks.Sandbox.create(SandboxConfig(image="stand-in"), vm_id="vm-0000beef")
    assert seen["beside"]  # QEMU's start began while the proxy was still starting
    network = seen["sandbox"].network
    assert network.proxy is not None and network.namespace.fd is None  # started, then released with the sandbox


async def test_a_proxy_that_cannot_start_fails_the_create_with_its_own_error(no_disks, monkeypatch):
    import asyncio

    from matchlock.api.config import SandboxConfig
    from matchlock.api.errors import SetupError
    from matchlock.sandbox.network import SandboxNetwork

    booting = asyncio.Event()

    async def start_proxy(self):
        await booting.wait()
        raise SetupError("proxy stand-in failed")

    async def boot(self, spec, *, use_template=True, rooted=False):
        booting.set()
        await asyncio.Event().wait()  # QEMU restoring, until the proxy's failure cancels it

    monkeypatch.setattr(SandboxNetwork, "start_proxy", start_proxy)
    monkeypatch.setattr(no_disks.Sandbox, "_boot", boot)
    with pytest.raises(SetupError, match="proxy stand-in failed"):
        await no_disks.Sandbox.create(SandboxConfig(image="stand-in"), vm_id="vm-0000bee0")


async def test_only_a_store_image_boots_from_a_rooted_template(no_disks, monkeypatch):
    """`build`'s per-step images (image=) and snapshot restores (restore=) use the plain template."""
    import types

    from matchlock.api.config import SandboxConfig
    from matchlock.api.errors import VMError
    from matchlock.api.image import ImageConfig

    seen: list[tuple[bool, bool]] = []

    async def boot(self, spec, *, use_template=True, rooted=False):
        seen.append((use_template, rooted))
        raise VMError("QEMU stand-in: stop here")

    monkeypatch.setattr(no_disks.Sandbox, "_boot", boot)
    step_image = types.SimpleNamespace(config=ImageConfig(), lower_path=no_disks.SandboxPaths.of("x").root / "step")
    restore = types.SimpleNamespace(full=False, make_upper=lambda path: path.write_bytes(b""))
    for vm_id, extra in (
        ("vm-000000a1", {}),
        ("vm-000000a2", {"image": step_image}),
        ("vm-000000a3", {"restore": restore}),
    ):
        with pytest.raises(VMError, match="stop here"):
            await no_disks.Sandbox.create(SandboxConfig(image="stand-in"), vm_id=vm_id, **extra)
    assert seen == [(True, True), (True, False), (True, False)]
