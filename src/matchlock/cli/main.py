"""Entry point of the `matchlock` command.

Subcommands live in their own modules and are imported only when invoked,
so `matchlock exec` does not pay for importing the image or kernel code.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import click

from .. import __version__
from ..api.errors import MatchlockError

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
    "pull": ("matchlock.cli.pull", "pull"),
    "setup": ("matchlock.cli.setup", "setup"),
}
ALIASES: dict[str, str] = {"ls": "list", "stat": "inspect", "remove": "rm"}

# `run -d` hands the background owner its arguments through this inherited pipe
# (a JSON list) instead of its command line, which every user can read.
ARGS_FD_ENV = "MATCHLOCK_ARGS_FD"


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


def main() -> None:
    try:
        cli.main(args=_arguments_from_pipe(), standalone_mode=False)
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
        click.echo(f"Error: {message}", err=True)
        sys.exit(exc.exit_code)
    except MatchlockError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
