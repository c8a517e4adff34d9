"""Entry point of the `matchlock` command.

Subcommands live in their own modules and are imported only when invoked,
so `matchlock exec` does not pay for importing the image or kernel code.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys

import click

from .. import __version__
from ..api.errors import MatchlockError
from ..util import trace

# name -> (module, attribute); aliases map to the same entry.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("matchlock.cli.run", "run"),
    "exec": ("matchlock.cli.exec", "exec_"),
    "log": ("matchlock.cli.vms", "log"),
    "list": ("matchlock.cli.vms", "list_vms"),
    "get": ("matchlock.cli.vms", "get"),
    "inspect": ("matchlock.cli.vms", "inspect"),
    "kill": ("matchlock.cli.vms", "kill"),
    "rm": ("matchlock.cli.vms", "rm"),
    "prune": ("matchlock.cli.vms", "prune"),
    "gc": ("matchlock.cli.vms", "gc"),
    "allow-list": ("matchlock.cli.allowlist", "allow_list"),
    "port-forward": ("matchlock.cli.portforward", "port_forward"),
    "version": ("matchlock.cli.info", "version"),
    "diagnose": ("matchlock.cli.info", "diagnose"),
    "kernel": ("matchlock.cli.kernel", "kernel"),
    "image": ("matchlock.cli.image", "image"),
    "volume": ("matchlock.cli.volume", "volume"),
    "pull": ("matchlock.cli.pull", "pull"),
    "build": ("matchlock.cli.build", "build"),
    "setup": ("matchlock.cli.setup", "setup"),  # a group: the artefact setup, and `setup linux`
    "rpc": ("matchlock.cli.rpc", "rpc"),
    "pause": ("matchlock.cli.pause", "pause"),
    "resume": ("matchlock.cli.pause", "resume"),
    "snapshot": ("matchlock.cli.snapshot", "snapshot"),
    "fork": ("matchlock.cli.snapshot", "fork"),
}
ALIASES: dict[str, str] = {"ls": "list", "stat": "inspect", "remove": "rm"}

# `run -d` hands the background owner its arguments through this inherited pipe
# (a JSON list) instead of its command line, which every user can read.
ARGS_FD_ENV = "MATCHLOCK_ARGS_FD"
READY_FD_ENV = "MATCHLOCK_READY_FD"  # and the owner tells the parent it is up (its VM ID) through this one
DEBUG_ENV = "MATCHLOCK_DEBUG"


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        name = ALIASES.get(name, name)
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name]
        command = getattr(importlib.import_module(module), attribute)
        command.name = name
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="matchlock", message="%(prog)s version %(version)s")
def cli() -> None:
    """Run untrusted code in disposable micro-VMs; the host controls everything that leaves them."""


def _arguments_from_pipe() -> list[str] | None:
    fd = os.environ.pop(ARGS_FD_ENV, None)
    if fd is None:
        return None  # click reads sys.argv
    with os.fdopen(int(fd), "rb") as pipe:
        try:
            args = json.loads(pipe.read())
        except ValueError:
            args = None
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise SystemExit(f"Error: {ARGS_FD_ENV} must carry a JSON list of strings")
    return args


_LONG_WORD = re.compile(r"\S{160,}")


def one_line(message: str) -> str:
    """An error message fit for a terminal: a pasted 5000-character value is cut, with its length."""
    return _LONG_WORD.sub(lambda m: f"{m[0][:80]}...[{len(m[0])} characters]", message)


def _check_utf8(args: list[str]) -> None:
    # Undecodable bytes in argv become surrogates, which no later layer (SQLite, JSON, the guest) can carry.
    for arg in args:
        try:
            arg.encode()
        except UnicodeEncodeError:
            shown = arg.encode(errors="surrogateescape").decode(errors="replace")
            raise click.UsageError(f"argument {shown!r} is not valid UTF-8; fix: pass it as UTF-8") from None


def main() -> None:
    trace.mark("cli imported")
    try:
        args = _arguments_from_pipe()
        _check_utf8(sys.argv[1:] if args is None else args)
        cli.main(args=args, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # One line naming the bad value, then exit 2 (usage) as the contract asks.
        message = exc.format_message()
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message = f"{message} (see '{exc.ctx.command_path} --help')"
        click.echo(f"Error: {one_line(message)}", err=True)
        sys.exit(exc.exit_code)
    except MatchlockError as exc:
        click.echo(f"Error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        # A host problem the command did not foresee (a full disk, a path that is a file): say which, in one line.
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"Error: {one_line(exc.strerror or str(exc))}{where}", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the edge: a bug still gets one line, the trace on request
        if os.environ.get(DEBUG_ENV):
            raise
        click.echo(f"Error: internal error: {type(exc).__name__}: {one_line(str(exc))} "
                   f"(set {DEBUG_ENV}=1 for the traceback)", err=True)  # fmt: skip
        sys.exit(1)
