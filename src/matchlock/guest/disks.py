"""Mount the sandbox's extra disks (volumes, raw images) where the host's HELLO says.

Runs in the agent while it applies the HELLO, inside the assembled root and before any workload
starts, so every workload's mount namespace (a copy of ours) has them. A disk that fails to mount
is fatal: a sandbox must never run without the data it was given.
"""

from __future__ import annotations

import os

from ..wire.agent import GuestDisk
from . import syscalls

# What mke2fs leaves in a new filesystem's root; a root holding anything else is in use.
_FRESH_ENTRIES = ("lost+found",)
_RESERVED = ("/proc", "/sys", "/dev", "/run/matchlock")


def mount_disks(disks: tuple[GuestDisk, ...]) -> None:
    if not disks:
        return
    from .init import find_disk  # lazily: init imports the agent, which imports us

    for disk in disks:
        device = find_disk(disk.serial)
        target = _make_mount_point(disk.mount)
        flags = syscalls.MS_RDONLY if disk.readonly else 0
        try:
            syscalls.mount(device, target, "ext4", flags, None)
        except OSError as exc:
            raise RuntimeError(f"cannot mount disk {disk.serial} ({device}) on {disk.mount}: {exc}") from None
        if not disk.readonly:
            initialise_owner(target, disk.owner_uid, disk.owner_gid)


def _make_mount_point(path: str) -> str:
    """mkdir -p (following the image's symlinks, as upstream); the directory actually mounted on.

    Refused when a symlink leads into the guest's own trees (/proc, /sys, /dev, /run/matchlock).
    """
    os.makedirs(path, 0o755, exist_ok=True)
    real = os.path.realpath(path)
    if real == "/" or any(real == r or real.startswith(r + "/") for r in _RESERVED):
        raise RuntimeError(f"cannot mount a disk on {path}: it leads to {real}, which the guest needs")
    return real


def initialise_owner(root: str, uid: int, gid: int) -> None:
    """Give a fresh filesystem's root to uid/gid (first attach); one already owned or used is left alone."""
    if uid < 0 and gid < 0:
        return
    st = os.lstat(root)
    if st.st_uid != 0 or st.st_gid != 0 or any(e not in _FRESH_ENTRIES for e in os.listdir(root)):
        return
    os.chown(root, uid, gid)
