"""The exec relay server: `<vmdir>/exec.sock`, served by the sandbox's owner.

Every connection is validated frame by frame. A client that sends garbage,
an oversized frame or an unknown operation gets an error result and is
disconnected; other connections and the sandbox carry on. When a client of
a buffered or piped exec disconnects, or a terminal client hangs up, the
command is cancelled (SIGTERM, then SIGKILL after the grace period), so no
process is left running for a client that is gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
from pathlib import Path

from ..api.errors import MatchlockError
from ..wire.agent import TerminalSize
from . import relay_protocol as rp
from .sandbox import ExecSpec, Sandbox

READ_SIZE = 64 * 1024


class RelayRequestError(Exception):
    pass


def parse_exec_request(payload: bytes, *, interactive: bool) -> tuple[ExecSpec, TerminalSize | None]:
    try:
        request = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RelayRequestError(f"malformed request: {exc}") from None
    if not isinstance(request, dict):
        raise RelayRequestError("the request must be a JSON object")
    command = request.get("command")
    if not isinstance(command, str) or not command:
        raise RelayRequestError("'command' is required")
    working_dir, user = request.get("working_dir") or "", request.get("user") or ""
    if not isinstance(working_dir, str) or not isinstance(user, str):
        raise RelayRequestError("'working_dir' and 'user' must be strings")
    if working_dir and not working_dir.startswith("/"):
        raise RelayRequestError(f"working_dir {working_dir!r} must be an absolute path")
    size = None
    if interactive:
        rows, cols = request.get("rows") or 24, request.get("cols") or 80
        if not all(isinstance(v, int) and 0 < v < 65536 for v in (rows, cols)):
            raise RelayRequestError(f"invalid terminal size {rows!r}x{cols!r}")
        size = TerminalSize(rows, cols)
    return ExecSpec(command, working_dir=working_dir, user=user), size


class ExecRelay:
    def __init__(self, sandbox: Sandbox, path: Path) -> None:
        self.sandbox = sandbox
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=10)
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection = _Connection(self.sandbox, reader, writer)
        try:
            await connection.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()


class _Connection:
    def __init__(self, sandbox: Sandbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sandbox = sandbox
        self.reader = reader
        self.writer = writer
        self.decoder = rp.Decoder(rp.REQUEST_TYPES | rp.CLIENT_STREAM_TYPES)
        self.frames: list[tuple[int, bytes]] = []

    async def send(self, kind: int, payload: bytes = b"") -> None:
        self.writer.write(rp.encode(kind, payload))
        await self.writer.drain()

    async def fail(self, message: str) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send(rp.EXEC_RESULT, json.dumps({"exit_code": 1, "error": message}).encode())

    async def next_frame(self) -> tuple[int, bytes] | None:
        while not self.frames:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return None
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def run(self) -> None:
        try:
            frame = await self.next_frame()
        except rp.RelayProtocolError as exc:
            await self.fail(str(exc))
            return
        if frame is None:
            return
        kind, payload = frame
        try:
            if kind == rp.EXEC:
                await self._buffered(payload)
            elif kind in (rp.EXEC_PIPE, rp.EXEC_INTERACTIVE):
                await self._streaming(payload, interactive=kind == rp.EXEC_INTERACTIVE)
            elif kind in (rp.ALLOW_LIST_ADD, rp.ALLOW_LIST_DELETE):
                await self._allow_list(payload, add=kind == rp.ALLOW_LIST_ADD)
            elif kind == rp.PORT_FORWARD:
                await self._port_forward(payload)
            else:
                await self.fail(f"relay frame type {kind} cannot start an operation")
        except (RelayRequestError, rp.RelayProtocolError) as exc:
            await self.fail(str(exc))
        except MatchlockError as exc:
            await self.fail(str(exc))

    async def _allow_list(self, payload: bytes, *, add: bool) -> None:
        network = self.sandbox.network
        if network is None or not network.policy.intercepting:
            reply = {"error": "allow-list updates unavailable: sandbox was started without network interception"}
        else:
            try:
                request = json.loads(payload)
                hosts = request.get("hosts") if isinstance(request, dict) else None
                if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
                    raise RelayRequestError("'hosts' must be a non-empty list of strings")
                policy = network.policy
                changed = policy.add_hosts(hosts) if add else policy.remove_hosts(hosts)
                reply = {"added" if add else "removed": changed, "allowed_hosts": policy.allowed_hosts}
            except (ValueError, MatchlockError) as exc:
                reply = {"error": str(exc)}
        await self.send(rp.ALLOW_LIST_RESULT, json.dumps(reply).encode())

    async def _port_forward(self, payload: bytes) -> None:
        """Type 9: this connection becomes a tunnel to the guest's 127.0.0.1:<remote_port>."""
        try:
            request = json.loads(payload)
            port = request.get("remote_port") if isinstance(request, dict) else None
        except ValueError:
            port = None
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise RelayRequestError("'remote_port' must be a port number (1-65535)")
        from .portforward import forward_connection  # only tunnels pay for it

        local_reader, remote_writer = asyncio.StreamReader(), _FrameWriter(self)
        pump = asyncio.ensure_future(self._tunnel_input(local_reader))
        try:
            await forward_connection(self.sandbox.open_stream, local_reader, remote_writer, port)
        finally:
            pump.cancel()
        with contextlib.suppress(ConnectionError):
            await self.send(rp.EXIT, rp.pack_exit(0))

    async def _tunnel_input(self, sink: asyncio.StreamReader) -> None:
        while True:
            frame = await self.next_frame()
            if frame is None or (frame[0] == rp.STDIN and not frame[1]):
                sink.feed_eof()
                return
            if frame[0] != rp.STDIN:
                raise rp.RelayProtocolError(f"unexpected relay frame type {frame[0]} in a tunnel")
            sink.feed_data(frame[1])

    async def _buffered(self, payload: bytes) -> None:
        spec, _ = parse_exec_request(payload, interactive=False)
        out, err = bytearray(), bytearray()
        process = self.sandbox.start_exec(spec, on_stdout=out.extend, on_stderr=err.extend)
        waiter = asyncio.ensure_future(process.wait())
        hangup = asyncio.ensure_future(self._until_disconnect())
        done, _ = await asyncio.wait({waiter, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            process.cancel()  # the client went away: nobody wants this command any more
            await waiter
            return
        hangup.cancel()
        result = waiter.result()
        reply = {
            "exit_code": result.exit_code,
            "stdout": base64.b64encode(bytes(out)).decode(),
            "stderr": base64.b64encode(bytes(err)).decode(),
        }
        if result.error:
            reply["error"] = result.error
        await self.send(rp.EXEC_RESULT, json.dumps(reply).encode())

    async def _until_disconnect(self) -> None:
        """Read and ignore anything until the client disconnects (buffered mode takes no input)."""
        while await self.next_frame() is not None:
            pass

    async def _streaming(self, payload: bytes, *, interactive: bool) -> None:
        spec, size = parse_exec_request(payload, interactive=interactive)
        process = self.sandbox.start_exec(
            spec,
            on_stdout=lambda data: self.send(rp.STDOUT, data),
            on_stderr=None if interactive else (lambda data: self.send(rp.STDERR, data)),
            stdin=True,
            tty=size,
        )
        waiter = asyncio.ensure_future(process.wait())
        pump = asyncio.ensure_future(self._client_input(process, interactive))
        done, _ = await asyncio.wait({waiter, pump}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            # The client disconnected or broke the protocol: end the command.
            if interactive:
                process.send_signal(signal.SIGHUP)  # what a terminal does when it hangs up
            process.cancel()
            result = await waiter
            if pump.exception() is not None:
                await self.fail(str(pump.exception()))
                return
        else:
            pump.cancel()
            result = waiter.result()
        if result.error:
            with contextlib.suppress(ConnectionError):
                await self.send(rp.STDERR, f"Error: {result.error}\n".encode())
        with contextlib.suppress(ConnectionError):
            await self.send(rp.EXIT, rp.pack_exit(result.exit_code))

    async def _client_input(self, process, interactive: bool) -> None:
        """Forward stdin and resizes until the client disconnects."""
        while True:
            frame = await self.next_frame()
            if frame is None:
                return
            kind, payload = frame
            if kind == rp.STDIN:
                if payload:
                    await process.write(payload)
                else:
                    process.close_stdin()
            elif kind == rp.RESIZE and interactive:
                process.resize(*rp.unpack_resize(payload))
            else:
                raise rp.RelayProtocolError(f"unexpected relay frame type {kind} during an exec")


class _FrameWriter:
    """A StreamWriter look-alike that wraps what it is given in STDOUT frames (tunnel replies)."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection

    def write(self, data: bytes) -> None:
        self.connection.writer.write(rp.encode(rp.STDOUT, data))

    async def drain(self) -> None:
        await self.connection.writer.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.connection.writer.write(rp.encode(rp.STDOUT, b""))  # empty STDOUT frame = EOF

    def close(self) -> None:
        pass
