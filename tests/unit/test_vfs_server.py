"""The VFS server over a socketpair, driven by the wire codec as the guest daemon drives it."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
from pathlib import Path

from vfs_peer import Peer

from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.server import VfsServer
from matchlock.wire import vfs as wire


async def _serving(tmp_path: Path):
    (tmp_path / "f.txt").write_bytes(b"x" * 100_000)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    router = Router([Mount("/w", HostFSProvider(str(tmp_path)))], Interceptor(None), VfsServer.executor())
    server = VfsServer(theirs, router)
    await server.start()
    return server, Peer(ours)


async def test_hello_then_pipelined_requests(tmp_path: Path) -> None:
    server, peer = await _serving(tmp_path)
    try:
        await peer.send(1, wire.Hello(wire.VERSION, 128 * 1024))
        hello = wire.decode_result(wire.Op.HELLO, (await peer.reply(1)).payload)
        assert isinstance(hello, wire.HelloReply) and hello.max_io == 128 * 1024
        root = hello.mounts[0].root
        assert hello.mounts[0].path == "/w"
        await peer.send(2, wire.Lookup(root, b"f.txt"))
        entry = wire.decode_result(wire.Op.LOOKUP, (await peer.reply(2)).payload)
        assert isinstance(entry, wire.Entry) and entry.attr.size == 100_000
        await peer.send(3, wire.Open(entry.node, os.O_RDONLY))
        opened = wire.decode_result(wire.Op.OPEN, (await peer.reply(3)).payload)
        assert isinstance(opened, wire.Opened)
        # Many reads in flight at once; each reply is matched by its id.
        for n in range(10):
            await peer.send(10 + n, wire.Read(entry.node, opened.fh, n * 10_000, 10_000))
        for n in range(10):
            assert len((await peer.reply(10 + n)).payload) == 10_000
        await peer.send(30, wire.Lookup(root, b"missing"))
        assert (await peer.reply(30)).status == -errno.ENOENT
        # A RELEASE with id 0 is a notice: the handle goes, and no reply comes (the next one is 31's).
        await peer.send(0, wire.Release(entry.node, opened.fh))
        await peer.send(31, wire.Read(entry.node, opened.fh, 0, 10))
        assert (await peer.reply(31)).status == -errno.EBADF
        assert list(peer.replies) == []
    finally:
        await server.aclose()
        peer.sock.close()


async def test_a_protocol_violation_ends_the_server(tmp_path: Path) -> None:
    server, peer = await _serving(tmp_path)
    try:
        payload = json.dumps({"version": 1, "max_io": 4096}).encode()
        # A frame that claims more than the protocol allows: refused before anything is buffered.
        bogus = wire.REQUEST_HEADER.pack(wire.MAX_PAYLOAD + 1, 1, wire.Op.HELLO, 0, 0, 0) + payload
        await asyncio.get_running_loop().sock_sendall(peer.sock, bogus)
        async with asyncio.timeout(10):
            await server.wait()
        assert "exceeds" in server.broken
        # It hangs up, so the guest's daemon reads EOF and its mounts fail at once (ENOTCONN).
        async with asyncio.timeout(10):
            assert await asyncio.get_running_loop().sock_recv(peer.sock, 4096) == b""
    finally:
        await server.aclose()
        peer.sock.close()
