"""Shared CLI pieces: Go-style boolean flags and running async commands."""

from __future__ import annotations

import click

from ..api.errors import UsageError

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


def parse_forwards(publish: tuple[str, ...], address: tuple[str, ...]) -> tuple[list, list[str]]:
    """`-p`/`port-forward` specs and `--address`es; Docker's `ADDRESS:LOCAL:REMOTE` form names the address inline.

    Returns (ForwardSpecs, addresses). Every spec listens on every address, so
    an inline address must be the same for all specs and agree with --address.
    """
    from ..sandbox.portforward import ForwardSpec, parse_addresses

    inline: list[str] = []
    specs = []
    for spec in publish:
        if spec.count(":") <= 1:
            specs.append(ForwardSpec.parse(spec))
            continue
        host, _, ports = spec.rpartition(":")
        host, _, local = host.rpartition(":")  # "[::1]:8080:80" or "127.0.0.1:8080:80"
        if not host:
            raise UsageError(f"invalid port forward {spec!r}: use [ADDRESS:][LOCAL:]REMOTE")
        inline.append(host.strip("[]"))
        specs.append(ForwardSpec.parse(f"{local}:{ports}"))
    if inline:
        if len(inline) != len(publish) or len(set(parse_addresses(inline))) != 1:
            raise UsageError("every -p must name the same ADDRESS (or none); for several addresses use --address")
        if address and set(parse_addresses(address)) != set(parse_addresses(inline)):
            raise UsageError(f"-p names address {inline[0]} but --address says {','.join(address)}; use one of them")
    addresses = parse_addresses(address or inline)
    seen: set[int] = set()
    for forward in specs:
        if forward.local_port in seen:
            raise UsageError(f"local port {forward.local_port} is forwarded twice; give each -p its own LOCAL port")
        seen.add(forward.local_port)
    return specs, addresses
