"""Attach a sandbox's extra disks: lock each image, check it, and describe it for QEMU and the guest.

A read-write attach holds the image exclusively, a read-only one shared, for the sandbox's whole
life: the locks live in the owning process (never inherited by QEMU) and are released only after
QEMU has exited. QEMU is tied to the owner by a parent-death signal, so an owner killed with -9
takes its VM with it and frees the locks. Named volumes use `VolumeStore.hold`, which names the
holder; a raw image is locked with flock on the image itself, and its holder is found in /proc/locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..api.disks import DiskMount
from ..state.volumes import NAME_PATTERN, SUFFIX, VolumeBusyError, VolumeStore, check_image
from ..vm.machine import Disk
from ..wire import boot
from ..wire.agent import GuestDisk

# How long a sandbox with read-write disks waits at close for the guest to sync and power off.
SYNC_GRACE_SECONDS = 10.0


async def attach(disks: tuple[DiskMount, ...], holder: str, holds: contextlib.ExitStack) -> tuple[Disk, ...]:
    """Lock (into `holds`) and check every disk; the QEMU disks in order, serials disk0..N."""
    store = VolumeStore()
    attached = []
    for index, disk in enumerate(disks):
        volume = disk.volume or _volume_name(store, Path(disk.host_path))
        if volume:
            path = holds.enter_context(store.hold(volume, holder, readonly=disk.readonly))
        else:
            path = Path(disk.host_path)
            holds.enter_context(hold_raw_image(path, readonly=disk.readonly))
        # Under the lock, so nobody changes the image between the check and the boot.
        await asyncio.to_thread(check_image, path)
        attached.append(Disk(path, serial(index), readonly=disk.readonly))
    return tuple(attached)


def serial(index: int) -> str:
    """The serial of extra disk `index`, as QEMU and the guest name it."""
    return f"{boot.EXTRA_DISK_SERIAL_PREFIX}{index}"


def guest_disks(disks: tuple[DiskMount, ...]) -> tuple[GuestDisk, ...]:
    return tuple(
        GuestDisk(
            serial(index),
            disk.guest_mount,
            disk.readonly,
            -1 if disk.owner_uid is None else disk.owner_uid,
            -1 if disk.owner_gid is None else disk.owner_gid,
        )
        for index, disk in enumerate(disks)
    )


def _volume_name(store: VolumeStore, path: Path) -> str:
    """A raw path that is a named volume's image is locked as that volume, so both spellings conflict."""
    resolved = path.resolve()
    name = resolved.name.removesuffix(SUFFIX)
    if resolved.parent == store.root.resolve() and resolved.name.endswith(SUFFIX) and NAME_PATTERN.fullmatch(name):
        return name
    return ""


@contextlib.contextmanager
def hold_raw_image(path: Path, *, readonly: bool) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VolumeBusyError(f"cannot open disk image {path}: {exc.strerror}; fix: check the path") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusyError(
                f"disk image {path} is in use by {flock_holders(fd)}; fix: stop that sandbox first, or attach it :ro "
                "everywhere"
            ) from None
        yield
    finally:
        os.close(fd)


def flock_holders(fd: int) -> str:
    """Who holds a flock on the file open at `fd`, from /proc/locks (best effort)."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = []
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
                    holders.append(f"pid {fields[4]} ({_command(fields[4])})")
    except OSError:
        pass
    return ", ".join(dict.fromkeys(holders)) or "another process"


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "gone"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:120]
