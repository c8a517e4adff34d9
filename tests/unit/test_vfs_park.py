"""Parking the VFS channel: the real guest daemon (Channel, serve_mount, serve_replies) against the real
VfsServer, through a relay that stands in for QEMU's port and can be moved to a new host (a clone)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

import pytest

from matchlock.api.errors import VMError
from matchlock.guest import fuse, fuse_daemon
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.provider import Provider
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.server import VfsServer
from matchlock.vfs.types import Caller
from matchlock.wire import vfs as wire


async def until(predicate, what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


class Relay:
    """The guest's port: bytes copied both ways to whichever host end is attached."""

    def __init__(self, guest_side: socket.socket) -> None:
        self.guest_side = guest_side
        self._tasks: list[asyncio.Task] = []

    def attach(self, host_side: socket.socket) -> None:
        self._tasks = [
            asyncio.create_task(self._copy(self.guest_side, host_side)),
            asyncio.create_task(self._copy(host_side, self.guest_side)),
        ]

    async def detach(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @staticmethod
    async def _copy(source: socket.socket, sink: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(source, 1 << 20):
            await loop.sock_sendall(sink, data)


class Stall:
    """The host's handler of a LOOKUP (or LOOKUP_DIR) of `name` waits until `release` is set."""

    def __init__(self, router: Router, name: bytes) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        original = router.handle

        async def handle(request: wire.Request) -> wire.Result:
            if isinstance(request.args, (wire.Lookup, wire.LookupDir)) and request.args.name == name:
                self.entered.set()
                await self.release.wait()
            return await original(request)

        router.handle = handle  # type: ignore[method-assign]


def _pair(kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Rig:
    """One mount `/m` of `provider`: host server, relay, guest daemon threads and the guest kernel's end."""

    def __init__(self, provider: Provider) -> None:
        self.router = Router([Mount("/m", provider)], Interceptor(None), VfsServer.executor())
        guest, self._guest_relay = _pair()
        self.channel = fuse_daemon.Channel(guest.fileno())
        self._sockets = [guest, self._guest_relay]
        self.relay = Relay(self._guest_relay)
        self.errors: list[BaseException] = []
        self.servers: list[VfsServer] = []
        self.unique = 100

    async def serve(self, restored: bool = False) -> VfsServer:
        """A server on a new host end of the relay (the old one, if any, stays parked)."""
        host, relay_end = _pair()
        self._sockets.append(relay_end)
        server = VfsServer(host, self.router, restored=restored)
        self.servers.append(server)
        await self.relay.detach()
        self.relay.attach(relay_end)
        await server.start()
        return server

    async def start(self, replies: bool = True) -> VfsServer:
        server = await self.serve()
        max_io, ((info, _),) = await asyncio.to_thread(fuse_daemon.handshake, self.channel)
        self.kernel, dev = _pair(socket.SOCK_SEQPACKET)
        self._sockets += [self.kernel, dev]
        dev.setblocking(True)
        self.mount = fuse_daemon.Mount(info, dev.fileno(), max_io, self.channel.features)
        self.notices = fuse_daemon.Notices()  # its thread is not started: the test reads its queue
        self.notices.mounts.append(self.mount)
        self._spawn(fuse_daemon.serve_mount, self.channel, self.mount)
        if replies:
            self.serve_replies()
        return server

    def serve_replies(self) -> None:
        self._spawn(fuse_daemon.serve_replies, self.channel, self.notices)

    def _spawn(self, target, *args) -> None:
        def run() -> None:
            try:
                target(*args)
            except (EOFError, OSError):
                pass
            except BaseException as exc:  # noqa: BLE001 - the test asserts there was none
                self.errors.append(exc)

        threading.Thread(target=run, daemon=True).start()

    async def lookup(self, name: bytes, parent: int = fuse.ROOT_ID) -> int:
        """Send the kernel's LOOKUP; returns its unique."""
        self.unique += 1
        body = name + b"\0"
        header = fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), fuse.LOOKUP, self.unique, parent, 0, 0, 5, 0, 0)
        await asyncio.get_running_loop().sock_sendall(self.kernel, header + body)
        return self.unique

    async def answer(self) -> tuple[int, int, bytes]:
        """The daemon's next reply to the kernel: (unique, error, body)."""
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.kernel, 1 << 20), 10)
        _, err, unique = fuse.OUT_HEADER.unpack_from(data)
        return unique, err, data[fuse.OUT_HEADER.size :]

    async def looked(self) -> tuple[int, int]:
        """The daemon's next LOOKUP reply: (unique, node), node 0 for a negative entry."""
        unique, err, body = await self.answer()
        assert err == 0, err
        return unique, fuse.ENTRY_OUT.unpack_from(body)[0]

    def lookups(self, server: VfsServer) -> int:
        return server.op_counts["LOOKUP"] + server.op_counts["LOOKUP_DIR"]

    async def close(self) -> None:
        await self.relay.detach()
        for server in self.servers:
            await server.aclose()
        for sock in self._sockets:
            sock.close()
        assert self.errors == []


def _memory(*names: str) -> MemoryProvider:
    provider = MemoryProvider()
    for name in names:
        provider.create((name,), os.O_RDWR, 0o644, Caller())[0].close()
    return provider


