"""Stop, save and copy a running machine: the QEMU half of pause, snapshots and forks.

`pause`/`resume` are QMP `stop`/`cont`: the vCPUs stop, memory stays.
`save_memory` is the migration the boot templates use (`migrate` to
`exec:cat > file`) on a stopped machine, so memory and disks are taken at
the same instant. Writable disks are copied while the machine is stopped
(QEMU drained its block I/O on `stop`), and every clone gets its own copy of
that: a reflink where the filesystem has them, else a sparse copy, which
copies only the blocks the guest wrote (4 ms for a fresh 5 GiB upper disk on
the ext4 here; qemu-img for qcow2 overlays is not even installed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from pathlib import Path

from ..api.errors import VMError
from .machine import Machine, MachineSpec

SAVE_TIMEOUT = 120.0
RAM_MEMFD_NAME = "matchlock-ram"
RAM_FILE = "ram"  # next to a saved state: the guest RAM that the state's stream leaves out


def _qmp(machine: Machine):
    if machine.qmp is None or not machine.running:
        raise VMError(f"the VM of {machine.spec.name} is not running")
    return machine.qmp


async def status(machine: Machine) -> str:
    """QEMU's run state: "running", "paused", "postmigrate", ..."""
    return str((await _qmp(machine).execute("query-status"))["status"])


async def pause(machine: Machine) -> None:
    await _qmp(machine).execute("stop")


async def resume(machine: Machine) -> None:
    await _qmp(machine).execute("cont")


def ram_is_shared(machine: Machine) -> bool:
    return machine.spec.ram_file is None and not machine.spec.ram_private


async def save_memory(machine: Machine, path: Path, ram: Path) -> bool:
    """Save the stopped machine to `path`; the machine stays stopped and can continue.

    With shared RAM (a memfd: every sandbox not itself a clone) the stream holds only device state
    (`x-ignore-shared`), and RAM goes to `ram`, a sparse copy of the pages the guest touched, which
    clones map copy-on-write. Returns whether `ram` was written (else RAM is in the stream).
    """
    qmp = _qmp(machine)
    shared = ram_is_shared(machine)
    await qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    partial = path.with_name(path.name + ".partial")
    # The path is ours (the state dir), but QEMU runs it through a shell: quote it anyway.
    import shlex

    await qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(partial))}")
    try:
        async with asyncio.timeout(SAVE_TIMEOUT):
            while True:
                state = (await qmp.execute("query-migrate")).get("status")
                if state == "completed":
                    break
                if state in ("failed", "cancelled"):
                    raise VMError(f"saving the memory of {machine.spec.name} failed (migration {state})")
                await asyncio.sleep(0.005)
    except TimeoutError:
        await qmp.execute("migrate_cancel")
        raise VMError(f"saving the memory of {machine.spec.name} took over {SAVE_TIMEOUT:g} s") from None
    if shared:
        copy_disk(_memfd(machine), ram)
    partial.rename(path)
    return shared


def _memfd(machine: Machine) -> Path:
    """QEMU's guest-RAM memfd, through /proc (it has no name on any filesystem)."""
    fds = Path(f"/proc/{machine.pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).startswith(("/memfd:memory-backend-memfd", f"/memfd:{RAM_MEMFD_NAME}")):
                return fd
        except OSError:
            continue
    raise VMError(f"the guest RAM of {machine.spec.name} was not found among QEMU's descriptors")


def copy_disk(source: Path, target: Path) -> None:
    """A sparse copy (a reflink where the filesystem has them) of a stopped machine's disk."""
    proc = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", str(source), str(target)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise VMError(f"copying {source} for the snapshot failed: {proc.stderr.strip()}")


def ram_memfd(source: Path, size: int) -> int:
    """A memfd of `size` bytes holding the guest RAM saved in `source` (a sparse copy: only its data)."""
    fd = os.memfd_create(RAM_MEMFD_NAME, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with open(source, "rb") as f:
            src = f.fileno()
            end = min(os.fstat(src).st_size, size)
            offset = 0
            while offset < end:
                try:
                    offset = os.lseek(src, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after offset
                    break
                hole = min(os.lseek(src, offset, os.SEEK_HOLE), end)
                while offset < hole:  # pread/pwrite: copy_file_range cannot cross into tmpfs
                    chunk = os.pread(src, min(hole - offset, 1 << 20), offset)
                    if not chunk:
                        break
                    offset += os.pwrite(fd, chunk, offset)
    except BaseException:
        os.close(fd)
        raise
    return fd


def template_restore(spec: MachineSpec, state: Path) -> MachineSpec:
    """`spec` restoring the boot template saved in `state`: its RAM copied into a shared memfd (which
    the caller closes once QEMU has started), or, for a template whose RAM is in the stream, private."""
    ram = state.with_name(RAM_FILE)
    if not ram.exists():
        return dataclasses.replace(spec, incoming=state, ram_private=True)
    try:
        fd = ram_memfd(ram, spec.memory_mb << 20)
    except OSError as exc:
        raise VMError(f"cannot load the template's RAM: {exc}") from None
    return dataclasses.replace(spec, incoming=state, ignore_shared=True, ram_fd=fd)
