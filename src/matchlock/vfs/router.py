"""The mount router: node and handle tables, longest-prefix routing, synthesized directories, interception.

Mount roots that lie under no other mount are what the guest mounts (one FUSE filesystem each, from
the HELLO reply); mounts nested inside one (`/workspace/.host/x`) are routed here, and the
directories leading to them are synthesized when the enclosing provider has none. Node ids are
(parent node, name) pairs of the guest's tree (`nodes.NodeTable`); both tables are bounded
(`Limits`) and change only on the event loop; provider calls run in the thread pool. Every change
the guest makes to a watched host_fs mount is marked for `notify.Notifier`, which tells the guest
about the host's own changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..wire import vfs as wire
from .intercept import Interceptor
from .lookup_dir import lookup_dir
from .nodes import DETACHED, Node, NodeTable
from .notify import Notifier
from .provider import Path, Provider
from .types import NOW as TIME_NOW
from .types import Attr, Caller, DirEntry, FsError, Handle, Limits, SetAttr, check_name, wants_write

T = TypeVar("T")
_SYNTHETIC_INO = 1 << 62


@dataclass
class Mount:
    path: str  # the guest path
    provider: Provider
    readonly: bool = False
    guest_overlay: bool = False  # a read-only lower the guest overlays itself (sandbox/vfs.py)
    parts: Path = field(init=False, repr=False)  # `path` split once: every request routes by it

    def __post_init__(self) -> None:
        self.parts = tuple(self.path.strip("/").split("/"))


@dataclass
class _Open:
    node: Node
    handle: Handle | None = None
    directory: bool = False
    listing: list[DirEntry] | None = None  # a directory's, taken at its first READDIR at offset 0
    flags: int = 0  # the guest's open flags, for a restore to reopen the file with (vfs/snapshot.py)


def wire_attr(attr: Attr) -> wire.Attr:
    return wire.Attr(
        attr.ino & (2**64 - 1), max(0, attr.size), max(0, attr.blocks), attr.atime_ns, attr.mtime_ns, attr.ctime_ns,
        attr.mode & 0xFFFFFFFF, min(attr.nlink, 0xFFFFFFFF), attr.uid & 0xFFFFFFFF, attr.gid & 0xFFFFFFFF,
        attr.rdev & 0xFFFFFFFF, attr.blksize & 0xFFFFFFFF,
    )  # fmt: skip


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Router(NodeTable):
    def __init__(
        self, mounts: list[Mount], interceptor: Interceptor, executor: Executor, limits: Limits | None = None
    ) -> None:
        self.interceptor = interceptor
        self.executor = executor
        # The server's pool says which calls are quick enough to make on the event loop (`runs_here`):
        # those skip the pool's future and the loop wake-up it costs (one more turn per request).
        self._runs_here: Callable[[object, tuple], bool] | None = getattr(executor, "runs_here", None)
        self.mounts = sorted(mounts, key=lambda m: len(m.parts), reverse=True)  # longest prefix first
        self.points = {m.parts: m for m in mounts}
        self.virtual: set[Path] = set()  # strict ancestors of nested mount points
        self.tops = [m for m in mounts if not any(o is not m and _below(m.parts, o.parts) for o in mounts)]
        for m in mounts:
            top = next(t for t in self.tops if _below(m.parts, t.parts) or t is m)
            self.virtual.update(m.parts[:n] for n in range(len(top.parts), len(m.parts)))
        self.virtual -= set(self.points)
        super().__init__(limits or Limits(), [top.parts for top in self.tops])
        self.roots: list[tuple[Mount, Node]] = list(zip(self.tops, self.root_nodes))
        self.handles: dict[int, _Open] = {}
        self._fhs = itertools.count(1)
        self.notifier = Notifier(self)  # started by the server, once it can send
        self.guest_opendir = False  # the guest asked for FEATURE_GUEST_OPENDIR (set by the server)
        self.lookup_dir = False  # the server granted FEATURE_LOOKUP_DIR (lookup_dir.py)

    def hello(self) -> tuple[wire.Mount, ...]:
        # A top caches ENOENT only as long as every mount inside it allows (a nested host_fs: 1 s).
        return tuple(
            wire.Mount(top.path, node.id, top.readonly, self._negative_ns(top), top.guest_overlay)
            for top, node in self.roots
        )

    def mixed_readonly(self) -> bool:
        """A nested mount is read-only inside a writable one, or the reverse (the guest kernel cannot tell)."""
        return any(m.readonly != top.readonly for m in self.mounts for top in self.tops if _below(m.parts, top.parts))

    def _negative_ns(self, top: Mount) -> int:
        return min(_ns(m.provider.negative_seconds) for m in self.mounts if m is top or _below(m.parts, top.parts))

    def close(self) -> None:
        self.notifier.close()
        for opened in self.handles.values():
            if opened.handle is not None:
                opened.handle.close()
        self.handles.clear()
        for m in self.mounts:
            m.provider.close()

    # --- routing -----------------------------------------------------------------------------------------

    def route(self, parts: Path) -> tuple[Mount, Path]:
        for m in self.mounts:
            if parts[: len(m.parts)] == m.parts:
                return m, parts[len(m.parts) :]
        raise FsError(errno.ENOENT)

    def _child_mounts(self, parts: Path) -> list[Path]:
        n = len(parts)
        return [p for p in (*self.points, *self.virtual) if len(p) == n + 1 and p[:n] == parts]

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        if self._runs_here is not None and self._runs_here(fn, args):
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _stat(self, parts: Path) -> Attr:
        # Most requests are LOOKUP/GETATTR: a getattr that cannot wait (host_fs, memory; not the
        # overlay's, behind a copy-up) runs here, saving ~0.2 ms of thread hops per round trip.
        if self.route(parts)[0].provider.quick_getattr:
            return self._getattr(parts)
        return await self._io(self._getattr, parts)

    def _getattr(self, parts: Path) -> Attr:
        """Blocking: the attributes at a guest path, synthesizing the directories to nested mounts."""
        m, rel = self.route(parts)
        if parts in self.virtual:
            try:
                attr = m.provider.getattr(rel)
                if attr.is_dir:
                    return attr
            except FsError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
            return Attr(ino=_SYNTHETIC_INO ^ hash(parts) & (2**62 - 1), mode=stat.S_IFDIR | 0o755, nlink=2)
        return m.provider.getattr(rel)

    def _listing(self, parts: Path, limit: int = 0) -> list[DirEntry]:
        m, rel = self.route(parts)
        try:
            entries = m.provider.listdir(rel, min(limit or self.limits.max_dir_entries, self.limits.max_dir_entries))
        except FsError as exc:
            if parts not in self.virtual or exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            entries = []
        extra = {p[-1]: p for p in self._child_mounts(parts)}
        if extra:
            entries = [e for e in entries if e.name not in extra]
            for name, p in extra.items():
                attr = self._getattr(p)
                entries.append(DirEntry(name, attr.mode, attr.ino))
        return entries

    def _validity(self, parts: Path) -> int:
        return _ns(self.route(parts)[0].provider.cache_seconds)

    def _attr_validity(self, node: Node, parts: Path, attr: Attr) -> int:
        """Attributes are cached, except a hard-linked file's: nodes are names here, so the guest kernel
        holds one inode per name, and a write (or chmod, chown, link) through one name must not leave the
        other's size, mode, owner or nlink stale. Any non-directory can have names: FIFOs, sockets, devices."""
        node.linked = not stat.S_ISDIR(attr.mode) and attr.nlink > 1
        return 0 if node.linked else self._validity(parts)

    def _entry(self, parent: Node, name: str, parts: Path, attr: Attr) -> wire.Entry:
        node = self._remember(parent, name)
        return wire.Entry(node.id, 0, self._validity(parts), self._attr_validity(node, parts, attr), wire_attr(attr))

    def _check(self, op: str, parts: Path) -> str:
        path = "/" + "/".join(parts)
        if self.interceptor.blocked(op, path):
            raise FsError(errno.EPERM, f"{op} {path} blocked by a vfs interception rule")
        return path

    def _same_rules(self, parts: Path, newparts: Path) -> None:
        """A rename or link may not move a file out from under its block rules, nor onto a name under others."""
        old, new = "/" + "/".join(parts), "/" + "/".join(newparts)
        if self.interceptor.differ(old, new):
            raise FsError(errno.EXDEV, f"{old} and {new} are under different vfs interception rules")

    def _emit(self, op: str, path: str, attr: Attr | None, caller: Caller, size: int | None = None) -> None:
        if attr is None:
            self.interceptor.event(op, path, size or 0, 0, caller.uid, caller.gid)
        else:
            self.interceptor.event(op, path, attr.size if size is None else size, attr.mode, attr.uid, attr.gid)

    def _writable_child(self, parent: Node, name: bytes, *, busy: int) -> tuple[Path, Mount, Path, str]:
        """For an op that makes or removes `name` in `parent`: its parts, mount and relative path."""
        text = check_name(os.fsdecode(name))
        parts = self._parts(parent) + (text,)
        if parts in self.points or parts in self.virtual:
            raise FsError(busy, "a mount point")
        m, rel = self.route(parts)
        if m.readonly:
            raise FsError(errno.EROFS)
        return parts, m, rel, text

    def _synthetic_parent(self, exc: FsError, parts: Path) -> FsError:
        """ENOENT under a synthesized directory means there is nowhere to write: say EROFS."""
        if exc.errno == errno.ENOENT and parts[:-1] in self.virtual:
            return FsError(errno.EROFS, "a synthesized directory")
        return exc

    def _open_path(self, node: Node, op: str) -> str | None:
        """The checked guest path of an open file; None once it is unlinked (it was allowed when opened)."""
        try:
            parts = self._parts(node)
        except FsError:
            return None
        return self._check(op, parts)

    def _handle(self, fh: int) -> _Open:
        opened = self.handles.get(fh)
        if opened is None:
            raise FsError(errno.EBADF, f"unknown handle {fh}")
        return opened

    def _open_handle(self, opened: _Open) -> int:
        if len(self.handles) >= self.limits.max_handles:
            if opened.handle is not None:
                opened.handle.close()
            raise FsError(errno.EMFILE, f"the guest holds {len(self.handles)} open files, the limit")
        fh = next(self._fhs)
        self.handles[fh] = opened
        return fh

    def _cache_flags(self, parts: Path, node: Node | None = None) -> int:
        # Private mounts change only through this guest, so its page cache stays valid across opens;
        # not a hard-linked file's, which another name (another guest inode) may have written.
        if node is not None and node.linked:
            return 0
        return wire.OPEN_KEEP_CACHE if self.route(parts)[0].provider.cache_seconds > 60 else 0

    # --- dispatch ----------------------------------------------------------------------------------------

    async def handle(self, request: wire.Request) -> wire.Result:
        args = request.args
        caller = Caller(request.uid, request.gid, request.pid)
        method = _METHODS.get(type(args))
        if method is None:
            raise FsError(errno.ENOSYS)
        return await method(self, args, caller)

    async def lookup(self, a: wire.Lookup, caller: Caller) -> wire.Result:
        parent = self._node(a.parent)
        name = check_name(os.fsdecode(a.name))
        parts = self._parts(parent) + (name,)
        path = self._check("stat", parts)
        attr = await self._stat(parts)
        self._emit("stat", path, attr, caller)
        return self._entry(parent, name, parts, attr)

    def _handle_of(self, node: Node, fh: int) -> _Open | None:
        """The open handle `fh` that GETATTR or SETATTR names, which must be open on `node` itself: the guest
        kernel sends the fh an inode was opened with, and another node's (a file of another mount,
        perhaps a read-only one) would stat or change that file instead of this one."""
        opened = self.handles.get(fh) if fh else None
        if opened is not None and opened.node is not node:
            raise FsError(errno.EBADF, f"handle {fh} is open on another node than {node.id}")
        return opened

    async def getattr(self, a: wire.Getattr, caller: Caller) -> wire.Result:
        node = self._node(a.node)
        opened = self._handle_of(node, a.fh)
        if opened is None and node.parent is DETACHED:
            # fstat(2) of an unlinked open file: the kernel sends no fh with GETATTR (only reads and
            # writes carry one), so any handle open on the node answers (pjdfstest unlink/14.t).
            opened = next((o for o in self.handles.values() if o.node is node and o.handle is not None), None)
        if opened is not None and opened.handle is not None:
            # An open file keeps its attributes even once unlinked.
            attr = await self._io(opened.handle.fstat)
            try:
                valid = self._attr_validity(node, self._parts(node), attr)
            except FsError:
                valid = 0
            return wire.AttrReply(valid, wire_attr(attr))
        parts = self._parts(node)
        self._check("stat", parts)
        attr = await self._stat(parts)
        return wire.AttrReply(self._attr_validity(node, parts, attr), wire_attr(attr))

    async def setattr(self, a: wire.Setattr, caller: Caller) -> wire.Result:
        node = self._node(a.node)
        parts = self._parts(node)
        m, rel = self.route(parts)
        if parts in self.virtual:
            raise FsError(errno.EROFS, "a synthesized directory")
        changes = SetAttr(
            mode=a.mode if a.valid & wire.SET_MODE else None,
            uid=a.uid if a.valid & wire.SET_UID else None,
            gid=a.gid if a.valid & wire.SET_GID else None,
            size=a.size if a.valid & wire.SET_SIZE else None,
            atime_ns=TIME_NOW if a.valid & wire.SET_ATIME_NOW else a.atime_ns if a.valid & wire.SET_ATIME else None,
            mtime_ns=TIME_NOW if a.valid & wire.SET_MTIME_NOW else a.mtime_ns if a.valid & wire.SET_MTIME else None,
        )
        if changes.size is not None and changes.size >= 1 << 63:
            raise FsError(errno.EFBIG)
        ops = [op for op, on in (("truncate", changes.size is not None),
                                 ("chmod", changes.mode is not None or changes.uid is not None
                                  or changes.gid is not None)) if on]  # fmt: skip
        path = "/" + "/".join(parts)
        for op in ops:
            self._check(op, parts)
        if m.readonly:
            raise FsError(errno.EROFS)
        opened = self._handle_of(node, a.fh)
        handle = opened.handle if opened is not None else None
        attr = await self._io(m.provider.setattr, rel, changes, handle)
        self.notifier.own(m, rel, attr)
        for op in ops:
            self._emit(op, path, attr, caller)
        return wire.AttrReply(self._attr_validity(node, parts, attr), wire_attr(attr))

    async def readlink(self, a: wire.Readlink, caller: Caller) -> wire.Result:
        parts = self._parts(self._node(a.node))
        path = self._check("readlink", parts)
        m, rel = self.route(parts)
        target = os.fsencode(await self._io(m.provider.readlink, rel))
        if not 0 < len(target) <= wire.MAX_TARGET:
            raise FsError(errno.ENAMETOOLONG)
        self._emit("readlink", path, None, caller, len(target))
        return target

    def _room_for(self, parent: Node, name: str) -> None:
        """ENFILE before an op makes `name` on the host when its entry could not get a node (the table is full)."""
        if len(self.nodes) >= self.limits.max_nodes and (parent.id, name) not in self.index:
            raise FsError(errno.ENFILE, f"the guest holds {len(self.nodes)} nodes, the limit")

    async def _make(self, op: str, parent_id: int, name: bytes, caller: Caller, method: str, *args: Any) -> wire.Entry:
        parent = self._node(parent_id)
        parts, m, rel, text = self._writable_child(parent, name, busy=errno.EEXIST)
        path = self._check(op, parts)
        self._room_for(parent, text)
        try:
            attr = await self._io(getattr(m.provider, method), rel, *args)
        except FsError as exc:
            raise self._synthetic_parent(exc, parts) from None
        self.notifier.own(m, rel, attr)
        self._emit(op, path, attr, caller)
        return self._entry(parent, text, parts, attr)

    async def symlink(self, a: wire.Symlink, caller: Caller) -> wire.Result:
        return await self._make("symlink", a.parent, a.name, caller, "symlink", os.fsdecode(a.target), caller)

    async def mknod(self, a: wire.Mknod, caller: Caller) -> wire.Result:
        return await self._make("create", a.parent, a.name, caller, "mknod", a.mode, a.rdev, caller)

    async def mkdir(self, a: wire.Mkdir, caller: Caller) -> wire.Result:
        return await self._make("mkdir", a.parent, a.name, caller, "mkdir", a.mode, caller)

    async def link(self, a: wire.Link, caller: Caller) -> wire.Result:
        source = self._parts(self._node(a.node))
        parent = self._node(a.newparent)
        parts, m, rel, text = self._writable_child(parent, a.newname, busy=errno.EEXIST)
        sm, srel = self.route(source)
        if sm is not m or source in self.points:
            raise FsError(errno.EXDEV)
        path = self._check("create", parts)
        self._same_rules(source, parts)
        self._room_for(parent, text)
        attr = await self._io(m.provider.link, srel, rel)
        self.notifier.own(m, rel, attr)
        self.notifier.own(m, srel, attr)  # its link count changed
        self._emit("create", path, attr, caller)
        return self._entry(parent, text, parts, attr)

    async def _remove(self, a: wire.Unlink | wire.Rmdir, caller: Caller, directory: bool) -> wire.Result:
        parent = self._node(a.parent)
        parts, m, rel, text = self._writable_child(parent, a.name, busy=errno.EBUSY)
        path = self._check("remove", parts)
        await self._io(m.provider.rmdir if directory else m.provider.unlink, rel)
        self.notifier.own(m, rel, gone=True)
        self._detach(parent, text)
        self._emit("remove", path, None, caller)
        return None

    async def unlink(self, a: wire.Unlink, caller: Caller) -> wire.Result:
        return await self._remove(a, caller, directory=False)

    async def rmdir(self, a: wire.Rmdir, caller: Caller) -> wire.Result:
        return await self._remove(a, caller, directory=True)

    async def rename(self, a: wire.Rename, caller: Caller) -> wire.Result:
        parent, newparent = self._node(a.parent), self._node(a.newparent)
        parts, m, rel, name = self._writable_child(parent, a.name, busy=errno.EBUSY)
        newparts, nm, newrel, newname = self._writable_child(newparent, a.newname, busy=errno.EBUSY)
        if nm is not m:
            raise FsError(errno.EXDEV)
        path = self._check("rename", parts)
        self._check("rename", newparts)
        self._same_rules(parts, newparts)
        try:
            await self._io(m.provider.rename, rel, newrel, a.flags)
        except FsError as exc:
            raise self._synthetic_parent(exc, newparts) from None
        self.notifier.own(m, rel, gone=not a.flags & wire.RENAME_EXCHANGE)
        self.notifier.own(m, newrel)
        if a.flags & wire.RENAME_EXCHANGE:
            self._detach(parent, name)
            self._detach(newparent, newname)
        else:
            self._move(parent, name, newparent, newname)
        self._emit("rename", path, None, caller)
        return None

    async def open(self, a: wire.Open, caller: Caller) -> wire.Result:
        node = self._node(a.node)
        parts = self._parts(node)
        m, rel = self.route(parts)
        path = self._check("open", parts)
        if truncating := bool(a.flags & os.O_TRUNC):  # `> file`: a truncate, refused before the bytes go
            self._check("truncate", parts)
        if wants_write(a.flags) and m.readonly:
            raise FsError(errno.EROFS)
        if parts in self.virtual:
            raise FsError(errno.EISDIR)
        handle = await self._io(m.provider.open, rel, a.flags)
        if wants_write(a.flags):
            self.notifier.wrote(node, handle)  # O_TRUNC
        fh = self._open_handle(_Open(node, handle, flags=a.flags))
        self._emit("open", path, None, caller)
        if truncating:
            self._emit("truncate", path, None, caller)
        return wire.Opened(fh, self._cache_flags(parts, node))

    async def create(self, a: wire.Create, caller: Caller) -> wire.Result:
        parent = self._node(a.parent)
        parts, m, rel, text = self._writable_child(parent, a.name, busy=errno.EEXIST)
        path = self._check("create", parts)
        self._room_for(parent, text)
        if len(self.handles) >= self.limits.max_handles:  # refused before the file exists
            raise FsError(errno.EMFILE, f"the guest holds {len(self.handles)} open files, the limit")
        try:
            handle, attr = await self._io(m.provider.create, rel, a.flags, a.mode, caller)
        except FsError as exc:
            raise self._synthetic_parent(exc, parts) from None
        self.notifier.own(m, rel, attr)
        # An error from here on reaches the guest instead of the entry and the handle: neither may stay,
        # or the host keeps an open file (the node table full: ENFILE) or a lookup no FORGET gives back.
        try:
            entry = self._entry(parent, text, parts, attr)
        except BaseException:
            handle.close()
            raise
        node = self.nodes[entry.node]
        try:
            fh = self._open_handle(_Open(node, handle, flags=a.flags))  # closes the file if it fails
        except BaseException:
            self.forget(((node.id, 1),))
            raise
        self._emit("create", path, attr, caller)
        return wire.Created(entry, fh, self._cache_flags(parts))

    async def read(self, a: wire.Read, caller: Caller) -> wire.Result:
        opened = self._handle(a.fh)
        if opened.handle is None:
            raise FsError(errno.EISDIR)
        if a.size > self.limits.max_io or a.offset >= 1 << 63:
            raise FsError(errno.EINVAL)
        if self.interceptor.enabled:
            path = self._open_path(opened.node, "read")
            data = await self._io(opened.handle.read, a.offset, a.size)
            if path is not None:
                self._emit("read", path, await self._io(opened.handle.fstat), caller, len(data))
            return data
        return await self._io(opened.handle.read, a.offset, a.size)

    async def write(self, a: wire.Write, caller: Caller) -> wire.Result:
        opened = self._handle(a.fh)
        if opened.handle is None:
            raise FsError(errno.EISDIR)
        if a.offset + len(a.data) >= 1 << 63:
            raise FsError(errno.EFBIG)
        path = self._open_path(opened.node, "write") if self.interceptor.enabled else None
        written = await self._io(opened.handle.write, a.offset, a.data)
        self.notifier.wrote(opened.node, opened.handle)
        if path is not None:
            self._emit("write", path, await self._io(opened.handle.fstat), caller, written)
        return wire.Written(written)

    async def flush(self, a: wire.Flush, caller: Caller) -> wire.Result:
        self._handle(a.fh)
        return None

    async def release(self, a: wire.Release, caller: Caller) -> wire.Result:
        opened = self.handles.pop(a.fh, None)
        if opened is None:
            raise FsError(errno.EBADF)
        if opened.handle is not None:
            await self._io(opened.handle.close)
        if self.interceptor.enabled:
            with contextlib.suppress(FsError):
                self._emit("close", "/" + "/".join(self._parts(opened.node)), None, caller)
        return None

    async def fsync(self, a: wire.Fsync, caller: Caller) -> wire.Result:
        opened = self._handle(a.fh)
        if opened.handle is not None:
            await self._io(opened.handle.fsync, bool(a.datasync))
        if self.interceptor.enabled:
            with contextlib.suppress(FsError):
                self._emit("sync", "/" + "/".join(self._parts(opened.node)), None, caller)
        return None

    async def opendir(self, a: wire.Opendir, caller: Caller) -> wire.Result:
        node = self._node(a.node)
        parts = self._parts(node)
        path = self._check("readdir", parts)
        # No listing yet: the guest kernel takes its cached listing's mtime baseline at the first READDIR,
        # and a listing taken here would miss a host change (and its notice) landing in between.
        if not stat.S_ISDIR((await self._stat(parts)).mode):
            raise FsError(errno.ENOTDIR, f"{path} is not a directory")
        fh = self._open_handle(_Open(node, directory=True))
        if not self._cache_flags(parts) or self.interceptor.enabled:
            # With interception the guest kernel keeps no listing: each one reaches READDIR here, where
            # its rule and its event run (the listing is taken there, not at this open).
            return wire.Opened(fh, 0)
        flags = wire.OPEN_CACHE_DIR | wire.OPEN_KEEP_CACHE
        # The guest may open this directory itself from now on: it is cached long (a private mount, or
        # a watched one whose notices drop the guest's leave to), and no rule or event needs the host to
        # see each open. The listing is then taken at the first READDIR that misses the guest's cache.
        if self.guest_opendir and not self.interceptor.enabled:
            flags |= wire.OPEN_GUEST_DIR
        return wire.Opened(fh, flags)

    async def opendir_read(self, a: wire.OpendirRead, caller: Caller) -> wire.Result:
        if not self.guest_opendir:  # served only to a guest that offered FEATURE_GUEST_OPENDIR
            raise FsError(errno.ENOSYS, "OPENDIR_READ without FEATURE_GUEST_OPENDIR")
        opened = await self.opendir(wire.Opendir(a.node, 0), caller)
        assert isinstance(opened, wire.Opened)
        try:
            entries = await self.readdir(wire.Readdir(a.node, opened.fh, a.offset, a.size, a.plus), caller)
        except BaseException:
            self.handles.pop(opened.fh, None)
            raise
        assert isinstance(entries, tuple)
        return wire.DirOpened(opened.fh, opened.flags, entries)

    async def readdir(self, a: wire.Readdir, caller: Caller) -> wire.Result:
        opened = self._handle(a.fh)
        if not opened.directory:
            raise FsError(errno.ENOTDIR)
        node = opened.node
        if a.offset == 0 or opened.listing is None:  # a first read, or one after a rewinddir: list afresh
            parts = self._parts(node)
            path = self._check("readdir", parts)
            opened.listing = await self._io(self._listing, parts)
            self._emit("readdir", path, None, caller, len(opened.listing))
        # Never ino 0: glibc's readdir skips such entries as deleted.
        names = [DirEntry(".", stat.S_IFDIR, 1), DirEntry("..", stat.S_IFDIR, 1), *opened.listing]
        if a.offset >= len(names):
            return ()
        page, used = [], 0
        for index in range(a.offset, len(names)):
            entry = names[index]
            size = wire.dirent_size(len(os.fsencode(entry.name)), bool(a.plus))
            if used + size > a.size:
                break
            used += size
            page.append((index + 1, entry))
        if not a.plus:
            return tuple(wire.DirEntry(cookie, e.ino or 1, stat.S_IFMT(e.mode) >> 12, os.fsencode(e.name))
                         for cookie, e in page)  # fmt: skip
        parts = self._parts(node)
        wanted = [parts + (e.name,) for _, e in page if e.name not in (".", "..")]
        attrs = await self._io(self._attrs, wanted)
        out = []
        for cookie, e in page:
            if e.name in (".", ".."):
                out.append(wire.DirEntry(cookie, 1, stat.S_IFDIR >> 12, os.fsencode(e.name)))
                continue
            try:
                out.append(self._plus_entry(node, parts, cookie, e, attrs.get(e.name)))
            except FsError as exc:  # the node table is full: this entry without a node, as the kernel allows
                if exc.errno != errno.ENFILE:
                    raise
                out.append(self._plus_entry(node, parts, cookie, e, None))
        return tuple(out)

    def _plus_entry(self, parent: Node, parts: Path, cookie: int, e: DirEntry, attr: Attr | None) -> wire.DirEntry:
        """A listed entry of `parent` with its node (one lookup); without one if it went away since the listing
        (`attr` None). Raises ENFILE, having counted nothing, when the node table is full."""
        name = os.fsencode(e.name)
        if attr is None:
            return wire.DirEntry(cookie, e.ino or 1, stat.S_IFMT(e.mode) >> 12, name)
        found = self._entry(parent, e.name, parts + (e.name,), attr)
        return wire.DirEntry(cookie, attr.ino or 1, stat.S_IFMT(attr.mode) >> 12, name, found)

    def _attrs(self, paths: list[Path]) -> dict[str, Attr]:
        out = {}
        for parts in paths:
            try:
                out[parts[-1]] = self._getattr(parts)
            except FsError:
                continue
        return out

    async def releasedir(self, a: wire.Releasedir, caller: Caller) -> wire.Result:
        if self.handles.pop(a.fh, None) is None:
            raise FsError(errno.EBADF)
        return None

    async def statfs(self, a: wire.Statfs, caller: Caller) -> wire.Result:
        m, _ = self.route(self._parts(self._node(a.node)))
        s = await self._io(m.provider.statfs)
        return wire.StatfsReply(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize)


def _below(parts: Path, root: Path) -> bool:
    return len(parts) > len(root) and parts[: len(root)] == root


_METHODS: dict[type, Callable[..., Any]] = {
    wire.Lookup: Router.lookup, wire.Getattr: Router.getattr, wire.Setattr: Router.setattr,
    wire.Readlink: Router.readlink, wire.Symlink: Router.symlink, wire.Mknod: Router.mknod,
    wire.Mkdir: Router.mkdir, wire.Unlink: Router.unlink, wire.Rmdir: Router.rmdir, wire.Rename: Router.rename,
    wire.Link: Router.link, wire.Open: Router.open, wire.Create: Router.create, wire.Read: Router.read,
    wire.Write: Router.write, wire.Flush: Router.flush, wire.Release: Router.release, wire.Fsync: Router.fsync,
    wire.Opendir: Router.opendir, wire.Readdir: Router.readdir, wire.Releasedir: Router.releasedir,
    wire.Statfs: Router.statfs, wire.OpendirRead: Router.opendir_read, wire.LookupDir: lookup_dir,
}  # fmt: skip