async def test_requests_in_flight_are_answered_before_parked_and_later_ones_wait_for_the_wake() -> None:
    rig = Rig(_memory("a"))
    server = await rig.start()
    try:
        stall = Stall(rig.router, b"slow")
        slow = await rig.lookup(b"slow")
        await stall.entered.wait()
        park = asyncio.create_task(server.park(10))
        await until(lambda: rig.channel.parking, "the guest parking")
        handled = threading.Event()
        translate = rig.mount.translator.handle

        def handle(data):
            try:
                return translate(data)
            finally:
                handled.set()

        rig.mount.translator.handle = handle  # type: ignore[method-assign]
        later = await rig.lookup(b"later")
        await until(handled.is_set, "the mount thread reading the request")
        assert rig.lookups(server) == 1 and not park.done()  # PARKED waits for the reply in flight
        stall.release.set()
        await park
        assert await rig.looked() == (slow, 0)  # answered before PARKED
        assert rig.channel.parked and rig.channel.pending == {}
        await asyncio.sleep(0.05)
        assert rig.lookups(server) == 1  # the one read while parked is held in the guest
        server.wake()
        assert await rig.looked() == (later, 0)
        assert rig.lookups(server) == 2 and not rig.channel.parking
    finally:
        await rig.close()


async def test_a_same_host_wake_goes_on_and_parks_again() -> None:
    rig = Rig(_memory("a"))
    server = await rig.start()
    try:
        await server.park(10)
        server.wake()
        unique = await rig.lookup(b"a")
        got, node = await rig.looked()
        assert got == unique and node > 1
        await server.park(10)
        with pytest.raises(VMError, match="parked already"):
            await server.park(10)
        server.wake()
        with pytest.raises(VMError, match="not parked"):
            server.wake()
        unique = await rig.lookup(b"missing")
        assert await rig.looked() == (unique, 0)
    finally:
        await rig.close()


async def test_host_notices_are_held_while_parked_and_sent_after_the_wake(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"old")
    rig = Rig(HostFSProvider(str(tmp_path)))
    server = await rig.start()
    try:
        await asyncio.wait_for(rig.router.notifier.settled(), 10)
        unique = await rig.lookup(b"f")
        got, err, body = await rig.answer()
        assert (got, err) == (unique, 0)
        node = fuse.ENTRY_OUT.unpack_from(body)[0]
        await server.park(10)
        sent = rig.router.notifier.sent
        (tmp_path / "f").write_bytes(b"changed on the host")
        await until(lambda: rig.router.notifier.sent > sent, "the watch noticing the change")
        await asyncio.sleep(0.05)
        assert rig.notices._queue == [] and rig.errors == []  # held: nothing reached the parked guest
        server.wake()
        await until(lambda: rig.notices._queue, "the held notices arriving")
        assert (wire.INVAL_INODE, node, b"") in rig.notices._queue
    finally:
        await rig.close()


async def test_a_new_host_wake_resets_the_daemons_caches_and_gives_held_lookups_back() -> None:
    rig = Rig(_memory("a", "b", "c"))
    old = await rig.start()
    try:
        unique = await rig.lookup(b"a")  # a LOOKUP_DIR: b and c come with the listing, held for it
        assert (await rig.answer())[:2] == (unique, 0)
        held = dict(rig.mount.translator.cache._held)
        assert old.op_counts["LOOKUP_DIR"] == 1 and len(held) == 2
        unique = await rig.lookup(b"nope")  # known absent from the listing: answered in the guest
        assert await rig.looked() == (unique, 0)  # a negative entry
        before = rig.lookups(old)
        assert before == 1
        await old.park(10)
        # The clone's new host, with the snapshot's node table (here: the same router).
        new = await rig.serve(restored=True)
        assert new.features == old.features
        await until(lambda: new.op_counts["FORGET"], "the held lookups given back to the new host")
        await until(lambda: all(n not in rig.router.nodes for n in held), "the new host dropping them")
        await until(lambda: not rig.channel.parking, "the wake")
        assert (wire.INVAL_INODE, rig.mount.info.root, b"") in rig.notices._queue  # the new host's notices
        unique = await rig.lookup(b"nope")  # nothing cached from the old host answers it now
        assert await rig.looked() == (unique, 0)  # the host's own answer
        assert rig.lookups(new) == 1 and rig.lookups(old) == before
    finally:
        await rig.close()


async def test_a_park_the_guest_does_not_answer_in_time_raises_and_the_guest_goes_on() -> None:
    rig = Rig(_memory("a"))
    server = await rig.start()
    try:
        stall = Stall(rig.router, b"slow")
        slow = await rig.lookup(b"slow")
        await stall.entered.wait()
        with pytest.raises(VMError, match="did not park within 0.2 s"):
            await server.park(0.2)
        stall.release.set()
        assert await rig.looked() == (slow, 0)
        await until(lambda: not rig.channel.parking, "the guest waking")
        unique = await rig.lookup(b"a")
        assert (await rig.answer())[:2] == (unique, 0)
        await server.park(10)  # and a later park works
        server.wake()
    finally:
        await rig.close()


async def test_a_guest_reading_nothing_during_the_park_wakes_from_the_hosts_give_up() -> None:
    rig = Rig(_memory("a"))
    server = await rig.start(replies=False)
    try:
        with pytest.raises(VMError, match="did not park"):
            await server.park(0.1)
        rig.serve_replies()  # reads PARK and the wake behind it at once
        unique = await rig.lookup(b"a")
        assert (await rig.answer())[:2] == (unique, 0)
        assert not rig.channel.parking and not rig.channel.parked
        assert server.broken == ""
    finally:
        await rig.close()
