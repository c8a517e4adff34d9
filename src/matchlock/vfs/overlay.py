"""`overlay` mounts: a private copy-on-write view of a host directory, without copying it up front.

The lower layer is the host directory, only ever read (through `hostdir`, so never outside it). The
upper layer is a private directory under the sandbox's state dir (inside a 0700 directory), removed on close. A
file is copied up on its first write or metadata change; a directory when something inside it is
copied up or created. Deletions of lower entries are recorded as whiteouts, and a directory made
again where one was deleted (or renamed in) is opaque: the lower one no longer shows through. Both
are sets kept by the provider: the upper is private, so nothing else needs to read them. The host
directory is never modified.

An entry copied up keeps the inode number it had in the lower (`kept_ino`), as overlayfs with xino
does: tools that count hard links or compare inodes (`tar`, `du`, `find`, git's index) see one file.

A directory rename copies the directory's subtree up first, then renames it in the upper: the cost
of that rename is the size of the subtree (as overlayfs without redirect_dir, which returns EXDEV
and leaves the copy to `mv`).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading

from .hostdir import HostDir, host_attr, translated
from .hostfs import HostFile
from .provider import Path, Provider
from .types import OPEN_FLAGS, Attr, Caller, DirEntry, FsError, Handle, SetAttr, StatFs, wants_write

_UPPER_INO = 1 << 55  # upper inodes apart from lower ones
_COPY_CHUNK = 1 << 20


class OverlayProvider(Provider):
    readonly = False
    cache_seconds = 3600.0  # a private view: only the guest changes it
    kind = "overlay"

    def __init__(self, lower: str, upper: str, *, ino_base: int = 0) -> None:
        self.lower = HostDir(lower)
        self.lower_path = lower  # for a snapshot's fingerprint of its mounts (vfs/snapshot.py)
        if self.lower.single:
            self.lower.close()
            raise FsError(errno.ENOTDIR, f"overlay lower {lower} is not a directory")
        # The upper's parent is 0700, so no host user reaches the private copy; the upper root itself
        # looks like the lower root to the guest.
        os.makedirs(os.path.dirname(upper), mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(upper), 0o700)
        os.mkdir(upper, 0o700)
        self.upper_path = upper
        self.upper = HostDir(upper)
        root = self.lower.lstat(())
        self.upper.chown((), root.st_uid, root.st_gid)
        self.upper.chmod((), root.st_mode)
        self.upper.utime((), root.st_atime_ns, root.st_mtime_ns)
        self.ino_base = ino_base
        self.whiteouts: set[Path] = set()
        self.opaque: set[Path] = set()
        self.kept_ino: dict[Path, int] = {}  # upper path -> the inode number it showed in the lower
        self.lock = threading.RLock()

    def close(self) -> None:
        self.lower.close()
        self.upper.close()
        shutil.rmtree(self.upper_path, ignore_errors=True)

    # --- where an entry lives --------------------------------------------------------------------------------

    def _lower_visible(self, path: Path) -> bool:
        """Not hidden by a whiteout of itself or an ancestor, nor by an opaque ancestor; may still not exist."""
        for n in range(1, len(path) + 1):
            if path[:n] in self.whiteouts:
                return False
        return not any(path[:n] in self.opaque for n in range(len(path)))

    def _in_lower(self, path: Path) -> bool:
        return self._lower_visible(path) and self.lower.exists(path)

    def _stat(self, path: Path) -> tuple[os.stat_result, bool]:
        """(stat, is_upper) of the merged entry."""
        try:
            return self.upper.lstat(path), True
        except FsError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
        if not self._lower_visible(path):
            raise FsError(errno.ENOENT)
        return self.lower.lstat(path), False

    def _attr(self, st: os.stat_result, upper: bool, path: Path) -> Attr:
        return host_attr(st, self._ino_base(st.st_ino, upper, path))

    def _ino_base(self, st_ino: int, upper: bool, path: Path) -> int:
        """What to XOR `st_ino` with: the layer's base, or what gives back the inode kept at copy-up."""
        if not upper:
            return self.ino_base
        kept = self.kept_ino.get(path)
        return self.ino_base ^ _UPPER_INO if kept is None else kept ^ st_ino

    def _is_upper_file(self, handle: HostFile, path: Path) -> bool:
        """Whether `handle` is open on the upper's file at `path` (a lower one opened read-only is not)."""
        mine, upper = handle.stat(), self.upper.lstat(path)
        return (mine.st_dev, mine.st_ino) == (upper.st_dev, upper.st_ino)

    def _move_kept(self, source: Path, target: Path) -> None:
        n = len(source)
        for path in [p for p in self.kept_ino if p[:n] == source]:
            self.kept_ino[target + path[n:]] = self.kept_ino.pop(path)

    # --- copy-up ---------------------------------------------------------------------------------------------

    def _copy_up(self, path: Path) -> None:
        """Make `path` (and its ancestors) exist in the upper, with the lower's content and metadata."""
        if self.upper.exists(path):
            return
        if path:
            self._copy_up(path[:-1])
        st = self.lower.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            self.upper.mkdir(path, 0o700)
        elif kind == stat.S_IFREG:
            self._copy_file(path, st)
        elif kind == stat.S_IFLNK:
            self.upper.symlink(path, self.lower.readlink(path))
        elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
            self.upper.mknod(path, st.st_mode)
        else:
            raise FsError(errno.EPERM, "only files, directories, symlinks, FIFOs and sockets are copied up")
        self.upper.chown(path, st.st_uid, st.st_gid)
        if kind != stat.S_IFLNK:
            self.upper.chmod(path, st.st_mode)
        self.upper.utime(path, st.st_atime_ns, st.st_mtime_ns)
        if path:
            self.kept_ino[path] = self.ino_base ^ st.st_ino

    def _copy_file(self, path: Path, st: os.stat_result) -> None:
        source = self.lower.open_file(path, os.O_RDONLY)
        try:
            target = self.upper.open_file(path, os.O_WRONLY, create_mode=0o600)
            try:
                with translated():
                    _copy_fd(source, target, st.st_size)
            finally:
                os.close(target)
        finally:
            os.close(source)

    def _copy_up_tree(self, path: Path) -> None:
        self._copy_up(path)
        if stat.S_ISDIR(self.upper.lstat(path).st_mode) and path not in self.opaque:
            for entry in self._merged(path, limit=1 << 30):
                self._copy_up_tree(path + (entry.name,))
            self.opaque.add(path)  # complete in the upper now

    def _merged(self, path: Path, limit: int) -> list[DirEntry]:
        entries: dict[str, DirEntry] = {}
        upper_dir = self.upper.exists(path)
        if upper_dir:
            for e in self.upper.listdir(path, limit):
                entries[e.name] = DirEntry(e.name, e.mode, self._ino_base(e.ino, True, path + (e.name,)) ^ e.ino)
        if path not in self.opaque and self._in_lower(path):
            for e in self.lower.listdir(path, limit):
                if e.name not in entries and path + (e.name,) not in self.whiteouts:
                    entries[e.name] = DirEntry(e.name, e.mode, self.ino_base ^ e.ino)
        if not entries and not upper_dir and not self._in_lower(path):
            raise FsError(errno.ENOENT)
        if len(entries) > limit:
            raise FsError(errno.EOVERFLOW)
        return list(entries.values())

    def _empty(self, path: Path) -> bool:
        try:
            return not self._merged(path, limit=1)
        except FsError as exc:
            if exc.errno == errno.EOVERFLOW:  # more than one entry
                return False
            raise

    def _prepare_new(self, path: Path) -> bool:
        """Check `path` is free in the merged view and make its parent in the upper; True if it was whited out."""
        try:
            self._stat(path)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
        else:
            raise FsError(errno.EEXIST)
        parent, _ = self._stat(path[:-1])
        if not stat.S_ISDIR(parent.st_mode):
            raise FsError(errno.ENOTDIR)
        self._copy_up(path[:-1])
        whited = path in self.whiteouts
        self.whiteouts.discard(path)
        return whited

    def _forget_below(self, path: Path) -> None:
        n = len(path)
        self.whiteouts = {p for p in self.whiteouts if not (len(p) > n and p[:n] == path)}
        self.opaque = {p for p in self.opaque if not (len(p) >= n and p[:n] == path)}

    # --- reads -----------------------------------------------------------------------------------------------

    def getattr(self, path: Path) -> Attr:
        with self.lock:
            return self._attr(*self._stat(path), path)

    def listdir(self, path: Path, limit: int) -> list[DirEntry]:
        with self.lock:
            st, _ = self._stat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise FsError(errno.ENOTDIR)
            return self._merged(path, limit)

    def readlink(self, path: Path) -> str:
        with self.lock:
            _, upper = self._stat(path)
            return (self.upper if upper else self.lower).readlink(path)

    def open(self, path: Path, flags: int) -> Handle:
        with self.lock:
            if wants_write(flags):
                self._stat(path)
                self._copy_up(path)
                upper = True
            else:
                _, upper = self._stat(path)
            fd = (self.upper if upper else self.lower).open_file(path, flags & OPEN_FLAGS)
            return HostFile(fd, self._ino_base(os.fstat(fd).st_ino, upper, path))

    def statfs(self) -> StatFs:
        v = self.upper.statvfs()
        return StatFs(v.f_blocks, v.f_bfree, v.f_bavail, v.f_files, v.f_ffree, v.f_bsize, v.f_namemax, v.f_frsize)

    # --- writes ----------------------------------------------------------------------------------------------

    def setattr(self, path: Path, changes: SetAttr, handle: Handle | None) -> Attr:
        with self.lock:
            self._stat(path)
            self._copy_up(path)
            if changes.size is not None:
                if isinstance(handle, HostFile) and self._is_upper_file(handle, path):
                    handle.truncate(changes.size)
                else:
                    self.upper.truncate(path, changes.size)
            if changes.mode is not None:
                self.upper.chmod(path, changes.mode)
            if changes.uid is not None or changes.gid is not None:
                self.upper.chown(path, -1 if changes.uid is None else changes.uid,
                                 -1 if changes.gid is None else changes.gid)  # fmt: skip
            if changes.atime_ns is not None or changes.mtime_ns is not None:
                self.upper.utime(path, changes.atime_ns, changes.mtime_ns)
            return self._attr(self.upper.lstat(path), True, path)

    def _finish_new(self, path: Path, caller: Caller, *, whited: bool, directory: bool = False) -> Attr:
        self.upper.chown(path, caller.uid, caller.gid)
        if directory and whited:
            self.opaque.add(path)
        return self._attr(self.upper.lstat(path), True, path)

    def create(self, path: Path, flags: int, mode: int, caller: Caller) -> tuple[Handle, Attr]:
        with self.lock:
            whited = self._prepare_new(path)
            fd = self.upper.open_file(path, flags & OPEN_FLAGS, create_mode=stat.S_IMODE(mode))
            handle = HostFile(fd, self.ino_base ^ _UPPER_INO)
            try:
                return handle, self._finish_new(path, caller, whited=whited)
            except BaseException:
                handle.close()
                raise

    def mkdir(self, path: Path, mode: int, caller: Caller) -> Attr:
        with self.lock:
            whited = self._prepare_new(path)
            self.upper.mkdir(path, stat.S_IMODE(mode))
            return self._finish_new(path, caller, whited=whited, directory=True)

    def mknod(self, path: Path, mode: int, rdev: int, caller: Caller) -> Attr:
        # A socket node is as inert as a FIFO (the guest's bind() keeps its socket in the guest kernel).
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise FsError(errno.EPERM, "only regular files, FIFOs and sockets")
        with self.lock:
            whited = self._prepare_new(path)
            self.upper.mknod(path, mode)
            return self._finish_new(path, caller, whited=whited)

    def symlink(self, path: Path, target: str, caller: Caller) -> Attr:
        with self.lock:
            whited = self._prepare_new(path)
            self.upper.symlink(path, target)
            return self._finish_new(path, caller, whited=whited)

    def link(self, source: Path, path: Path) -> Attr:
        with self.lock:
            st, _ = self._stat(source)
            if stat.S_ISDIR(st.st_mode):
                raise FsError(errno.EPERM)
            self._copy_up(source)
            self._prepare_new(path)
            self.upper.link(source, path)
            if source in self.kept_ino:  # the same inode under a second name
                self.kept_ino[path] = self.kept_ino[source]
            return self._attr(self.upper.lstat(path), True, path)

    def _remove(self, path: Path, directory: bool) -> None:
        st, upper = self._stat(path)
        if stat.S_ISDIR(st.st_mode) != directory:
            raise FsError(errno.ENOTDIR if directory else errno.EISDIR)
        if directory and not self._empty(path):
            raise FsError(errno.ENOTEMPTY)
        in_lower = self._in_lower(path)
        if upper:
            (self.upper.rmdir if directory else self.upper.unlink)(path)
            self.kept_ino.pop(path, None)  # a removed directory was empty: nothing kept below it
        if directory:
            self._forget_below(path)
        if in_lower:
            self.whiteouts.add(path)

    def unlink(self, path: Path) -> None:
        with self.lock:
            self._remove(path, directory=False)

    def rmdir(self, path: Path) -> None:
        with self.lock:
            self._remove(path, directory=True)

    def rename(self, source: Path, target: Path, flags: int) -> None:
        if flags & ~1:  # RENAME_EXCHANGE (and anything else) is not supported by the overlay
            raise FsError(errno.EINVAL)
        with self.lock:
            st, _ = self._stat(source)
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir and target[: len(source)] == source and len(target) > len(source):
                raise FsError(errno.EINVAL, "a directory into itself")
            try:
                existing, _ = self._stat(target)
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                if flags & 1:
                    raise FsError(errno.EEXIST)
                if stat.S_ISDIR(existing.st_mode) != is_dir:
                    raise FsError(errno.EISDIR if stat.S_ISDIR(existing.st_mode) else errno.ENOTDIR)
                if source == target or _same_file(st, existing):
                    return  # two names of one file: rename(2) does nothing (it removed the source)
                self._remove(target, directory=is_dir)
            source_in_lower = self._in_lower(source)
            if is_dir:
                self._copy_up_tree(source)
            else:
                self._copy_up(source)
            parent, _ = self._stat(target[:-1])
            if not stat.S_ISDIR(parent.st_mode):
                raise FsError(errno.ENOTDIR)
            self._copy_up(target[:-1])
            self.upper.rename(source, target)
            self._move_kept(source, target)
            self._forget_below(source)
            self.whiteouts.discard(target)
            if is_dir:
                self._forget_below(target)
                self.opaque.add(target)
            if source_in_lower:
                self.whiteouts.add(source)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return not stat.S_ISDIR(a.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _copy_fd(source: int, target: int, size: int) -> None:
    offset = 0
    while offset < size:
        try:
            copied = os.copy_file_range(source, target, min(_COPY_CHUNK, size - offset), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            copied = os.pwrite(target, os.pread(source, _COPY_CHUNK, offset), offset)
        if copied == 0:
            break  # the lower file shrank meanwhile
        offset += copied
