"""A minimal asyncio QMP client (QEMU Machine Protocol) over an inherited socket.

Commands run one at a time: `execute` writes a command and reads until its
reply, skipping the asynchronous events QEMU interleaves (nobody here needs
them, and keeping them would grow memory for the VM's whole life). There is
no background reader, so nothing outlives the client.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket

from ..api.errors import VMError


class QMPError(VMError):
    pass


class QMPClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.greeting: dict | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self.greeting = await self._read_message()
        await self.execute("qmp_capabilities")

    async def _read_message(self) -> dict:
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except (ConnectionError, ValueError) as exc:  # ValueError: a line over the reader's limit
            raise QMPError(f"QMP connection failed: {exc}") from None
        if not line:
            raise QMPError("QEMU closed the QMP connection")
        try:
            message = json.loads(line)
        except ValueError:
            raise QMPError(f"QEMU sent a malformed QMP message: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise QMPError(f"QEMU sent a QMP message that is not an object: {line[:200]!r}")
        return message

    async def execute(self, command: str, **arguments) -> dict:
        return await self._call(command, arguments)

    async def send_fd(self, name: str, fd: int) -> None:
        """`getfd`: give QEMU a copy of `fd` (SCM_RIGHTS on this socket), known as `name` to later commands."""
        await self._call("getfd", {"fdname": name}, fd=fd)

    async def add_fd(self, fd: int) -> int:
        """`add-fd`: give QEMU a copy of `fd` in a new fd set; returns its id (a file name for QEMU is
        `/dev/fdset/ID`, which QEMU opens as a copy of `fd` when the access modes match)."""
        return int((await self._call("add-fd", {}, fd=fd))["fdset-id"])

    async def _call(self, command: str, arguments: dict, *, fd: int | None = None) -> dict:
        if self._writer is None or self._writer.is_closing():
            raise QMPError("QMP is not connected")
        request_id = next(self._ids)
        request: dict = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        data = json.dumps(request).encode() + b"\n"
        async with self._lock:
            try:
                if fd is None:
                    self._writer.write(data)
                    await self._writer.drain()
                elif self._writer.transport.get_write_buffer_size():
                    raise QMPError(f"QMP {command}: earlier output is still queued; cannot attach a descriptor")
                else:
                    # The descriptor must travel with the command's own bytes, so bypass the stream. Every
                    # earlier command was answered, so nothing is queued and a short message fits at once.
                    if socket.send_fds(self._sock, [data], [fd]) != len(data):
                        raise QMPError(f"QMP {command}: the command was cut short")
            except (ConnectionError, BlockingIOError) as exc:
                raise QMPError(f"QMP connection failed: {exc}") from None
            while True:
                reply = await self._read_message()
                if reply.get("id") == request_id:
                    break  # anything else is an event (or the reply to a cancelled command)
        if "error" in reply:
            raise QMPError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return", {})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
