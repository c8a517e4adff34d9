"""The one client of a sandbox's exec relay: blocking (`exec`, `allow-list`) and asyncio (`port-forward`).

Both variants frame requests with the typed actions of `relay_protocol` and
read replies through its sans-IO `ReplyReader`, so no caller parses frames
or JSON. Failures reach the caller as `MatchlockError`s that say what went
wrong (a relay that breaks the protocol, a connection that dropped), never
as tracebacks. `matchlock exec` runs this on every call: the blocking side
imports nothing heavy, and asyncio only when the asyncio variant is used.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..api.errors import MatchlockError, UsageError
from ..api.paths import find_vm_dir
from . import relay_protocol as rp

if TYPE_CHECKING:
    import asyncio

READ_SIZE = 64 * 1024


def _protocol_error(exc: rp.RelayProtocolError) -> MatchlockError:
    return MatchlockError(f"the sandbox broke the relay protocol: {exc}")


def _feed(replies: rp.ReplyReader, data: bytes) -> list[rp.Reply]:
    """The replies that `data` completes; a malformed one is a MatchlockError."""
    try:
        return replies.feed(data)
    except rp.RelayProtocolError as exc:
        raise _protocol_error(exc) from None


def unreachable(vm_id: str) -> MatchlockError:
    """Why the relay of `vm_id` cannot be reached, from the state database (only on this slow path)."""
    from ..state.store import OWNER_RUNNING, StateStore

    store = StateStore()
    try:
        vm = store.require(vm_id)
    finally:
        store.close()
    if vm.status != OWNER_RUNNING:
        return MatchlockError(f"VM {vm.id} is not running (status: {vm.status})")
    return MatchlockError(f"VM {vm.id} is still starting or stopping: its exec relay is not up; try again shortly")


def connect(vm_id: str) -> RelayConnection:
    """Connect to the relay of the sandbox `vm_id` names (an ID or a unique prefix of one)."""
    paths = find_vm_dir(vm_id)
    if paths is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(paths.exec_socket))
            return RelayConnection(sock)
        except OSError:
            sock.close()
    raise unreachable(vm_id)


class RelayConnection:
    """A blocking connection. `send` may be called from several threads (stdin, SIGWINCH)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._replies = rp.ReplyReader()

    def send(self, frame: bytes) -> None:
        """Best effort: once the sandbox has hung up, `receive` reports it."""
        with self._lock, contextlib.suppress(OSError):
            self.sock.sendall(frame)

    def receive(self) -> list[rp.Reply]:
        """The next replies; [] once the sandbox has closed the connection."""
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except OSError as exc:
                raise MatchlockError(f"lost the connection to the sandbox: {exc}") from None
            if not data:
                return []
            if replies := _feed(self._replies, data):
                return replies

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RelayConnection:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def change_allow_list(vm_id: str, hosts: Sequence[str], *, add: bool) -> rp.AllowListReply:
    with connect(vm_id) as relay:
        relay.send(rp.AllowListAction(tuple(hosts), add).encode())
        replies = relay.receive()
    if not replies:
        raise MatchlockError(f"sandbox {vm_id} closed the connection")
    reply = replies[0]
    if isinstance(reply, rp.AllowListReply | rp.ExecReply) and reply.error:
        raise MatchlockError(reply.error)
    if not isinstance(reply, rp.AllowListReply):
        raise _protocol_error(rp.RelayProtocolError(f"an allow-list change was answered with {reply!r}"))
    return reply


def control(vm_id: str, action: str, *, name: str = "", mode: str = "") -> dict:
    """Pause, resume or snapshot the sandbox through its owner; returns the owner's result."""
    with connect(vm_id) as relay:
        relay.send(rp.ControlAction(action, name, mode).encode())
        replies = relay.receive()
    if not replies:
        raise MatchlockError(f"sandbox {vm_id} closed the connection")
    reply = replies[0]
    if isinstance(reply, rp.ControlReply) and reply.usage:
        raise UsageError(reply.error)  # exit 2, as when the CLI finds the same problem itself
    if isinstance(reply, rp.ControlReply | rp.ExecReply) and reply.error:
        raise MatchlockError(reply.error)
    if not isinstance(reply, rp.ControlReply):
        raise _protocol_error(rp.RelayProtocolError(f"a control request was answered with {reply!r}"))
    return reply.result or {}


class AsyncRelayConnection:
    """An asyncio connection (port forwarding opens one per tunnelled connection)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._replies = rp.ReplyReader()

    @classmethod
    async def open(cls, path: Path) -> AsyncRelayConnection:
        import asyncio  # here, not at the top: the blocking clients (every `exec`) must not pay for it

        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError as exc:
            raise MatchlockError(f"cannot reach the sandbox's exec relay at {path}: {exc.strerror}") from None
        return cls(reader, writer)

    async def send(self, frame: bytes) -> None:
        self._writer.write(frame)
        await self._writer.drain()

    async def receive(self) -> list[rp.Reply]:
        """The next replies; [] once the sandbox has closed the connection."""
        while True:
            data = await self._reader.read(READ_SIZE)
            if not data:
                return []
            if replies := _feed(self._replies, data):
                return replies

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
