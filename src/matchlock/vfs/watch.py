"""inotify on the directory tree of a host_fs mount: what changed, as paths relative to its root.

ctypes on libc rather than a PyPI package: three syscalls and a 16-byte event header, and the
watches must be added through an fd resolved beneath the root (`HostDir.open_dir`, then
`/proc/self/fd/N`), so no path the guest can swap for a symlink ever leads a watch outside it.

Each watched directory is a `_Dir` that knows its parent and name (not its path), so a host
rename of a directory moves its watched subtree at once. Directories created or moved in later
are watched when their event arrives, and listed, so entries made before the watch existed are
reported too. The number of watches is capped (`cap`, and a share of fs.inotify.max_user_watches):
past it, or on any failure, the tree reports `failed` and its owner stops trusting it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from .hostdir import HostDir
from .provider import Path
from .types import MAX_DEPTH, FsError

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

CONTENT = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE  # a name's data or attributes
NAMING = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO  # a name appeared or went
_DIR_MASK = CONTENT | NAMING | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK
_FILE_MASK = CONTENT | IN_DELETE_SELF | IN_MOVE_SELF
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name, NUL-padded
# Filesystems whose files other machines change, which raise no inotify event here: never trusted.
REMOTE_FS = {
    0x6969: "nfs", 0x517B: "smb", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x65735546: "fuse", 0x01021997: "9p",
    0x00C36400: "ceph", 0x5346414F: "afs", 0x01161970: "gfs2", 0x7461636F: "ocfs2", 0x0BD00BD0: "lustre",
}  # fmt: skip
DEFAULT_CAP = 8192  # directories watched per mount (each watch pins about 1 KiB of kernel memory)
_libc = ctypes.CDLL(None, use_errno=True)


def _checked(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def remote_fs(fd: int) -> str:
    """The name of the network filesystem `fd` is on, or "" (struct statfs starts with f_type on Linux)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        return ""
    return REMOTE_FS.get(ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF, "")


