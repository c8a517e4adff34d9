"""Shared CLI pieces: Go-style boolean flags and running async commands."""

from __future__ import annotations

import click

_TRUE = {"1", "t", "true", "y", "yes", "on"}
_FALSE = {"0", "f", "false", "n", "no", "off"}


class BoolFlagsCommand(click.Command):
    """Accept `--flag=false` / `--flag=true` for `--flag/--no-flag` options.

    matchlock's published CLI (cobra) spells `--rm=false`; a bare `--rm`
    never consumes the next word, so `run --rm echo hi` keeps `echo` as the
    command.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        flags, takes_value = {}, set()
        for param in self.params:
            if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
                for name in param.opts:
                    flags[name] = (name, param.secondary_opts[0])
            elif isinstance(param, click.Option) and not param.is_flag:
                takes_value.update(param.opts)
        rewritten: list[str] = []
        skip_value = False
        for index, arg in enumerate(args):
            if skip_value:
                skip_value = False
                rewritten.append(arg)
                continue
            if arg == "--" or not arg.startswith("-"):
                # Everything from the first positional on belongs to the command.
                rewritten += args[index:]
                break
            if arg in takes_value:
                skip_value = True
            name, sep, value = arg.partition("=")
            if sep and name in flags:
                lowered = value.lower()
                if lowered in _TRUE:
                    arg = flags[name][0]
                elif lowered in _FALSE:
                    arg = flags[name][1]
                else:
                    raise click.BadParameter(f"{value!r} is not a boolean (use true or false)", ctx, param_hint=name)
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)
