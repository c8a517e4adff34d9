"""Safe primitives on a host directory: every path is resolved beneath one root fd, never through a symlink.

The parent of a path is opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), or on kernels
without it by a walk that opens each component with O_NOFOLLOW | O_DIRECTORY. The last component is
then used with its parent fd and AT_SYMLINK_NOFOLLOW (or O_NOFOLLOW). So a symlink on the host,
including a directory swapped for one while the guest works, can never lead outside the root, and
only regular files are ever opened for reading or writing (a device node or FIFO in a shared
directory is never opened).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import time
from collections.abc import Iterator

from .types import MAX_DEPTH, NOW, PATH_MAX, Attr, DirEntry, FsError

Path = tuple[str, ...]

_SYS_OPENAT2 = 437  # x86_64 and arm64 share it
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_works = True


def _openat2(dir_fd: int, path: bytes, flags: int) -> int:
    how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        _SYS_OPENAT2, ctypes.c_int(dir_fd), ctypes.c_char_p(path), ctypes.byref(how), ctypes.c_size_t(24)
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(fd)


def renameat2(src_fd: int, src: str, dst_fd: int, dst: str, flags: int) -> None:
    if flags == 0:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    result = _libc.renameat2(
        ctypes.c_int(src_fd), os.fsencode(src), ctypes.c_int(dst_fd), os.fsencode(dst), ctypes.c_uint(flags)
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def fs_errors(exc: OSError) -> FsError:
    code = exc.errno or errno.EIO
    if code == errno.ELOOP:  # a symlink where a directory was expected: to the guest it is not a directory
        code = errno.ENOTDIR
    return FsError(code, str(exc))


@contextlib.contextmanager
def translated() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise fs_errors(exc) from None


def _process_umask() -> int:
    """This process's umask, read without setting it (os.umask would race the pool's other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o7777  # unknown: every create sets its mode again