def user_watch_share(divisor: int = 4) -> int:
    """A share of fs.inotify.max_user_watches, which every process of this user draws from."""
    try:
        with open("/proc/sys/fs/inotify/max_user_watches") as f:
            return max(1, int(f.read()) // divisor)
    except (OSError, ValueError):
        return DEFAULT_CAP


class Inotify:
    """One non-blocking inotify instance."""

    def __init__(self) -> None:
        self.fd = _checked(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")

    def add(self, fd: int, mask: int) -> int:
        """Watch the inode `fd` refers to (an O_PATH fd is enough)."""
        path = f"/proc/self/fd/{fd}".encode()
        return _checked(_libc.inotify_add_watch(self.fd, ctypes.c_char_p(path), ctypes.c_uint32(mask)), "watch")

    def remove(self, wd: int) -> None:
        _libc.inotify_rm_watch(self.fd, wd)  # EINVAL: already gone with its directory

    def read(self, reads: int = 16) -> list[tuple[int, int, int, str]]:
        """The queued events as (wd, mask, cookie, name), at most `reads` buffers of them ([] if none)."""
        events: list[tuple[int, int, int, str]] = []
        for _ in range(reads):
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, cookie, length = _EVENT.unpack_from(data, pos)
                raw = data[pos + _EVENT.size : pos + _EVENT.size + length].split(b"\0", 1)[0]
                events.append((wd, mask, cookie, os.fsdecode(raw)))
                pos += _EVENT.size + length
        return events

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Dir:
    __slots__ = ("wd", "parent", "name", "children")

    def __init__(self, wd: int, parent: _Dir | None, name: str) -> None:
        self.wd = wd
        self.parent = parent
        self.name = name
        self.children: dict[str, _Dir] = {}


class TreeWatch:
    """The watched directories of one mount. `changes` collects (path, named) since the last take:
    `named` when a name appeared or went (its directory's listing changed), else its data or attributes."""

    def __init__(self, inotify: Inotify, host: HostDir, cap: int = DEFAULT_CAP, max_entries: int = 262_144) -> None:
        self.inotify = inotify
        self.host = host
        self.cap = min(cap, user_watch_share())
        self.max_entries = max_entries
        self.dirs: dict[int, _Dir] = {}
        self.failed = ""
        self.changes: dict[Path, bool] = {}
        self._moves: dict[int, _Dir] = {}  # MOVED_FROM cookie -> the directory, until its MOVED_TO

    # --- the tree -----------------------------------------------------------------------------------------

    def path(self, d: _Dir) -> Path:
        names = []
        node: _Dir | None = d
        while node is not None and node.parent is not None:
            names.append(node.name)
            node = node.parent
        return tuple(reversed(names))

    def start(self) -> None:
        """Watch the root and every directory below it (blocking: run it off the event loop)."""
        if self.host.single:
            self._watch_file()
        else:
            self.add((), None, report=False)

    def _watch_file(self) -> None:
        if remote := remote_fs(self.host.root_fd):
            self.fail(f"the file is on {remote}, whose changes elsewhere raise no inotify events")
            return
        try:
            wd = self.inotify.add(self.host.root_fd, _FILE_MASK)
            self.dirs[wd] = _Dir(wd, None, "")
        except OSError as exc:
            self.fail(f"cannot watch the file: {exc.strerror}")

    def add(self, rel: Path, parent: _Dir | None, *, report: bool) -> None:
        """Watch directory `rel` and the directories below it; `report` its entries as changed."""
        pending: list[tuple[Path, _Dir | None]] = [(rel, parent)]
        while pending and not self.failed:
            path, above = pending.pop()
            if len(path) > MAX_DEPTH:
                self.fail(f"a directory deeper than {MAX_DEPTH}")
                return
            found = self._watch_dir(path, above)
            if found is None:
                continue
            d, entries = found
            for name, is_dir in entries:
                if report:
                    self.changes[path + (name,)] = True
                if is_dir:
                    pending.append((path + (name,), d))

    def _watch_dir(self, path: Path, above: _Dir | None) -> tuple[_Dir, list[tuple[str, bool]]] | None:
        if len(self.dirs) >= self.cap:
            self.fail(f"more than {self.cap} directories")
            return None
        try:
            fd = self.host.open_dir(path)
        except FsError:
            return None  # gone again (or swapped for a non-directory): its parent's event says so
        try:
            if remote := remote_fs(fd):
                self.fail(f"{'/'.join(path) or 'the root'} is on {remote}, whose changes elsewhere raise no events")
                return None
            try:
                wd = self.inotify.add(fd, _DIR_MASK)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return None
                self.fail(f"cannot watch {'/'.join(path) or 'the root'}: {exc.strerror}")
                return None
            d = self.dirs.get(wd)  # the same directory under another name: a rename raced the walk
            if d is None:
                d = self.dirs[wd] = _Dir(wd, None, "")
            self._place(d, above, path[-1] if path else "")
            entries = _list(fd, self.max_entries)
            if entries is None:
                self.fail(f"a directory of more than {self.max_entries} entries")
                return None
            return d, entries
        finally:
            os.close(fd)

    def _place(self, d: _Dir, parent: _Dir | None, name: str) -> None:
        if d.parent is not None and d.parent.children.get(d.name) is d:
            del d.parent.children[d.name]
        d.parent, d.name = parent, name
        if parent is not None:
            parent.children[name] = d

    def _drop(self, d: _Dir) -> None:
        """Stop watching `d` and everything below it (moved out of the mount, or deleted)."""
        self._place(d, None, "")
        stack = [d]
        while stack:
            top = stack.pop()
            stack.extend(top.children.values())
            if self.dirs.pop(top.wd, None) is not None:
                self.inotify.remove(top.wd)

    def fail(self, reason: str) -> None:
        if not self.failed:
            self.failed = reason

    def close(self) -> None:
        for wd in self.dirs:
            self.inotify.remove(wd)
        self.dirs.clear()

    # --- events -------------------------------------------------------------------------------------------

    def event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        """Apply one event to the tree and record what changed."""
        d = self.dirs.get(wd)
        if d is None:
            return
        if mask & IN_IGNORED:
            if d.parent is None:
                self.fail("the root was deleted or unmounted")
            self._drop(d)
            return
        if mask & IN_UNMOUNT:
            self.fail("the filesystem was unmounted")
            return
        here = self.path(d)
        if not name:  # the directory (or single file) itself
            if mask & CONTENT:
                self.changes.setdefault(here, False)
            return
        path = here + (name,)
        if mask & NAMING:
            self.changes[path] = True
        elif mask & CONTENT:
            self.changes.setdefault(path, False)
        if not mask & IN_ISDIR:
            return
        if mask & IN_MOVED_FROM:
            child = d.children.get(name)
            if child is not None:
                self._place(child, None, "")
                self._moves[cookie] = child
        elif mask & IN_MOVED_TO and cookie in self._moves:
            self._place(self._moves.pop(cookie), d, name)
        elif mask & (IN_CREATE | IN_MOVED_TO):
            self.add(path, d, report=True)
        elif mask & IN_DELETE and name in d.children:
            self._drop(d.children[name])

    def settle(self) -> None:
        """After a batch of events: directories moved out and not back in are no longer ours."""
        for d in self._moves.values():
            self._drop(d)
        self._moves.clear()

    def take(self) -> dict[Path, bool]:
        changes, self.changes = self.changes, {}
        return changes


def _list(fd: int, limit: int) -> list[tuple[str, bool]] | None:
    """The (name, is a directory) entries of directory `fd`; None past `limit` of them."""
    out: list[tuple[str, bool]] = []
    try:
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return out
    try:
        with os.scandir(listing) as entries:
            for e in entries:
                if len(out) >= limit:
                    return None
                out.append((e.name, e.is_dir(follow_symlinks=False)))
    except OSError:
        pass  # removed while listed: its parent's event says so
    finally:
        os.close(listing)
    return out
