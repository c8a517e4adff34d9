"""A minimal asyncio QMP client (QEMU Machine Protocol) over an inherited socket."""

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
        self._pending: dict[int, asyncio.Future] = {}
        self._reader_task: asyncio.Task | None = None
        self.events: list[dict] = []
        self.greeting: dict | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock)
        line = await self._reader.readline()
        if not line:
            raise QMPError("QEMU closed the QMP socket before its greeting")
        self.greeting = json.loads(line)
        self._reader_task = asyncio.create_task(self._read_loop())
        await self.execute("qmp_capabilities")

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "event" in message:
                    self.events.append(message)
                    continue
                future = self._pending.pop(message.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (ConnectionError, ValueError):
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(QMPError("QEMU closed the QMP connection"))
            self._pending.clear()

    async def execute(self, command: str, **arguments) -> dict:
        if self._writer is None or (self._reader_task is not None and self._reader_task.done()):
            raise QMPError("QMP is not connected")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        request: dict = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        reply = await future
        if "error" in reply:
            raise QMPError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return", {})

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
