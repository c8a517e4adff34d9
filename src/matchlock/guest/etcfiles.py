"""The files the agent writes into the guest itself (hostname, hosts, resolv.conf, the sandbox CA), never
into a VFS mount.

A host file or directory mounted over one of them (`-v ./hosts:/etc/hosts:ro`, `-v certs:/etc/ssl/certs:host_fs`)
is the user's, and what the guest sees there: the agent leaves it as it is. Writing through the mount made
a read-only one fail the sandbox's start (EROFS) and overwrote a writable one on the host. The sandbox CA
then goes to the first of CA_PATH and CA_FALLBACK_PATHS outside the mounts, and is not appended to a
system bundle inside one. The mounts are the FUSE daemon's (`fuse.matchlock`, which forwards writes to
the host); a guest-local overlay is written as the rest of the root, on the sandbox's own disk.
"""

from __future__ import annotations

import os

from ..wire.boot import CA_FALLBACK_PATHS, CA_PATH

MOUNTINFO = "/proc/self/mountinfo"
VFS_FSTYPE = "fuse.matchlock"


def vfs_mount_points(mountinfo: str = MOUNTINFO) -> tuple[str, ...]:
    """The mount points of the FUSE daemon's mounts (guest paths are plain: no escapes to undo)."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    points = []
    for line in lines:
        fields = line.split(" ")
        if "-" in fields[6:]:
            fstype = fields[fields.index("-", 6) + 1]
            if fstype == VFS_FSTYPE:
                points.append(fields[4])
    return tuple(points)


class EtcFiles:
    """Writes the agent's own files, skipping any under one of `points` (VFS mount points)."""

    def __init__(self, points: tuple[str, ...], ca_paths: tuple[str, ...] = (CA_PATH, *CA_FALLBACK_PATHS)) -> None:
        self.points = points
        self.ca_paths = ca_paths  # the last is never under a mount ("/" is none)

    @classmethod
    def current(cls) -> EtcFiles:
        return cls(vfs_mount_points())

    def on_mount(self, path: str) -> bool:
        """Is `path` (its directory resolved through symlinks) at or under a VFS mount point?"""
        if not self.points:
            return False
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        return any(real == p or real.startswith(p.rstrip("/") + "/") for p in self.points)

    def write(self, path: str, content: str) -> bool:
        """Replace `path` with `content` (never following a symlink there); False where a mount has it."""
        if self.on_mount(path):
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.islink(path):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, content.encode())
        finally:
            os.close(fd)
        return True

    def ca_path(self) -> str:
        """Where the sandbox CA goes: CA_PATH unless a mount covers it."""
        return next((path for path in self.ca_paths if not self.on_mount(path)), self.ca_paths[-1])

    def ca_alone(self, ca_file: str) -> str:
        """What the host points TLS clients at when no system bundle holds the CA: "" for CA_PATH (the
        host's default), else the file the CA went to instead."""
        return "" if ca_file == self.ca_paths[0] else ca_file
