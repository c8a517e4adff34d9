"""`matchlock exec`: run a command in a running sandbox through its exec relay.

Plain mode streams stdout and stderr as they come (stdin is closed), `-i`
forwards stdin, `-it` puts the local terminal in raw mode and forwards window
size changes. Ctrl-C (or SIGTERM) disconnects, which makes the owner cancel
the command in the guest.

This command is on the hot path of agents that exec many times, so it stays
small: plain blocking sockets (no asyncio), and the state database is only
opened to explain a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import threading

import click

from ..api.errors import MatchlockError, UsageError
from ..api.paths import vms_dir
from ..sandbox import relay_protocol as rp
from .tty import OutputSink, raw_terminal, terminal_size

INTERRUPTED = 130
READ_CHUNK = 64 * 1024


class _Interrupted(Exception):
    pass


def connect_relay(vm_id: str) -> socket.socket:
    path = vms_dir() / vm_id / "exec.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
    # Explain why, from the state database (only on this slow path).
    from ..state.store import RUNNING, StateStore

    store = StateStore()
    try:
        vm = store.require(vm_id)
    finally:
        store.close()
    if vm.status != RUNNING:
        raise MatchlockError(f"VM {vm_id} is not running (status: {vm.status})")
    raise MatchlockError(f"exec socket not found for {vm_id} (was it started with --rm=false?)")


class _Sender:
    """Frames to the relay from several threads (stdin, SIGWINCH) without interleaving."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, kind: int, payload: bytes = b"") -> None:
        with self.lock, contextlib.suppress(OSError):
            self.sock.sendall(rp.encode(kind, payload))


def _forward_stdin(sender: _Sender) -> None:
    while True:
        try:
            data = os.read(sys.stdin.fileno(), READ_CHUNK)
        except OSError:
            data = b""
        sender.send(rp.STDIN, data)
        if not data:
            return


def _error_from(payload: bytes) -> str:
    try:
        return str(json.loads(payload).get("error") or "the sandbox reported an error")
    except (ValueError, AttributeError):
        return "the sandbox sent an unreadable error"


def relay_exec(sock: socket.socket, request: dict, *, interactive: bool, pty: bool) -> int:
    sender = _Sender(sock)
    if pty:
        size = terminal_size()
        sender.send(rp.EXEC_INTERACTIVE, json.dumps({**request, "rows": size.rows, "cols": size.cols}).encode())

        def resize(*_) -> None:
            size = terminal_size()
            sender.send(rp.RESIZE, rp.pack_resize(size.rows, size.cols))

        signal.signal(signal.SIGWINCH, resize)
    else:
        sender.send(rp.EXEC_PIPE, json.dumps(request).encode())
    if interactive or pty:
        threading.Thread(target=_forward_stdin, args=(sender,), name="stdin", daemon=True).start()
    else:
        sender.send(rp.STDIN, b"")  # no stdin: EOF at once

    def interrupt(*_) -> None:
        raise _Interrupted

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    stdout, stderr = OutputSink(sys.stdout.fileno()), OutputSink(sys.stderr.fileno())
    decoder = rp.Decoder(rp.SERVER_TYPES)
    try:
        with raw_terminal(sys.stdin.fileno()) if pty else contextlib.nullcontext():
            while True:
                data = sock.recv(READ_CHUNK)
                if not data:
                    raise MatchlockError("the sandbox closed the connection (its owner stopped?)")
                for kind, payload in decoder.feed(data):
                    if kind == rp.STDOUT:
                        stdout(payload)
                    elif kind == rp.STDERR:
                        stderr(payload)
                    elif kind == rp.EXIT:
                        return rp.unpack_exit(payload)
                    elif kind == rp.EXEC_RESULT:
                        raise MatchlockError(_error_from(payload))
    except _Interrupted:
        return INTERRUPTED  # closing the connection cancels the command in the guest
    except rp.RelayProtocolError as exc:
        raise MatchlockError(f"the sandbox broke the relay protocol: {exc}") from None
    finally:
        sock.close()


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
    code = relay_exec(connect_relay(vm_id), request, interactive=interactive, pty=pty)
    sys.stdout.flush()
    sys.exit(code)
