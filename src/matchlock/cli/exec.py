"""`matchlock exec`: run a command in a running sandbox through its exec relay.

Plain mode streams stdout and stderr as they come (stdin is closed), `-i`
forwards stdin, `-it` puts the local terminal in raw mode and forwards window
size changes. Ctrl-C (or SIGTERM) disconnects, which makes the owner cancel
the command in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import signal
import sys

import click

from ..api.errors import MatchlockError, UsageError
from ..sandbox import relay_protocol as rp
from ..state.store import RUNNING, StateStore
from .tty import OutputSink, raw_terminal, start_stdin_reader, terminal_size

INTERRUPTED = 130


class RelayClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = rp.Decoder(rp.SERVER_TYPES)
        self.frames: list[tuple[int, bytes]] = []

    def send(self, kind: int, payload: bytes = b"") -> None:
        self.writer.write(rp.encode(kind, payload))

    async def next_frame(self) -> tuple[int, bytes] | None:
        while not self.frames:
            data = await self.reader.read(65536)
            if not data:
                return None
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)


def relay_socket(vm_id: str) -> str:
    store = StateStore()
    try:
        vm = store.require(vm_id)
        if vm.status != RUNNING:
            raise MatchlockError(f"VM {vm_id} is not running (status: {vm.status})")
        path = store.vm_dir(vm_id) / "exec.sock"
    finally:
        store.close()
    if not path.exists():
        raise MatchlockError(f"exec socket not found for {vm_id} (was it started with --rm=false?)")
    return str(path)


def _error_from(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get("error") or "the sandbox reported an error")
    except (ValueError, AttributeError):
        return "the sandbox sent an unreadable error"


async def _forward_input(client: RelayClient, forward: bool) -> None:
    if not forward:
        client.send(rp.STDIN, b"")  # no stdin: EOF at once
        return
    queue = start_stdin_reader(asyncio.get_running_loop())
    while data := await queue.get():
        client.send(rp.STDIN, data)
        await client.writer.drain()
    client.send(rp.STDIN, b"")


async def relay_exec(path: str, request: dict, *, interactive: bool, pty: bool) -> int:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(path)
    client = RelayClient(reader, writer)
    if pty:
        size = terminal_size()
        client.send(rp.EXEC_INTERACTIVE, json.dumps({**request, "rows": size.rows, "cols": size.cols}).encode())
    else:
        client.send(rp.EXEC_PIPE, json.dumps(request).encode())
    stdout, stderr = OutputSink(sys.stdout.fileno()), OutputSink(sys.stderr.fileno())
    interrupted = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None

    def interrupt() -> None:
        interrupted.set()
        main.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    if pty:
        def resize() -> None:
            size = terminal_size()
            client.send(rp.RESIZE, rp.pack_resize(size.rows, size.cols))

        loop.add_signal_handler(signal.SIGWINCH, resize)
    feeder = asyncio.create_task(_forward_input(client, interactive or pty))
    try:
        with raw_terminal(sys.stdin.fileno()) if pty else contextlib.nullcontext():
            while True:
                frame = await client.next_frame()
                if frame is None:
                    raise MatchlockError("the sandbox closed the connection (its owner stopped?)")
                kind, payload = frame
                if kind == rp.STDOUT:
                    stdout(payload)
                elif kind == rp.STDERR:
                    stderr(payload)
                elif kind == rp.EXIT:
                    return rp.unpack_exit(payload)
                elif kind == rp.EXEC_RESULT:
                    raise MatchlockError(_error_from(payload))
    except asyncio.CancelledError:
        if interrupted.is_set():
            return INTERRUPTED  # closing the connection cancels the command in the guest
        raise
    except rp.RelayProtocolError as exc:
        raise MatchlockError(f"the sandbox broke the relay protocol: {exc}") from None
    finally:
        feeder.cancel()
        writer.close()
        for signum in (signal.SIGINT, signal.SIGTERM) + ((signal.SIGWINCH,) if pty else ()):
            loop.remove_signal_handler(signum)


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the command.")
@click.option("-t", "--tty", is_flag=True, help="With -i: run in a pseudo-terminal.")
@click.option("-w", "--workdir", default="", help="Working directory in the guest.")
@click.option("-u", "--user", default="", help="uid, uid:gid or user name.")
@click.argument("vm_id")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, workdir: str, user: str, vm_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND (after `--`) in the running sandbox VM_ID."""
    if command[:1] == ("--",):  # `exec ID -- cmd`: the separator comes after the first argument
        command = command[1:]
    pty = interactive and tty
    if not command and not pty:
        raise UsageError("a command is required (or use -it for a shell)")
    if pty and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("-it requires a TTY: run it from a terminal, or drop -t to pipe stdin")
    if workdir and not workdir.startswith("/"):
        raise UsageError(f"invalid --workdir {workdir!r}: must be an absolute path")
    request = {"command": shlex.join(command) if command else "exec sh", "working_dir": workdir, "user": user}
    path = relay_socket(vm_id)
    try:
        code = asyncio.run(relay_exec(path, request, interactive=interactive, pty=pty))
    except (ConnectionError, FileNotFoundError) as exc:
        raise MatchlockError(f"cannot reach sandbox {vm_id}: {exc}") from None
    sys.stdout.flush()
    sys.exit(code)