class HostDir:
    """A host directory (or a single file: `single`) opened once; paths below it resolve beneath it."""

    def __init__(self, root: str) -> None:
        with translated():
            fd = os.open(root, os.O_PATH | os.O_CLOEXEC)
        self.root_fd = fd
        self.single = not stat.S_ISDIR(os.fstat(fd).st_mode)
        # The guest's kernel already applied the guest's umask to every mode it sends: ours must not
        # strip more (a guest `open(..., 0620)` made 0600), so creates set their mode again when it would.
        self.umask = _process_umask()

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    # --- resolution ------------------------------------------------------------------------------------------

    def open_dir(self, path: Path) -> int:
        """An O_PATH fd of directory `path` (the caller closes it)."""
        if len(path) > MAX_DEPTH:
            raise FsError(errno.ENAMETOOLONG)
        if self.single and path:
            raise FsError(errno.ENOTDIR)
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        if not path:
            return os.dup(self.root_fd)
        global _openat2_works
        joined = os.fsencode("/".join(path))
        with translated():
            # A path the guest reached by walking may be longer than PATH_MAX, which openat2 refuses in
            # one string (ENAMETOOLONG): the walk below opens it a name at a time.
            if _openat2_works and len(joined) < PATH_MAX:
                try:
                    return _openat2(self.root_fd, joined, flags)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSYS, errno.EPERM):  # no openat2, or a seccomp filter against it
                        raise
                    _openat2_works = False
            fd = os.dup(self.root_fd)
            try:
                for name in path:
                    child = os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
                    os.close(fd)
                    fd = child
            except BaseException:
                os.close(fd)
                raise
            return fd

    @contextlib.contextmanager
    def parent(self, path: Path) -> Iterator[tuple[int, str]]:
        """(fd of the parent directory, last name); `path` must not be the root."""
        if not path:
            raise FsError(errno.EBUSY, "the mount root itself")
        fd = self.open_dir(path[:-1])
        try:
            with translated():
                yield fd, path[-1]
        finally:
            os.close(fd)

    # --- reads -----------------------------------------------------------------------------------------------

    def lstat(self, path: Path) -> os.stat_result:
        if not path:
            with translated():
                return os.fstat(self.root_fd)
        with self.parent(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def exists(self, path: Path) -> bool:
        try:
            self.lstat(path)
        except FsError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise
        return True

    def readlink(self, path: Path) -> str:
        with self.parent(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def listdir(self, path: Path, limit: int) -> list[DirEntry]:
        if self.single:
            raise FsError(errno.ENOTDIR)
        fd = self.open_dir(path)
        try:
            with translated():
                listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        out: list[DirEntry] = []
        try:
            with translated(), os.scandir(listing) as entries:
                for entry in entries:
                    if len(out) >= limit:
                        raise FsError(errno.EOVERFLOW, f"more than {limit} entries in one directory")
                    out.append(DirEntry(entry.name, _entry_type(entry), entry.inode()))
        finally:
            os.close(listing)
        return out

    def open_file(self, path: Path, flags: int, create_mode: int | None = None) -> int:
        """An fd of the regular file `path` opened with `flags`; O_CREAT|O_EXCL when `create_mode` is given."""
        if not path:
            if not self.single:
                raise FsError(errno.EISDIR)
            with translated():
                if not stat.S_ISREG(os.fstat(self.root_fd).st_mode):
                    raise FsError(errno.EACCES, "not a regular file")
                # A re-open of the exact inode held by the root fd, not a path lookup.
                return os.open(f"/proc/self/fd/{self.root_fd}", flags | os.O_CLOEXEC)
        with self.parent(path) as (dirfd, name):
            base = flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            if create_mode is not None:
                fd = os.open(name, base | os.O_CREAT | os.O_EXCL, create_mode, dir_fd=dirfd)
                if create_mode & self.umask:
                    os.fchmod(fd, create_mode)
            else:
                fd = os.open(name, base, dir_fd=dirfd)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise FsError(errno.EISDIR if stat.S_ISDIR(os.fstat(fd).st_mode) else errno.EACCES)
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return fd

    def statvfs(self) -> os.statvfs_result:
        with translated():
            return os.statvfs(self.root_fd)

    # --- writes ----------------------------------------------------------------------------------------------

    def mkdir(self, path: Path, mode: int) -> None:
        with self.parent(path) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)
        if mode & self.umask:
            self.chmod(path, mode)

    def mknod(self, path: Path, mode: int) -> None:
        with self.parent(path) as (fd, name):
            os.mknod(name, mode, 0, dir_fd=fd)
        if stat.S_IMODE(mode) & self.umask:
            self.chmod(path, mode)

    def symlink(self, path: Path, target: str) -> None:
        with self.parent(path) as (fd, name):
            os.symlink(target, name, dir_fd=fd)

    def link(self, source: Path, path: Path) -> None:
        with self.parent(source) as (sfd, sname), self.parent(path) as (dfd, dname):
            os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def unlink(self, path: Path) -> None:
        with self.parent(path) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def rmdir(self, path: Path) -> None:
        with self.parent(path) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def rename(self, source: Path, target: Path, flags: int = 0) -> None:
        if flags & ~(_RENAME_NOREPLACE | _RENAME_EXCHANGE):
            raise FsError(errno.EINVAL)
        with self.parent(source) as (sfd, sname), self.parent(target) as (dfd, dname):
            renameat2(sfd, sname, dfd, dname, flags)

    def chown(self, path: Path, uid: int, gid: int) -> None:
        if not path:
            with translated():
                os.chown(f"/proc/self/fd/{self.root_fd}", uid, gid)
            return
        with self.parent(path) as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    def chmod(self, path: Path, mode: int) -> None:
        with self._pinned(path) as (fd, st):
            if stat.S_ISLNK(st.st_mode):
                raise FsError(errno.EOPNOTSUPP, "chmod of a symlink")
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))

    def utime(self, path: Path, atime_ns: int | None, mtime_ns: int | None) -> None:
        st = self.lstat(path)
        now = time.time_ns()
        times = (
            st.st_atime_ns if atime_ns is None else now if atime_ns == NOW else atime_ns,
            st.st_mtime_ns if mtime_ns is None else now if mtime_ns == NOW else mtime_ns,
        )
        if not path:
            with translated():
                os.utime(f"/proc/self/fd/{self.root_fd}", ns=times)
            return
        with self.parent(path) as (fd, name):
            os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)

    def truncate(self, path: Path, size: int) -> None:
        fd = self.open_file(path, os.O_WRONLY)
        try:
            with translated():
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _pinned(self, path: Path) -> Iterator[tuple[int, os.stat_result]]:
        """An O_PATH fd of `path` itself (not followed) and its stat, for ops that have no *at form."""
        if not path:
            with translated():
                yield self.root_fd, os.fstat(self.root_fd)
            return
        with self.parent(path) as (dirfd, name):
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            try:
                yield fd, os.fstat(fd)
            finally:
                os.close(fd)


def _entry_type(entry: os.DirEntry) -> int:
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    if entry.is_symlink():
        return stat.S_IFLNK
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


def host_attr(st: os.stat_result, ino_base: int) -> Attr:
    attr = Attr.from_stat(st)
    attr.ino = ino_base ^ st.st_ino
    return attr
