"""The guest's end of a VFS server's socket for the server tests: encoded requests out, replies matched by id."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator

from matchlock.api.vfs import VFSInterceptionConfig
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.server import VfsServer
from matchlock.vfs.types import Limits
from matchlock.wire import vfs as wire


class Peer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = wire.ReplyDecoder()
        self.replies: dict[int, wire.Reply] = {}
        self.notices: list[wire.Reply] = []  # every frame with id 0 (notices, wake records), in port order
        self._ids = itertools.count(1)

    async def send(self, request_id: int, args: wire.Args, uid: int = 0) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, wire.encode_request(request_id, uid, uid, 1, args))

    async def reply(self, request_id: int) -> wire.Reply:
        while request_id not in self.replies:
            data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 20)
            assert data, "the server closed the channel"
            for reply in self.decoder.feed(data):
                self.replies[reply.id] = reply
                if reply.id == wire.NOTICE_ID:
                    self.notices.append(reply)
        return self.replies.pop(request_id)

    async def call(self, args: wire.Args, uid: int = 0) -> wire.Reply:
        """One request with the next id, and its reply."""
        request_id = next(self._ids)
        await self.send(request_id, args, uid)
        return await self.reply(request_id)

    async def ok(self, args: wire.Args, uid: int = 0) -> bytes:
        reply = await self.call(args, uid)
        assert reply.status == 0, (args, reply.status)
        return reply.payload


@contextlib.asynccontextmanager
async def serving(
    mounts: list[Mount],
    features: int = wire.FEATURES_ALL,
    interception: VFSInterceptionConfig | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[tuple[Peer, VfsServer, wire.HelloReply]]:
    """A server of `mounts` after the guest's HELLO offering `features`: the guest's end, the server, its HELLO reply."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    router = Router(mounts, Interceptor(interception, lambda _: None), VfsServer.executor(), limits)
    server = VfsServer(theirs, router)
    await server.start()
    guest = Peer(ours)
    try:
        hello = wire.decode_result(wire.Op.HELLO, await guest.ok(wire.Hello(wire.VERSION, 1 << 20, features)))
        assert isinstance(hello, wire.HelloReply)
        yield guest, server, hello
    finally:
        await server.aclose()
        ours.close()
