"""`host_fs` mounts: a host directory (or one file), read-write or read-only, resolved safely (`hostdir`).

Read-only refuses every mutation with EROFS, setattr, rename and link included, and every open that
could write. Files the guest's root creates belong on the host to the owner of the mount root (so the
user who shared a directory owns what the agent writes there); another guest user's are its own, so it
can go on writing them (they were root's, and `-u 1000` could not append to a file it had just made).
They never carry setuid or setgid bits: a guest must not plant a set-id program in a directory a host
user may run things from.
With `owner_uid`/`owner_gid`, the guest sees every file as owned by them and may not chown.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator

from .hostdir import HostDir, host_attr, translated
from .provider import Path, Provider
from .types import OPEN_FLAGS, SETID_BITS, Attr, Caller, DirEntry, FsError, Handle, SetAttr, StatFs, wants_write


class HostFile(Handle):
    """An open host file. Its calls run in the server's threads while the event loop may close it (a
    RELEASE that races a READ or WRITE of the same handle): the fd is closed only once no call is using
    it, so a call can never reach an fd number the process has meanwhile reused for another file."""

    def __init__(self, fd: int, ino_base: int, present: HostFSProvider | None = None) -> None:
        self.fd = fd
        self.ino_base = ino_base
        self.present = present
        self._lock = threading.Lock()
        self._users = 0  # calls using `fd` right now
        self._closing = False

    @contextlib.contextmanager
    def _using(self) -> Iterator[int]:
        with self._lock:
            if self._closing:
                raise FsError(errno.EBADF, "the file was released")
            self._users += 1
        try:
            with translated():
                yield self.fd
        finally:
            with self._lock:
                self._users -= 1
                fd = self._take() if self._closing and not self._users else -1
            if fd >= 0:
                os.close(fd)

    def _take(self) -> int:
        fd, self.fd = self.fd, -1
        return fd

    def read(self, offset: int, size: int) -> bytes:
        with self._using() as fd:
            return os.pread(fd, size, offset)

    def write(self, offset: int, data: bytes) -> int:
        with self._using() as fd:
            return os.pwrite(fd, data, offset)

    def fsync(self, datasync: bool) -> None:
        with self._using() as fd:
            (os.fdatasync if datasync else os.fsync)(fd)

    def stat(self) -> os.stat_result:
        with self._using() as fd:
            return os.fstat(fd)

    def fstat(self) -> Attr:
        st = self.stat()
        return self.present.attr(st) if self.present is not None else host_attr(st, self.ino_base)

    def truncate(self, size: int) -> None:
        with self._using() as fd:
            os.ftruncate(fd, size)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            fd = -1 if self._users else self._take()
        if fd >= 0:
            os.close(fd)


class HostFSProvider(Provider):
    kind = "host_fs"
    # The host may change the directory under the guest: 1 s, unless `notify.Notifier` watches it.
    cache_seconds = 1.0
    quick_getattr = True  # one stat beneath an open directory

    def __init__(
        self,
        host_path: str,
        *,
        readonly: bool = False,
        owner_uid: int | None = None,
        owner_gid: int | None = None,
        ino_base: int = 0,
    ) -> None:
        self.dir = HostDir(host_path)
        self.host_path = host_path  # for a snapshot's fingerprint of its mounts (vfs/snapshot.py)
        self.readonly = readonly
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid
        self.ino_base = ino_base
        root = os.fstat(self.dir.root_fd)
        # New files belong to whoever owns the shared directory (only root can give them away).
        self.new_owner = (root.st_uid, root.st_gid) if os.geteuid() == 0 else None

    @property
    def negative_seconds(self) -> float:
        # Always the unwatched lifetime, though a healthy watch tells every host create in a directory
        # the guest holds: a watch that fails cannot name the ENOENTs the guest cached (the router
        # indexes found names only), and the guest takes this lifetime once, at HELLO, so ENOENTs
        # after the failure would still be cached long. Longer needs a lifetime per ENOENT reply.
        return type(self).cache_seconds

    def close(self) -> None:
        self.dir.close()

    def attr(self, st: os.stat_result) -> Attr:
        attr = host_attr(st, self.ino_base)
        if self.owner_uid is not None:
            attr.uid = self.owner_uid
        if self.owner_gid is not None:
            attr.gid = self.owner_gid
        return attr

    def _writable(self) -> None:
        if self.readonly:
            raise FsError(errno.EROFS)

    def _owner(self, caller: Caller) -> tuple[int, int] | None:
        """Who owns a new file on the host: the mount root's owner for the guest's root (per id), else the caller."""
        if self.new_owner is None:
            return None
        if self.owner_uid is not None or self.owner_gid is not None:
            return self.new_owner  # the guest sees fixed owners anyway
        return (caller.uid or self.new_owner[0], caller.gid or self.new_owner[1])

    def _own(self, path: Path, caller: Caller) -> Attr:
        if (owner := self._owner(caller)) is not None:
            self.dir.chown(path, *owner)
        return self.getattr(path)

    # --- reads -----------------------------------------------------------------------------------------------

    def getattr(self, path: Path) -> Attr:
        return self.attr(self.dir.lstat(path))

    def listdir(self, path: Path, limit: int) -> list[DirEntry]:
        return [DirEntry(e.name, e.mode, self.ino_base ^ e.ino) for e in self.dir.listdir(path, limit)]

    def readlink(self, path: Path) -> str:
        return self.dir.readlink(path)

    def open(self, path: Path, flags: int) -> Handle:
        if wants_write(flags):
            self._writable()
        return HostFile(self.dir.open_file(path, flags & OPEN_FLAGS), self.ino_base, self)

    def statfs(self) -> StatFs:
        v = self.dir.statvfs()
        return StatFs(v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_bsize, v.f_namemax, v.f_frsize)

    # --- writes ----------------------------------------------------------------------------------------------

    def setattr(self, path: Path, changes: SetAttr, handle: Handle | None) -> Attr:
        self._writable()
        if changes.size is not None:
            if handle is not None:
                handle.truncate(changes.size)
            else:
                self.dir.truncate(path, changes.size)
        if changes.mode is not None:
            self.dir.chmod(path, changes.mode & ~SETID_BITS)
        if changes.uid is not None or changes.gid is not None:
            self._chown(path, changes)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            self.dir.utime(path, changes.atime_ns, changes.mtime_ns)
        return self.getattr(path)

    def _chown(self, path: Path, changes: SetAttr) -> None:
        if self.owner_uid is not None or self.owner_gid is not None:
            current = self.getattr(path)
            if (changes.uid is not None and changes.uid != current.uid) or (
                changes.gid is not None and changes.gid != current.gid
            ):
                raise FsError(errno.EPERM, "this mount presents fixed owners (owner_uid/owner_gid)")
            return
        self.dir.chown(path, -1 if changes.uid is None else changes.uid, -1 if changes.gid is None else changes.gid)
        # The kernel keeps set-id bits on a chown by root; this mount never has them.
        st = self.dir.lstat(path)
        if st.st_mode & SETID_BITS and not stat.S_ISLNK(st.st_mode):
            self.dir.chmod(path, st.st_mode & ~SETID_BITS)

    def create(self, path: Path, flags: int, mode: int, caller: Caller) -> tuple[Handle, Attr]:
        self._writable()
        fd = self.dir.open_file(path, flags & OPEN_FLAGS, create_mode=stat.S_IMODE(mode) & ~SETID_BITS)
        handle = HostFile(fd, self.ino_base, self)
        try:
            if (owner := self._owner(caller)) is not None:
                with translated():
                    os.fchown(fd, *owner)
            return handle, handle.fstat()
        except BaseException:
            handle.close()
            raise

    def mkdir(self, path: Path, mode: int, caller: Caller) -> Attr:
        self._writable()
        self.dir.mkdir(path, stat.S_IMODE(mode) & ~SETID_BITS)
        return self._own(path, caller)

    def mknod(self, path: Path, mode: int, rdev: int, caller: Caller) -> Attr:
        self._writable()
        # Never a device node on the host. A socket node is as inert as a FIFO: the guest's bind() keeps
        # its socket in the guest kernel, so a host process connecting to the node reaches nothing.
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise FsError(errno.EPERM, "only regular files, FIFOs and sockets")
        self.dir.mknod(path, stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~SETID_BITS))
        return self._own(path, caller)

    def symlink(self, path: Path, target: str, caller: Caller) -> Attr:
        self._writable()
        self.dir.symlink(path, target)
        return self._own(path, caller)

    def link(self, source: Path, path: Path) -> Attr:
        self._writable()
        self.dir.link(source, path)
        return self.getattr(path)

    def unlink(self, path: Path) -> None:
        self._writable()
        self.dir.unlink(path)

    def rmdir(self, path: Path) -> None:
        self._writable()
        self.dir.rmdir(path)

    def rename(self, source: Path, target: Path, flags: int) -> None:
        self._writable()
        self.dir.rename(source, target, flags)
