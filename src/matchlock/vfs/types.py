"""What providers exchange with the router: attributes, directory entries, errors, limits."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

NAME_MAX = 255
PATH_MAX = 4096
MAX_DEPTH = 256  # a guest path deeper than this is refused (ENAMETOOLONG), so walks stay bounded


class FsError(Exception):
    """An errno for the guest; `detail` is for host logs only."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, detail or os.strerror(code))
        self.errno = code


@dataclass(frozen=True)
class Limits:
    """Bounds on what one guest can make the host hold."""

    max_io: int = 1 << 20  # bytes per READ or WRITE
    max_nodes: int = 200_000  # node ids the guest kernel may hold at once
    max_handles: int = 4096  # open files and directories
    max_dir_entries: int = 262_144  # entries in one directory listing
    max_inflight: int = 64  # requests served at once; further frames wait in the socket
    memory_bytes: int = 512 << 20  # data held by one memory mount


@dataclass(frozen=True)
class Caller:
    uid: int = 0
    gid: int = 0
    pid: int = 0


@dataclass
class Attr:
    ino: int
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blksize: int = 4096

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Attr:
        return cls(
            ino=st.st_ino,
            mode=st.st_mode,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            size=st.st_size,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            blksize=st.st_blksize,
        )

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True)
class DirEntry:
    name: str
    mode: int  # the type bits at least
    ino: int


@dataclass(frozen=True)
class SetAttr:
    """The attributes a SETATTR changes; None leaves one as it is. Times: ns, or NOW."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


NOW = -1  # SetAttr time meaning "the current time"


@dataclass(frozen=True)
class StatFs:
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = NAME_MAX
    frsize: int = 4096


class Handle:
    """An open file of a provider; the router owns its id."""

    def read(self, offset: int, size: int) -> bytes:
        raise FsError(errno.EBADF)

    def write(self, offset: int, data: bytes) -> int:
        raise FsError(errno.EBADF)

    def fsync(self, datasync: bool) -> None:
        return None

    def fstat(self) -> Attr:
        raise FsError(errno.EBADF)

    def truncate(self, size: int) -> None:
        raise FsError(errno.EBADF)

    def close(self) -> None:
        return None


def check_name(name: str) -> str:
    """A single directory entry name from the guest: never '', '.', '..', a '/' or a NUL."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise FsError(errno.EINVAL, f"bad name {name!r}")
    if len(os.fsencode(name)) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    return name


# Open flags a guest may pass to the host; everything else (O_PATH, O_NOFOLLOW, O_DIRECTORY, O_TMPFILE...)
# is the host's decision.
OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC
SETID_BITS = stat.S_ISUID | stat.S_ISGID


def wants_write(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_TRUNC | os.O_APPEND))
