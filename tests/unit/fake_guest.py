"""A hand-driven (and often hostile) fake guest for tests of the host end of the agent channel.

The fake guest is a real `wire.mux.Connection(Role.GUEST)` on the other end of a
socketpair; each test drives it step by step. `connected()` and `booted()` give a
host channel and its guest, before and after the handshake, and always close both;
the tests' pytest timeout turns a host that hangs into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from matchlock.vm.channel import GuestChannel
from matchlock.wire import agent as msgs
from matchlock.wire.mux import Connection, HelloReceived, Role, StreamClosed, StreamOpened, WindowOpened
from matchlock.wire.replies import Ready

CONFIG = msgs.GuestConfig(
    hostname="sandbox",
    time_ns=1_700_000_000_123_456_789,
    privileged=False,
    cpus=1.5,
    dns_servers=("10.0.2.3",),
    extra_hosts=(("db", "10.0.0.2"),),
)
GUEST_INFO = {"agent_version": "test", "kernel": "6.1"}


class FakeGuest:
    """The guest end: a sans-IO Connection plus the raw socket, driven by the test."""

    def __init__(self) -> None:
        self.conn = Connection(Role.GUEST)
        self.queue: list = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def attach(self, sock: socket.socket) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=sock)

    async def send_raw(self, data: bytes) -> None:
        assert self.writer is not None, "attach() first"
        self.writer.write(data)
        await self.writer.drain()

    async def reply_and_close(self, sid: int, reply: dict) -> None:
        """The last reply of a stream: send it, close the stream and flush."""
        self.conn.send_message(sid, reply)
        self.conn.close_stream(sid)
        await self.flush()

    async def flush(self) -> None:
        await self.send_raw(self.conn.data_to_send())

    async def _fill(self) -> None:
        assert self.reader is not None, "attach() first"
        data = await self.reader.read(1 << 20)
        if not data:
            raise EOFError("the host closed the channel")
        self.queue += self.conn.receive_data(data)

    async def next_event(self, skip=(WindowOpened,)):
        while True:
            while not self.queue:
                await self._fill()
            event = self.queue.pop(0)
            if not isinstance(event, skip):
                return event

    async def host_closed(self) -> bool:
        """True once the host has closed its end of the socket."""
        try:
            while True:
                await self._fill()
        except (EOFError, ConnectionError):
            return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[tuple[GuestChannel, FakeGuest]]:
    """A started host channel and the fake guest on its other end, no handshake yet."""
    host_sock, guest_sock = socket.socketpair()
    guest = FakeGuest()
    async with GuestChannel(host_sock) as channel:
        await guest.attach(guest_sock)
        try:
            yield channel, guest
        finally:
            guest.close()


async def start_handshake(channel: GuestChannel, guest: FakeGuest, info: dict | None = None) -> asyncio.Task:
    """The host waits in `handshake()`; the guest has sent its HELLO and received the host's."""
    handshake = asyncio.create_task(channel.handshake(CONFIG))
    guest.conn.send_hello(info)
    await guest.flush()
    event = await guest.next_event()
    assert isinstance(event, HelloReceived)
    assert msgs.GuestConfig.parse(event.info) == CONFIG
    return handshake


@contextlib.asynccontextmanager
async def booted() -> AsyncIterator[tuple[GuestChannel, FakeGuest]]:
    """A channel whose handshake is done (the guest reported ready in 42 ms)."""
    async with connected() as (channel, guest):
        handshake = await start_handshake(channel, guest, GUEST_INFO)
        guest.conn.send_message(0, Ready(42).to_wire())
        await guest.flush()
        await handshake
        yield channel, guest


async def accept(guest: FakeGuest, op: str) -> tuple[int, dict]:
    event = await guest.next_event()
    assert isinstance(event, StreamOpened), event
    assert event.request["op"] == op
    if op in ("read_file", "list_files"):
        # Request-only operations half-close together with the request.
        assert await guest.next_event() == StreamClosed(event.stream)
    return event.stream, event.request
