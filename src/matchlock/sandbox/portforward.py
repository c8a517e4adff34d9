"""Port forwarding: host listeners whose connections reach the guest's loopback.

Each accepted connection is one multiplexed stream to `127.0.0.1:<remote>`
in the guest; bytes are flow-controlled like any other stream, and a
half-close on either side is passed on, so request/response protocols that
signal the end of a request with EOF work.

Every connection task belongs to the PortForwarder's TaskGroup, and each
connection's upload task to a TaskGroup of its own: `aclose()` stops the
listeners, cancels the connections and returns only when all have ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
from dataclasses import dataclass

from ..api.errors import MatchlockError, UsageError
from ..vm.channel import GuestStream
from ..wire import agent as msgs
from ..wire.mux import STDIN, ChannelEnded, DataReceived, StreamReset
from ..wire.replies import OpError, PortForwardReplies, Started

READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class ForwardSpec:
    local_port: int
    remote_port: int

    @classmethod
    def parse(cls, spec: str) -> ForwardSpec:
        local, sep, remote = spec.partition(":")
        if not sep:
            local = remote = spec
        ports = []
        for value in (local, remote):
            if not value.isdigit() or not 1 <= int(value) <= 65535:
                raise UsageError(f"invalid port forward {spec!r}: use [LOCAL:]REMOTE with ports 1-65535")
            ports.append(int(value))
        return cls(*ports)


def parse_addresses(values) -> list[str]:
    addresses: list[str] = []
    for value in values or ["127.0.0.1"]:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item != "localhost":
                try:
                    item = str(ipaddress.ip_address(item))
                except ValueError:
                    raise UsageError(f"invalid --address {item!r}: use an IP address or localhost") from None
            if item not in addresses:
                addresses.append(item)
    return addresses


@dataclass(frozen=True)
class Binding:
    address: str
    local_port: int
    remote_port: int


async def forward_connection(open_stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             remote_port: int) -> None:  # fmt: skip
    """Relay one local connection to the guest's 127.0.0.1:remote_port, until either side ends it."""
    stream: GuestStream = open_stream(msgs.PortForwardRequest(remote_port).to_wire())
    try:
        async with asyncio.TaskGroup() as group:
            await _relay(stream, reader, writer, group)
    except* (OSError, MatchlockError):
        pass  # this connection ends; the listener and the sandbox go on
    finally:
        stream.close()
        writer.close()


async def _relay(stream: GuestStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 group: asyncio.TaskGroup) -> None:  # fmt: skip
    async def upload() -> None:
        while data := await reader.read(READ_SIZE):
            await stream.send(STDIN, data)
        stream.end(STDIN)
        stream.finish_sending()

    uploading = None
    replies = PortForwardReplies()  # the grammar of a port-forward stream, checked on every event
    try:
        while not replies.done:
            outcome = await stream.next_reply(replies)
            if isinstance(outcome, Started):
                uploading = group.create_task(upload())
            elif isinstance(outcome, DataReceived):
                writer.write(outcome.data)
                await writer.drain()
                stream.consumed(len(outcome.data))
            elif isinstance(outcome, ChannelEnded):
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
            elif isinstance(outcome, (OpError, StreamReset)):
                return  # the guest could not connect, or gave up: drop the local connection
    finally:
        if uploading is not None:
            uploading.cancel()  # the guest is done, so is anything left to upload


class PortForwarder:
    """The listeners of one set of forwards and their connections; `aclose()` stops them all."""

    def __init__(self, open_stream) -> None:
        self.open_stream = open_stream
        self.servers: list[asyncio.AbstractServer] = []
        self.bindings: list[Binding] = []
        self._tasks = contextlib.AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._connections: set[asyncio.Task] = set()
        self._closed = False

    async def start(self, specs: list[ForwardSpec], addresses: list[str]) -> list[Binding]:
        self._group = await self._tasks.enter_async_context(asyncio.TaskGroup())
        seen = set()
        try:
            for spec in specs:
                for address in addresses:
                    key = (address, spec.local_port)
                    if key in seen:
                        raise UsageError(f"duplicate listen address {address}:{spec.local_port}")
                    seen.add(key)
                    await self._listen(address, spec)
        except BaseException:
            await self.aclose()
            raise
        return self.bindings

    async def _listen(self, address: str, spec: ForwardSpec) -> None:
        def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The server's own task ends at once; the connection lives in our group.
            if self._closed or self._group is None:
                writer.close()
                return
            task = self._group.create_task(forward_connection(self.open_stream, reader, writer, spec.remote_port))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

        try:
            server = await asyncio.start_server(handle, address, spec.local_port, reuse_address=True)
        except OSError as exc:
            reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise MatchlockError(f"cannot listen on {address}:{spec.local_port}: {reason}") from None
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.servers.append(server)
        self.bindings.append(Binding(address, spec.local_port, spec.remote_port))

    async def aclose(self) -> None:
        """Stop listening and end every connection. Idempotent; it releases even if waiting fails."""
        if self._closed:
            return
        self._closed = True
        try:
            for server in self.servers:
                server.close()
            for task in list(self._connections):
                task.cancel()
            await self._tasks.aclose()  # returns once every connection task has ended
        finally:
            for server in self.servers:
                server.close()
            self.servers.clear()
