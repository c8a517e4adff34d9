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
import enum
import os
import socket
import subprocess
import threading
from pathlib import Path

from ..api.errors import VMError
from ..util.aio import finish_in_thread
from .machine import Machine, MachineSpec
from .qmp import QMPError

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


class SavedRam(enum.Enum):
    """Where `save_memory` put the guest RAM."""

    SHARED = "copied from the shared memfd"
    COPIED = "the mapped file plus the pages QEMU wrote"  # nothing faulted into QEMU
    SPLIT = "streamed, then moved out of the stream"  # QEMU faulted in every page: release_saved_pages
    IN_STREAM = "left in the stream"  # clones load it from the stream (no RAM file)


async def save_memory(machine: Machine, path: Path, ram: Path) -> SavedRam:
    """Save the stopped machine to `path`; the machine stays stopped and can continue.

    The stream holds only device state and RAM goes to `ram`, sparse, which clones map copy-on-write.
    With shared RAM (a memfd: a cold-booted sandbox, or a template being built) QEMU leaves RAM out
    (`x-ignore-shared`) and `ram` is a copy of the memfd. Private RAM (a template's or a snapshot's
    RAM file mapped copy-on-write) is copied from the mapping (`_save_mapped`); where it cannot be,
    QEMU saves it into the stream and a thread moves it out to `ram` as QEMU writes (`_save_split`).
    """
    shared = ram_is_shared(machine)
    if not shared and await _save_mapped(machine, path, ram):
        return SavedRam.COPIED
    # Only a migration needs these (the copy from the mapping migrates nothing).
    qmp = _qmp(machine)
    await qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    # QEMU caps migration at 128 MiB/s, for live migration over a shared link; this one goes to a file with
    # the vCPUs stopped. Uncapped, saving 57 MiB of RAM took 144 ms instead of 432 ms.
    await qmp.execute("migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
    if not shared and await _save_split(machine, path, ram):
        return SavedRam.SPLIT
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
    return SavedRam.SHARED if shared else SavedRam.IN_STREAM


async def _save_mapped(machine: Machine, path: Path, ram: Path) -> bool:
    """Save a machine whose RAM is its RAM file mapped copy-on-write without QEMU streaming that RAM
    (vm/ramcopy.py): `ram` is the file plus the pages QEMU's process wrote, and `path` the ram sections
    of the stream the machine was restored from with the device sections QEMU saves alone behind them.
    False, with neither file left, where that cannot be done (the caller then streams RAM)."""
    from . import ramcopy, ramstream

    spec = machine.spec
    if spec.ram_file is None or spec.incoming is None or machine.pid is None:
        return False
    size = spec.memory_mb << 20
    try:
        prefix = ramstream.ram_sections(spec.incoming)
        base = ramcopy.find_mapping(machine.pid, spec.ram_file, size)
        own = ramcopy.own_pages(machine.pid, base, size // ramcopy.PAGE_SIZE)
        ramcopy.check_readable(machine.pid)  # before QEMU saves anything: a refusal later could not fall back
    except (OSError, ramcopy.MappingNotFound, ramstream.StreamFormatError) as error:
        _note(machine, f"the RAM is streamed: it cannot be copied from the mapping ({error})")
        return False
    partial, ram_partial = path.with_name(path.name + ".partial"), ram.with_name(ram.name + ".partial")
    try:
        try:
            devices = await _save_devices(machine, partial)
        except QMPError as error:  # a QEMU without the command: RAM is streamed
            _note(machine, f"the RAM is streamed: {error}")
            return False
        if devices[:8] != prefix[:8] or not devices.endswith(b"\x00"):  # header, then QEMU_VM_EOF
            _note(machine, "the RAM is streamed: the saved device state is laid out otherwise")
            return False
        # Cancelled, the copy still ends before the partial files are removed (no file written after).
        await finish_in_thread(ramcopy.write_ram, machine.pid, base, spec.ram_file, ram_partial, own)
        partial.write_bytes(prefix + devices[8:])
        ram_partial.rename(ram)
        partial.rename(path)
        return True
    except OSError as error:
        raise VMError(f"saving the memory of {spec.name} to {path.parent} failed: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
        ram_partial.unlink(missing_ok=True)


async def _save_devices(machine: Machine, scratch: Path) -> bytes:
    """Every section of QEMU's state but RAM (QMP `xen-save-devices-state`, which any QEMU build has),
    written by QEMU into `scratch` through an fd set; the VM stays stopped (`live=false`: the disks
    stay QEMU's)."""
    qmp = _qmp(machine)
    with open(scratch, "wb") as out:  # write-only: QEMU opens the fd set's copy as O_WRONLY
        fdset = await qmp.add_fd(out.fileno())
    try:
        await qmp.execute("xen-save-devices-state", filename=f"/dev/fdset/{fdset}", live=False)
    finally:
        await qmp.execute("remove-fd", **{"fdset-id": fdset})
    return scratch.read_bytes()


def _note(machine: Machine, message: str) -> None:
    """A line in the machine's vm.log (beside its console): why a save took the slow way."""
    with contextlib.suppress(OSError), open(machine.spec.console_log, "a") as log:
        log.write(f"[matchlock] {message}\n")


def release_saved_pages(machine: Machine) -> None:
    """Start giving back the pages of the RAM file that a `SPLIT` save faulted into QEMU (a private mapping
    of a template's or a snapshot's RAM file: every page, up to the guest's size; ramstream.release_file_pages).

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
