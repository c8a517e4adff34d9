"""`matchlock exec`: run a command in a running sandbox through its exec relay.

Plain mode streams stdout and stderr as they come (stdin is closed), `-i`
forwards stdin, `-it` puts the local terminal in raw mode and forwards window
size changes. Ctrl-C (or SIGTERM) disconnects, which makes the owner cancel
the command in the guest; so does a reader that goes away (`| head`, exit 141).

This command is on the hot path of agents that exec many times, so it stays
small: plain blocking sockets (no asyncio), and the state database is only
opened to explain a failure.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading

import click

from ..api.errors import MatchlockError, UsageError
from ..sandbox import relay_client
from ..sandbox import relay_protocol as rp
from .tty import BROKEN_PIPE_EXIT, OutputSink, raw_terminal, terminal_size

INTERRUPTED = 130
READ_CHUNK = 64 * 1024


class _Interrupted(Exception):
    pass


def _forward_stdin(relay: relay_client.RelayConnection) -> None:
    while True:
        try:
            data = os.read(sys.stdin.fileno(), READ_CHUNK)
        except OSError:
            data = b""
        relay.send(rp.Stdin(data).encode())
        if not data:
            return


def relay_exec(relay: relay_client.RelayConnection, action: rp.ExecAction, *, interactive: bool) -> int:
    pty = action.interactive
    relay.send(action.encode())
    if pty:

        def resize(*_) -> None:
            size = terminal_size()
            relay.send(rp.Resize(size.rows, size.cols).encode())

        signal.signal(signal.SIGWINCH, resize)
    if interactive or pty:
        threading.Thread(target=_forward_stdin, args=(relay,), name="stdin", daemon=True).start()
    else:
        relay.send(rp.Stdin(b"").encode())  # no stdin: EOF at once

    def interrupt(*_) -> None:
        raise _Interrupted

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    stdout, stderr = OutputSink(sys.stdout.fileno()), OutputSink(sys.stderr.fileno())
    try:
        with raw_terminal(sys.stdin.fileno()) if pty else contextlib.nullcontext():
            while replies := relay.receive():
                for reply in replies:
                    if isinstance(reply, rp.Output):
                        (stdout if reply.channel == rp.STDOUT else stderr)(reply.data)
                    elif isinstance(reply, rp.Exited):
                        return reply.code
                    elif isinstance(reply, rp.ExecReply):
                        raise MatchlockError(reply.error or "the sandbox reported an error")
                if stdout.broken:
                    return BROKEN_PIPE_EXIT  # the reader is gone: hanging up cancels the command
        raise MatchlockError("the sandbox closed the connection (its owner stopped?)")
    except _Interrupted:
        return INTERRUPTED  # closing the connection cancels the command in the guest
    finally:
        relay.close()


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
    action = rp.ExecAction(
        shlex.join(command) if command else "exec sh", workdir, user, rp.EXEC_INTERACTIVE if pty else rp.EXEC_PIPE
    )
    if pty:
        size = terminal_size()
        action = action._replace(rows=size.rows, cols=size.cols)
    code = relay_exec(relay_client.connect(vm_id), action, interactive=interactive)
    sys.stdout.flush()
    sys.exit(code)
