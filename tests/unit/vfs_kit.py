"""A guest-side stand-in for the VFS tests: sends `wire.vfs` requests to a Router and unwraps the replies."""

from __future__ import annotations

import errno
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

from matchlock.api.events import FileEvent
from matchlock.api.vfs import VFSInterceptionConfig
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.types import FsError, Limits
from matchlock.wire import vfs as wire

RW = os.O_RDWR


class Guest:
    """What the guest kernel would send, by path; node ids are looked up on the way, as the kernel does."""

    def __init__(
        self,
        mounts: list[Mount],
        interception: VFSInterceptionConfig | None = None,
        limits: Limits | None = None,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        self.events: list[FileEvent] = []
        self.router = Router(mounts, Interceptor(interception, self.events.append), ThreadPoolExecutor(4), limits)
        self.roots = {m.path: m.root for m in self.router.hello()}
        self.uid, self.gid = uid, gid
        self._ids = itertools.count(1)

    async def call(self, args: wire.Args) -> wire.Result:
        request = wire.Request(next(self._ids), args._op, self.uid, self.gid, 1, args)
        return await self.router.handle(request)

    async def errno_of(self, args: wire.Args) -> int:
        try:
            await self.call(args)
        except FsError as exc:
            return exc.errno
        return 0

    async def node(self, path: str) -> int:
        """The node of a guest path: the longest listed root, then a LOOKUP per component."""
        root = max((r for r in self.roots if path == r or path.startswith(r + "/")), key=len)
        node = self.roots[root]
        for name in path[len(root) :].strip("/").split("/"):
            if name:
                entry = await self.call(wire.Lookup(node, name.encode()))
                assert isinstance(entry, wire.Entry)
                node = entry.node
        return node

    async def parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return await self.node(head), name.encode()

    async def stat(self, path: str) -> wire.Attr:
        reply = await self.call(wire.Getattr(await self.node(path), 0))
        assert isinstance(reply, wire.AttrReply)
        return reply.attr

    async def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        parent, name = await self.parent(path)
        try:
            created = await self.call(wire.Create(parent, RW, mode, name))
            assert isinstance(created, wire.Created)
            node, fh = created.entry.node, created.fh
        except FsError as exc:
            if exc.errno != errno.EEXIST:
                raise
            node = await self.node(path)
            opened = await self.call(wire.Open(node, RW | os.O_TRUNC))
            assert isinstance(opened, wire.Opened)
            fh = opened.fh
        written = await self.call(wire.Write(node, fh, 0, RW, data))
        assert written == wire.Written(len(data))
        await self.call(wire.Release(node, fh))

    async def read(self, path: str, size: int = 1 << 20) -> bytes:
        node = await self.node(path)
        opened = await self.call(wire.Open(node, os.O_RDONLY))
        assert isinstance(opened, wire.Opened)
        data = await self.call(wire.Read(node, opened.fh, 0, size))
        await self.call(wire.Release(node, opened.fh))
        assert isinstance(data, bytes)
        return data

    async def listdir(self, path: str, plus: bool = False) -> list[str]:
        node = await self.node(path)
        opened = await self.call(wire.Opendir(node, 0))
        assert isinstance(opened, wire.Opened)
        names, offset = [], 0
        while True:
            page = await self.call(wire.Readdir(node, opened.fh, offset, 4096, int(plus)))
            assert isinstance(page, tuple)
            if not page:
                break
            names += [e.name.decode() for e in page]
            offset = page[-1].offset
        await self.call(wire.Releasedir(node, opened.fh))
        return sorted(n for n in names if n not in (".", ".."))

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = await self.parent(path)
        await self.call(wire.Mkdir(parent, mode, name))

    async def unlink(self, path: str) -> None:
        parent, name = await self.parent(path)
        await self.call(wire.Unlink(parent, name))

    async def rmdir(self, path: str) -> None:
        parent, name = await self.parent(path)
        await self.call(wire.Rmdir(parent, name))

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        parent, name = await self.parent(old)
        newparent, newname = await self.parent(new)
        await self.call(wire.Rename(parent, newparent, flags, name, newname))

    async def symlink(self, path: str, target: str) -> None:
        parent, name = await self.parent(path)
        await self.call(wire.Symlink(parent, name, target.encode()))

    async def chmod(self, path: str, mode: int) -> None:
        await self.call(wire.Setattr(await self.node(path), wire.SET_MODE, 0, 0, 0, 0, mode, 0, 0))

    async def truncate(self, path: str, size: int) -> None:
        await self.call(wire.Setattr(await self.node(path), wire.SET_SIZE, 0, size, 0, 0, 0, 0, 0))

    def close(self) -> None:
        self.router.executor.shutdown(wait=True)
        self.router.close()
