"""Boot templates: start sandboxes from a snapshot of an already-booted guest.

Under emulation most of a cold start is the kernel booting and Python
starting in the guest (about a second). A template is a VM booted once,
with placeholder disks, up to the point where the guest init has loaded the
agent and waits for the host; its state is saved with QEMU's migration. A
new sandbox starts QEMU with `-incoming` from that state and its own disks,
and is ready in a fraction of the time.

Clones must not share secrets or randomness: the template holds neither
(the sandbox's settings, CA and secrets arrive later, in the handshake),
and every clone is woken with fresh host entropy that the guest mixes into
its kernel RNG and uses to force a new CRNG key.

Templates are keyed by everything that shapes the machine (QEMU, kernel,
runtime disk, memory, vCPUs, accelerator, devices), built on first use under
a lock, and a failure to build or restore one is never fatal: the sandbox
boots cold instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path

from ..api.fsutil import file_lock
from ..api.paths import cache_dir
from .machine import Machine, MachineSpec, build_argv

TEMPLATE_VERSION = "1"
TEMPLATE_FLAG = "matchlock.template=1"
TEMPLATE_READY = b"T"
WAKE_SIZE = 64
PLACEHOLDER_SIZE = 1 << 40  # sparse: the guest sees room for any real disk
BUILD_TIMEOUT = 120.0
KEEP_TEMPLATES = 6
DISABLE_ENV = "MATCHLOCK_NO_TEMPLATES"


def templates_dir() -> Path:
    return cache_dir() / "templates"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


def _identity(path: Path | None) -> str:
    if path is None:
        return "-"
    stat = os.stat(path)
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


def template_spec(spec: MachineSpec, root: Path) -> MachineSpec:
    """The machine a template is booted as: same devices, placeholder disks, the wait flag."""
    placeholders = {"lower": root / "placeholder-lower.img", "upper": root / "placeholder-upper.img"}
    for path in placeholders.values():
        if not path.exists() or path.stat().st_size != PLACEHOLDER_SIZE:
            with open(path, "wb") as f:
                f.truncate(PLACEHOLDER_SIZE)
    disks = tuple(
        dataclasses.replace(disk, path=placeholders[disk.serial]) if disk.serial in placeholders else disk
        for disk in spec.disks
    )
    return dataclasses.replace(
        spec, name="template", disks=disks, console_log=root / "console.log",
        kernel_args=tuple(spec.kernel_args) + (TEMPLATE_FLAG,), incoming=None,
    )  # fmt: skip


def template_key(spec: MachineSpec) -> str:
    qemu = shutil.which("qemu-system-x86_64")
    argv = build_argv(dataclasses.replace(spec, console_log=Path("/console")), 3, 4)
    parts = [
        TEMPLATE_VERSION,
        _identity(Path(qemu)) if qemu else "-",
        _identity(spec.kernel),
        _identity(spec.initrd),
        *(f"{d.serial}:{_identity(d.path) if d.serial == 'runtime' else ''}" for d in spec.disks),
        " ".join(a for a in argv if not a.startswith(("file=", "id=disk")) and "path=" not in a),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


class TemplateCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or templates_dir()

    async def ensure(self, spec: MachineSpec, network_wrapper=None) -> Path:
        """The saved state for this machine shape, building it if needed.

        `network_wrapper` provides (argv prefix, fds) for a temporary network
        namespace when the machine has a NIC: the template's TAP must exist
        while it boots, in a namespace of its own.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        base = template_spec(spec, self.root)
        key = template_key(base)
        state = self.root / key / "state"
        if state.exists():
            os.utime(state)
            return state
        with file_lock(self.root / f"{key}.lock"):
            if state.exists():
                return state
            await self._build(base, state, network_wrapper)
        self._prune()
        return state

    async def _build(self, spec: MachineSpec, state: Path, network_wrapper) -> None:
        state.parent.mkdir(parents=True, exist_ok=True)
        spec = dataclasses.replace(spec, console_log=state.parent / "console.log")
        spec.console_log.write_text("")
        cleanup = None
        if spec.network is not None and network_wrapper is not None:
            wrapper, fds, cleanup = network_wrapper()
            spec = dataclasses.replace(spec, network=dataclasses.replace(spec.network, wrapper=wrapper, pass_fds=fds))
        machine = Machine(spec)
        try:
            sock = await machine.start()
            loop = asyncio.get_running_loop()
            marker = await asyncio.wait_for(loop.sock_recv(sock, 1), BUILD_TIMEOUT)
            if marker != TEMPLATE_READY:
                raise RuntimeError(f"template guest sent {marker!r} instead of its ready marker")
            assert machine.qmp is not None
            await machine.qmp.execute("stop")
            partial = state.with_name("state.partial")
            await machine.qmp.execute("migrate", uri=f"exec:cat > {partial}")
            deadline = time.monotonic() + BUILD_TIMEOUT
            while True:
                status = (await machine.qmp.execute("query-migrate")).get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise RuntimeError(f"saving the template failed (migration {status})")
                await asyncio.sleep(0.01)
            os.rename(partial, state)
        finally:
            await machine.kill()
            if cleanup is not None:
                cleanup()

    def _prune(self) -> None:
        states = sorted(self.root.glob("*/state"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in states[KEEP_TEMPLATES:]:
            shutil.rmtree(stale.parent, ignore_errors=True)
