"""The exec relay server: `<vmdir>/exec.sock`, served by the sandbox's owner.

Every connection is validated frame by frame: its first frame is parsed
into a typed action (`relay_protocol`) before anything runs. A client that
sends garbage, an oversized frame or an unknown operation gets an error
result and is disconnected; other connections and the sandbox carry on.
When a client of a buffered or piped exec disconnects, or a terminal client
hangs up, the command is cancelled (SIGTERM, then SIGKILL after the grace
period), so no process is left running for a client that is gone.

Connections run as tasks of the owner's `TaskGroup`; `aclose()` stops
listening, cancels them and waits for them, so none outlives the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import cast

from ..api.errors import MatchlockError, UsageError
from ..wire.agent import TerminalSize
from . import relay_protocol as rp
from .process import GuestProcess
from .sandbox import ExecSpec, Sandbox

READ_SIZE = 64 * 1024


class ExecRelay:
    def __init__(self, sandbox: Sandbox, path: Path, tasks: asyncio.TaskGroup) -> None:
        self.sandbox = sandbox
        self.path = path
        self._tasks = tasks
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self._closed = False

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))
        os.chmod(self.path, 0o600)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine function: asyncio would run a coroutine
        # as a task of its own, and the connection must belong to the owner's group.
        if self._closed:
            writer.close()
            return
        serving = self._serve(reader, writer)
        try:
            task = self._tasks.create_task(serving)
        except RuntimeError:  # the owner's group is shutting down: so is the sandbox
            serving.close()
            writer.close()
            return
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def aclose(self) -> None:
        """Stop listening, end every connection (their commands are cancelled) and remove the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._server is not None:
                self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
        finally:
            self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self.sandbox, reader, writer)
        try:
            await connection.run()
        except* (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; its command was cancelled on the way out
        except* Exception as failed:  # noqa: BLE001 - one broken connection must not take the sandbox down
            await connection.fail(f"internal error in the exec relay: {failed.exceptions[0]!r}")
        finally:
            writer.close()


class _Connection:
    def __init__(self, sandbox: Sandbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sandbox = sandbox
        self.reader = reader
        self.writer = writer
        self.decoder = rp.Decoder(rp.REQUEST_TYPES | rp.CLIENT_STREAM_TYPES)
        self.frames: list[tuple[int, bytes]] = []

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def fail(self, message: str) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send(rp.encode_failure(message))

    async def _next_frame(self) -> tuple[int, bytes] | None:
        while not self.frames:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return None
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def next_input(self) -> rp.Stdin | rp.Resize | None:
        """The next frame after the request; None when the client has disconnected."""
        frame = await self._next_frame()
        return None if frame is None else rp.parse_client_frame(*frame)

    async def run(self) -> None:
        try:
            frame = await self._next_frame()
            if frame is None:
                return
            action = rp.parse_action(*frame)
            if isinstance(action, rp.ExecAction) and action.mode == rp.EXEC:
                await self._buffered(action)
            elif isinstance(action, rp.ExecAction):
                await self._streaming(action)
            elif isinstance(action, rp.AllowListAction):
                await self._allow_list(action)
            elif isinstance(action, rp.ControlAction):
                await self.send(await _control(self.sandbox, action))
            else:
                await self._port_forward(action)
        except* MatchlockError as failed:  # relay protocol errors included
            await self.fail(str(failed.exceptions[0]))

    async def _allow_list(self, action: rp.AllowListAction) -> None:
        network = self.sandbox.network
        if network is None or not network.policy.intercepting:
            reply = rp.AllowListReply(
                error="allow-list updates unavailable: sandbox was started without network interception"
            )
        else:
            policy = network.policy
            try:
                hosts = list(action.hosts)
                changed = policy.add_hosts(hosts) if action.add else policy.remove_hosts(hosts)
                reply = rp.AllowListReply(tuple(changed), tuple(policy.allowed_hosts), added=action.add)
            except (ValueError, MatchlockError) as exc:
                reply = rp.AllowListReply(error=str(exc))
        await self.send(reply.encode())

    async def _port_forward(self, action: rp.PortForwardAction) -> None:
        """This connection becomes a tunnel to the guest's 127.0.0.1:<remote_port>."""
        from .portforward import forward_connection  # only tunnels pay for it

        local_reader = asyncio.StreamReader()
        # Duck-typed: forward_connection only writes, drains, half-closes and closes.
        remote_writer = cast(asyncio.StreamWriter, _FrameWriter(self))
        async with asyncio.TaskGroup() as group:
            pump = group.create_task(self._tunnel_input(local_reader))
            await forward_connection(self.sandbox.open_stream, local_reader, remote_writer, action.remote_port)
            pump.cancel()
        with contextlib.suppress(ConnectionError):
            await self.send(rp.Exited(0).encode())

    async def _tunnel_input(self, sink: asyncio.StreamReader) -> None:
        while True:
            frame = await self.next_input()
            if frame is None or frame == rp.Stdin(b""):
                sink.feed_eof()
                return
            if not isinstance(frame, rp.Stdin):
                raise rp.RelayProtocolError("a tunnel takes only STDIN frames")
            sink.feed_data(frame.data)

    async def _buffered(self, action: rp.ExecAction) -> None:
        out, err = bytearray(), bytearray()
        process = self.sandbox.start_exec(_exec_spec(action), on_stdout=out.extend, on_stderr=err.extend)
        hung_up = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            watcher = group.create_task(self._cancel_on_hangup(process, hung_up))
            result = await process.wait()
            watcher.cancel()
        if hung_up.is_set():
            return  # nobody is left to tell
        await self.send(rp.ExecReply(result.exit_code, bytes(out), bytes(err), result.error or "").encode())

    async def _cancel_on_hangup(self, process: GuestProcess, hung_up: asyncio.Event) -> None:
        """Buffered mode takes no input: ignore frames until the client goes, then cancel the command."""
        with contextlib.suppress(MatchlockError, ConnectionError):
            while await self._next_frame() is not None:
                pass
        hung_up.set()
        process.cancel()  # the client went away: nobody wants this command any more

    async def _streaming(self, action: rp.ExecAction) -> None:
        interactive = action.interactive
        gone = False

        async def forward(channel: int, data: bytes) -> None:
            # A client that hung up (its reader closed: `exec ... | head`) cancels the command,
            # which then ends at once instead of producing output for nobody.
            nonlocal gone
            if gone:
                return
            try:
                await self.send(rp.encode(channel, data))
            except ConnectionError:
                gone = True
                process.cancel()

        process = self.sandbox.start_exec(
            _exec_spec(action),
            on_stdout=lambda data: forward(rp.STDOUT, data),
            on_stderr=None if interactive else (lambda data: forward(rp.STDERR, data)),
            stdin=True,
            tty=TerminalSize(action.rows, action.cols) if interactive else None,
        )
        broken: list[MatchlockError] = []
        async with asyncio.TaskGroup() as group:
            pump = group.create_task(self._client_input(process, interactive, broken))
            result = await process.wait()
            pump.cancel()
        if broken:
            await self.fail(str(broken[0]))
            return
        with contextlib.suppress(ConnectionError):
            if result.error:
                await self.send(rp.encode(rp.STDERR, f"Error: {result.error}\n".encode()))
            await self.send(rp.Exited(result.exit_code).encode())

    async def _client_input(self, process: GuestProcess, interactive: bool, broken: list[MatchlockError]) -> None:
        """Forward stdin and resizes; when the client disconnects or breaks the protocol, end the command."""
        try:
            while (frame := await self.next_input()) is not None:
                if isinstance(frame, rp.Resize) and interactive:
                    process.resize(frame.rows, frame.cols)
                elif isinstance(frame, rp.Resize):
                    raise rp.RelayProtocolError("resize frames are only valid in a terminal exec")
                elif frame.data:
                    await process.write(frame.data)
                else:
                    process.close_stdin()
        except MatchlockError as exc:
            broken.append(exc)
        except ConnectionError:
            pass
        if interactive:
            process.send_signal(signal.SIGHUP)  # what a terminal does when it hangs up
        process.cancel()


async def _control(sandbox: Sandbox, action: rp.ControlAction) -> bytes:
    from . import snapshots  # only control requests pay for it

    try:
        if action.action == "pause":
            await snapshots.pause(sandbox)
            return rp.ControlReply({"id": sandbox.id, "paused": True}).encode()
        if action.action == "resume":
            await snapshots.resume(sandbox)
            return rp.ControlReply({"id": sandbox.id, "paused": False}).encode()
        store = sandbox.tracker.store
        if store is None:
            raise MatchlockError(f"sandbox {sandbox.id} keeps no state: snapshots need a state directory")
        record = await snapshots.create(sandbox, store, action.name, action.mode or "full")
        return rp.ControlReply(record.to_json()).encode()
    except MatchlockError as exc:
        return rp.ControlReply(error=str(exc), usage=isinstance(exc, UsageError)).encode()


def _exec_spec(action: rp.ExecAction) -> ExecSpec:
    return ExecSpec(action.command, working_dir=action.working_dir, user=action.user)


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
