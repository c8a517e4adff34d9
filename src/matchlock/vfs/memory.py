"""`memory` mounts: a private in-memory tree, gone with the sandbox, bounded in bytes and nodes."""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
import time
from dataclasses import dataclass, field

from .provider import Path, Provider
from .types import NOW, Attr, Caller, DirEntry, FsError, Handle, Limits, SetAttr, StatFs, wants_write

_inos = itertools.count(2)
# What mknod may make: every kind but directories and symlinks (they have calls of their own).
MKNOD_KINDS = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFBLK, stat.S_IFCHR)


def reserve_inos(highest: int) -> None:
    """Make new inodes' numbers start past `highest` (a restored tree keeps the numbers it was saved with)."""
    global _inos
    _inos = itertools.count(max(next(_inos), highest + 1))


@dataclass
class _Inode:
    mode: int
    uid: int = 0
    gid: int = 0
    ino: int = field(default_factory=lambda: next(_inos))
    nlink: int = 1
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = 0
    ctime_ns: int = 0
    data: bytearray = field(default_factory=bytearray)
    children: dict[str, _Inode] = field(default_factory=dict)
    target: str = ""
    rdev: int = 0  # a device node's number: metadata only (the guest mounts it nodev)

    def __post_init__(self) -> None:
        self.mtime_ns = self.ctime_ns = self.atime_ns

    def attr(self) -> Attr:
        size = len(self.target) if stat.S_ISLNK(self.mode) else len(self.data)
        return Attr(
            ino=self.ino,
            mode=self.mode,
            nlink=2 + sum(c.is_dir for c in self.children.values()) if self.is_dir else self.nlink,
            uid=self.uid,
            gid=self.gid,
            rdev=self.rdev,
            size=size,
            blocks=(size + 511) // 512,
            atime_ns=self.atime_ns,
            mtime_ns=self.mtime_ns,
            ctime_ns=self.ctime_ns,
        )

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()


