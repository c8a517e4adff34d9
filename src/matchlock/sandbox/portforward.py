"""Port forwarding: host listeners whose connections reach the guest's loopback.

Each accepted connection is one multiplexed stream to `127.0.0.1:<remote>`
in the guest; bytes are flow-controlled like any other stream, and a
half-close on either side is passed on, so request/response protocols that
signal the end of a request with EOF work.
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
from ..wire.mux import STDIN, STDOUT, ChannelEnded, DataReceived, MessageReceived, StreamClosed, StreamReset

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
    """Relay one local connection to the guest's 127.0.0.1:remote_port."""
    stream: GuestStream = open_stream(msgs.PortForwardRequest(remote_port).to_wire())

    async def upload() -> None:
        while data := await reader.read(READ_SIZE):
            await stream.send(STDIN, data)
        stream.end(STDIN)
        stream.finish_sending()

    uploading = None
    try:
        while True:
            event = await stream.next_event()
            if isinstance(event, MessageReceived):
                kind = event.message.get("type")
                if kind == msgs.REPLY_STARTED and uploading is None:
                    uploading = asyncio.ensure_future(upload())
                elif kind == msgs.REPLY_ERROR:
                    return
            elif isinstance(event, DataReceived) and event.channel == STDOUT:
                writer.write(event.data)
                await writer.drain()
                stream.consumed(len(event.data))
            elif isinstance(event, ChannelEnded) and event.channel == STDOUT:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
            elif isinstance(event, (StreamClosed, StreamReset)):
                return
    except (ConnectionError, MatchlockError):
        pass
    finally:
        if uploading is not None and not uploading.done():
            uploading.cancel()
        stream.close()
        writer.close()


class PortForwarder:
    """The listeners of one set of forwards; `close()` stops them all."""

    def __init__(self, open_stream) -> None:
        self.open_stream = open_stream
        self.servers: list[asyncio.AbstractServer] = []
        self.bindings: list[Binding] = []
        self._connections: set[asyncio.Task] = set()

    async def start(self, specs: list[ForwardSpec], addresses: list[str]) -> list[Binding]:
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
            await self.close()
            raise
        return self.bindings

    async def _listen(self, address: str, spec: ForwardSpec) -> None:
        async def handle(reader, writer) -> None:
            task = asyncio.current_task()
            self._connections.add(task)
            try:
                await forward_connection(self.open_stream, reader, writer, spec.remote_port)
            finally:
                self._connections.discard(task)

        try:
            server = await asyncio.start_server(handle, address, spec.local_port, reuse_address=True)
        except OSError as exc:
            reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise MatchlockError(f"cannot listen on {address}:{spec.local_port}: {reason}") from None
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.servers.append(server)
        self.bindings.append(Binding(address, spec.local_port, spec.remote_port))

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        self.servers.clear()
