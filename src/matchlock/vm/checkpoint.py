"""Stop, save and copy a running machine: the QEMU half of pause, snapshots and forks.

`pause`/`resume` are QMP `stop`/`cont`: the vCPUs stop, memory stays.
`save_memory` is the migration the boot templates use (`migrate` to a
descriptor QEMU writes) on a stopped machine, so memory and disks are taken
at the same instant. Writable disks are copied while the machine is stopped
(QEMU drained its block I/O on `stop`), and every clone gets its own copy of
that: a reflink where the filesystem has them, else a sparse copy, which
copies only the blocks the guest wrote (4 ms for a fresh 5 GiB upper disk on
the ext4 here; qemu-img for qcow2 overlays is not even installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import threading
from pathlib import Path

from ..api.errors import VMError
from .machine import Machine, MachineSpec

SAVE_TIMEOUT = 120.0
SAVE_BANDWIDTH = 1 << 37  # bytes/s: no cap in practice (QEMU refuses values above about 1.8e13)
READER_GRACE = 10.0  # seconds for QEMU to close its end of the stream once the migration completed
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

    The stream holds only device state and RAM goes to `ram`, sparse, which clones map copy-on-write.
    With shared RAM (a memfd: a cold-booted sandbox, or a template being built) QEMU leaves RAM out
    (`x-ignore-shared`) and `ram` is a copy of the memfd. Private RAM (a template's or a snapshot's
    RAM file mapped copy-on-write) QEMU saves into the stream, and a thread moves it out to `ram` as
    QEMU writes (`_save_split`). Returns whether `ram` was written (else RAM stayed in the stream).
    """
    qmp = _qmp(machine)
    await qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    # QEMU caps migration at 128 MiB/s, for live migration over a shared link; this one goes to a file with
    # the vCPUs stopped. Uncapped, saving 57 MiB of RAM took 144 ms instead of 432 ms.
    await qmp.execute("migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
    shared = ram_is_shared(machine)
    split = not shared and await _save_split(machine, path, ram)
    if not split:
        # Shared RAM, or a stream laid out otherwise than ramstream expects: saved (again), whole.
        if not shared and await status(machine) == "postmigrate":
            # QEMU refuses to migrate again after a completed migration ("paused due to previous
            # migration") until `cont` takes its disks back; the guest is parked, so an instant of
            # vCPU time changes nothing the disk copy after this would miss.
            await resume(machine)
            await pause(machine)
        partial = path.with_name(path.name + ".partial")
        try:
            # QEMU writes the file itself (`fd:`): "completed" means written.
            with open(partial, "wb") as stream:
                await _migrate(machine, stream.fileno())
            if shared:
                copy_disk(_memfd(machine), ram)
            partial.rename(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            if shared:
                ram.unlink(missing_ok=True)
            raise
    return shared or split


def release_saved_pages(machine: Machine) -> None:
    """Start giving back the pages of the RAM file that a save faulted into QEMU (a private mapping of a
    template's or a snapshot's RAM file: every page, up to the guest's size; ramstream.release_file_pages).

    Not waited for: no file depends on it, and it takes as long as the save (a page-out of the guest's
    whole size, then the holes' cached zero pages dropped); best started once the machine runs again,
    so it does not delay that. A daemon thread: exiting ends it.
    """
    if machine.spec.ram_file is None or machine.pid is None:
        return
    from . import ramstream

    args = (machine.pid, machine.spec.ram_file)
    threading.Thread(target=ramstream.release_file_pages, args=args, name="release", daemon=True).start()


async def _migrate(machine: Machine, fd: int) -> None:
    """Migrate the machine to `fd` (QEMU gets a copy) and wait until QEMU says it is done."""
    qmp = _qmp(machine)
    await qmp.send_fd("migration", fd)
    await qmp.execute("migrate", uri="fd:migration")
    try:
        async with asyncio.timeout(SAVE_TIMEOUT):
            while True:
                state = (await qmp.execute("query-migrate")).get("status")
                if state == "completed":
                    return
                if state in ("failed", "cancelled"):
                    raise VMError(f"saving the memory of {machine.spec.name} failed (migration {state})")
                await asyncio.sleep(0.005)
    except TimeoutError:
        await qmp.execute("migrate_cancel")
        raise VMError(f"saving the memory of {machine.spec.name} took over {SAVE_TIMEOUT:g} s") from None


async def _save_split(machine: Machine, path: Path, ram: Path) -> bool:
    """Migrate through a socket that a thread reads as QEMU writes, moving RAM to `ram` and the rest to
    `path` (vm/ramstream.py), so the split costs no time after the save. False, with neither file
    written, when the stream is laid out otherwise (the caller then saves it again, whole); on any
    failure neither file is left either."""
    from . import ramstream

    partial = path.with_name(path.name + ".split")
    ours, theirs = socket.socketpair()
    saved = False
    try:
        with ours:
            reading = asyncio.get_running_loop().run_in_executor(None, _split_from, ours, partial, ram)
            try:
                try:
                    await _migrate(machine, theirs.fileno())
                finally:
                    theirs.close()  # QEMU has its copy: the reader sees the end when QEMU closes it
                try:
                    await asyncio.wait_for(asyncio.shield(reading), READER_GRACE)
                except TimeoutError:
                    # QEMU wrote it all ("completed") but still holds its end: end the stream here.
                    ours.shutdown(socket.SHUT_RD)
                    await reading
            except BaseException as error:
                # On every way out (a failed or cancelled save too) the reader has stopped before `ours`
                # closes: a thread still reading it could write files after they were removed.
                with contextlib.suppress(OSError):
                    ours.shutdown(socket.SHUT_RDWR)
                try:
                    await reading
                except VMError as cause:
                    if isinstance(error, VMError) and cause is not error:  # QEMU failed as the reader stopped first
                        raise cause from error
                except ramstream.StreamFormatError:
                    pass  # the stream cut short by the shutdown, or laid out otherwise (`error` itself)
                raise
        partial.rename(path)
        saved = True
        return True
    except ramstream.StreamFormatError:
        return False
    finally:
        partial.unlink(missing_ok=True)
        if not saved:
            ram.unlink(missing_ok=True)


def _split_from(sock: socket.socket, device_state: Path, ram: Path) -> int:
    from . import ramstream

    try:
        return ramstream.split_fd(sock.fileno(), device_state, ram)
    except BaseException as error:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # QEMU must not wait for ever on a reader that stopped
        if isinstance(error, OSError):
            raise VMError(f"writing the saved memory to {device_state} and {ram} failed: {error}") from error
        raise


def _memfd(machine: Machine) -> Path:
    """QEMU's guest-RAM memfd, through /proc (it has no name on any filesystem)."""
    fds = Path(f"/proc/{machine.pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).startswith("/memfd:memory-backend-memfd"):
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


def template_restore(spec: MachineSpec, state: Path) -> MachineSpec:
    """`spec` restoring the boot template saved in `state`, its RAM file mapped copy-on-write, as a clone
    maps its snapshot's: pages load when touched and are shared by every sandbox of the template.

    Nothing may write that file while sandboxes map it (a private mapping still shows the file's
    changes in the pages it has not copied): templates are replaced only by rename and removed only
    by unlink (vm/snapshot.py). The sandbox's RAM is then private: QEMU saves it into the stream,
    and `save_memory` moves it out into the snapshot's own RAM file.
    """
    ram = state.with_name(RAM_FILE)
    # QEMU would create a missing mem-path, and the guest would wake on zeroed memory.
    if not ram.is_file() or ram.stat().st_size < spec.memory_mb << 20:
        raise VMError(f"the boot template's RAM file {ram} is missing or short; fix: matchlock image templates --clear")
    return dataclasses.replace(spec, incoming=state, ignore_shared=True, ram_file=ram)