class MemoryProvider(Provider):
    readonly = False
    cache_seconds = 3600.0  # only the guest changes it, and its kernel sees its own changes
    quick_getattr = True  # its lock is only ever held for in-memory work
    kind = "memory"

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.root = _Inode(stat.S_IFDIR | 0o755)
        self.bytes_used = 0
        self.nodes = 1
        self.lock = threading.RLock()

    @classmethod
    def single_file(cls, data: bytes, mode: int, uid: int, gid: int, limits: Limits | None = None) -> MemoryProvider:
        """A mount that is one regular file holding `data` (its root is the file, as a host_fs of a file)."""
        provider = cls(limits)
        if len(data) > provider.limits.memory_bytes:
            raise FsError(errno.EFBIG, f"a memory mount holds at most {provider.limits.memory_bytes} bytes")
        provider.root = _Inode(stat.S_IFREG | (mode & 0o7777), uid=uid, gid=gid, data=bytearray(data))
        provider.bytes_used = len(data)
        return provider

    # --- lookup ----------------------------------------------------------------------------------------------

    def _get(self, path: Path) -> _Inode:
        node = self.root
        for name in path:
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            child = node.children.get(name)
            if child is None:
                raise FsError(errno.ENOENT)
            node = child
        return node

    def _parent(self, path: Path) -> tuple[_Inode, str]:
        if not path:
            raise FsError(errno.EBUSY)
        parent = self._get(path[:-1])
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        return parent, path[-1]

    def _add(self, path: Path, node: _Inode) -> _Inode:
        parent, name = self._parent(path)
        if name in parent.children:
            raise FsError(errno.EEXIST)
        if self.nodes >= self.limits.max_nodes:
            raise FsError(errno.ENOSPC, f"memory mount holds {self.nodes} files, its limit")
        parent.children[name] = node
        parent.touch()
        self.nodes += 1
        return node

    # --- reads -----------------------------------------------------------------------------------------------

    def getattr(self, path: Path) -> Attr:
        with self.lock:
            return self._get(path).attr()

    def listdir(self, path: Path, limit: int) -> list[DirEntry]:
        with self.lock:
            node = self._get(path)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if len(node.children) > limit:
                raise FsError(errno.EOVERFLOW)
            return [DirEntry(name, child.mode, child.ino) for name, child in node.children.items()]

    def readlink(self, path: Path) -> str:
        with self.lock:
            node = self._get(path)
            if not stat.S_ISLNK(node.mode):
                raise FsError(errno.EINVAL)
            return node.target

    def open(self, path: Path, flags: int) -> Handle:
        with self.lock:
            node = self._get(path)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FsError(errno.EACCES)
            if flags & os.O_TRUNC:
                self._resize(node, 0)
            return _MemoryFile(self, node, flags)

    def statfs(self) -> StatFs:
        total = self.limits.memory_bytes // 4096
        free = max(0, total - self.bytes_used // 4096)
        return StatFs(blocks=total, bfree=free, bavail=free, files=self.limits.max_nodes,
                      ffree=self.limits.max_nodes - self.nodes)  # fmt: skip

    # --- writes ----------------------------------------------------------------------------------------------

    def _resize(self, node: _Inode, size: int) -> None:
        if size > self.limits.memory_bytes:  # no file here can be larger than the whole mount
            raise FsError(errno.EFBIG, f"a memory mount holds at most {self.limits.memory_bytes} bytes")
        grow = size - len(node.data)
        if grow > 0 and self.bytes_used + grow > self.limits.memory_bytes:
            raise FsError(errno.ENOSPC, f"memory mount is full ({self.limits.memory_bytes} bytes)")
        if grow > 0:
            node.data.extend(bytes(grow))
        else:
            del node.data[size:]
        self.bytes_used += grow
        node.touch()

    def setattr(self, path: Path, changes: SetAttr, handle: Handle | None) -> Attr:
        with self.lock:
            node = handle.node if isinstance(handle, _MemoryFile) else self._get(path)
            if changes.size is not None:
                if node.is_dir:
                    raise FsError(errno.EISDIR)
                if not stat.S_ISREG(node.mode):  # a FIFO, socket, device or symlink has no data to size
                    raise FsError(errno.EINVAL, "truncate of a file that is not a regular file")
                self._resize(node, changes.size)
            if changes.mode is not None:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(changes.mode)
            if changes.uid is not None:
                node.uid = changes.uid
            if changes.gid is not None:
                node.gid = changes.gid
            now = time.time_ns()
            if changes.atime_ns is not None:
                node.atime_ns = now if changes.atime_ns == NOW else changes.atime_ns
            if changes.mtime_ns is not None:
                node.mtime_ns = now if changes.mtime_ns == NOW else changes.mtime_ns
            node.ctime_ns = now
            return node.attr()

    def create(self, path: Path, flags: int, mode: int, caller: Caller) -> tuple[Handle, Attr]:
        with self.lock:
            node = self._add(path, _Inode(stat.S_IFREG | stat.S_IMODE(mode), caller.uid, caller.gid))
            return _MemoryFile(self, node, flags), node.attr()

    def mkdir(self, path: Path, mode: int, caller: Caller) -> Attr:
        with self.lock:
            return self._add(path, _Inode(stat.S_IFDIR | stat.S_IMODE(mode), caller.uid, caller.gid)).attr()

    def mknod(self, path: Path, mode: int, rdev: int, caller: Caller) -> Attr:
        # Device nodes are only names with a number here: nothing on the host stands behind them, and the
        # guest mounts FUSE nodev, so opening one never reaches a device.
        kind = stat.S_IFMT(mode)
        if kind not in MKNOD_KINDS:
            raise FsError(errno.EINVAL, f"mknod of type {kind:o}")
        device = rdev & 0xFFFFFFFF if kind in (stat.S_IFBLK, stat.S_IFCHR) else 0  # FUSE carries 32 bits
        with self.lock:
            node = _Inode(kind | stat.S_IMODE(mode), caller.uid, caller.gid, rdev=device)
            return self._add(path, node).attr()

    def symlink(self, path: Path, target: str, caller: Caller) -> Attr:
        with self.lock:
            return self._add(path, _Inode(stat.S_IFLNK | 0o777, caller.uid, caller.gid, target=target)).attr()

    def link(self, source: Path, path: Path) -> Attr:
        with self.lock:
            node = self._get(source)
            if node.is_dir:
                raise FsError(errno.EPERM)
            self._add(path, node)
            self.nodes -= 1  # a second name, not a second inode
            node.nlink += 1
            node.ctime_ns = time.time_ns()
            return node.attr()

    def _drop(self, node: _Inode) -> None:
        node.nlink -= 1
        node.ctime_ns = time.time_ns()
        if node.nlink <= 0 or node.is_dir:
            self.bytes_used -= len(node.data)
            self.nodes -= 1

    def unlink(self, path: Path) -> None:
        with self.lock:
            parent, name = self._parent(path)
            node = parent.children.get(name)
            if node is None:
                raise FsError(errno.ENOENT)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            del parent.children[name]
            parent.touch()
            self._drop(node)

    def rmdir(self, path: Path) -> None:
        with self.lock:
            parent, name = self._parent(path)
            node = parent.children.get(name)
            if node is None:
                raise FsError(errno.ENOENT)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if node.children:
                raise FsError(errno.ENOTEMPTY)
            del parent.children[name]
            parent.touch()
            self._drop(node)

    def rename(self, source: Path, target: Path, flags: int) -> None:
        with self.lock:
            sparent, sname = self._parent(source)
            tparent, tname = self._parent(target)
            node = sparent.children.get(sname)
            if node is None:
                raise FsError(errno.ENOENT)
            if node.is_dir and target[: len(source)] == source and len(target) > len(source):
                raise FsError(errno.EINVAL, "a directory into itself")
            existing = tparent.children.get(tname)
            if flags & 2:  # RENAME_EXCHANGE
                if existing is None:
                    raise FsError(errno.ENOENT)
                sparent.children[sname], tparent.children[tname] = existing, node
                return
            if existing is not None:
                if flags & 1:  # RENAME_NOREPLACE
                    raise FsError(errno.EEXIST)
                if existing is node:
                    return
                if existing.is_dir != node.is_dir:
                    raise FsError(errno.EISDIR if existing.is_dir else errno.ENOTDIR)
                if existing.is_dir and existing.children:
                    raise FsError(errno.ENOTEMPTY)
                self._drop(existing)
            del sparent.children[sname]
            tparent.children[tname] = node
            sparent.touch()
            tparent.touch()
            node.ctime_ns = time.time_ns()


class _MemoryFile(Handle):
    def __init__(self, provider: MemoryProvider, node: _Inode, flags: int) -> None:
        self.provider = provider
        self.node = node
        self.writable = wants_write(flags)
        self.append = bool(flags & os.O_APPEND)

    def read(self, offset: int, size: int) -> bytes:
        with self.provider.lock:
            self.node.atime_ns = time.time_ns()
            return bytes(self.node.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise FsError(errno.EBADF)
        with self.provider.lock:
            if self.append:
                offset = len(self.node.data)
            end = offset + len(data)
            if end > len(self.node.data):
                self.provider._resize(self.node, end)
            self.node.data[offset:end] = data
            self.node.touch()
            return len(data)

    def fstat(self) -> Attr:
        with self.provider.lock:
            return self.node.attr()

    def truncate(self, size: int) -> None:
        with self.provider.lock:
            self.provider._resize(self.node, size)
