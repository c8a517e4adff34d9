"""A hand-driven (and often hostile) fake guest for tests of the host end of the agent channel.

The fake guest is a real `wire.mux.Connection(Role.GUEST)` on the other end of a
socketpair; each test drives it step by step. Every scenario runs under
`asyncio.wait_for` (`run`) so a host that hangs fails the test instead of the suite.
"""

from __future__ import annotations

import asyncio
import socket

from matchlock.vm.channel import GuestChannel
from matchlock.wire import agent as msgs
from matchlock.wire.mux import Connection, HelloReceived, Role, StreamClosed, StreamOpened, WindowOpened

HANG = 10.0  # seconds: a hang detector, not a performance assertion
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
        self.writer.write(data)
        await self.writer.drain()

    async def flush(self) -> None:
        await self.send_raw(self.conn.data_to_send())

    async def _fill(self) -> None:
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


def run(coro_fn, timeout: float = HANG):
    async def main():
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(main())


async def connect() -> tuple[GuestChannel, FakeGuest]:
    host_sock, guest_sock = socket.socketpair()
    channel = GuestChannel(host_sock)
    await channel.start()
    guest = FakeGuest()
    await guest.attach(guest_sock)
    return channel, guest


async def boot() -> tuple[GuestChannel, FakeGuest]:
    channel, guest = await connect()
    handshake = asyncio.create_task(channel.handshake(CONFIG))
    guest.conn.send_hello(GUEST_INFO)
    await guest.flush()
    event = await guest.next_event()
    assert isinstance(event, HelloReceived)
    assert msgs.GuestConfig.parse(event.info) == CONFIG
    guest.conn.send_message(0, {"type": msgs.EVENT_READY, "boot_ms": 42})
    await guest.flush()
    await handshake
    return channel, guest


async def shutdown(channel: GuestChannel, guest: FakeGuest) -> None:
    await channel.close()
    guest.close()


async def accept(guest: FakeGuest, op: str) -> tuple[int, dict]:
    event = await guest.next_event()
    assert isinstance(event, StreamOpened), event
    assert event.request["op"] == op
    if op in ("read_file", "list_files"):
        # Request-only operations half-close together with the request.
        assert await guest.next_event() == StreamClosed(event.stream)
    return event.stream, event.request
