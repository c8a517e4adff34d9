"""`matchlock allow-list add|delete <id> h1,h2`: change a running sandbox's allow-list."""

from __future__ import annotations

import click

from ..api.errors import UsageError
from ..api.network import validate_host_glob
from ..sandbox.relay_client import change_allow_list


def _hosts(values: tuple[str, ...]) -> list[str]:
    hosts = list(dict.fromkeys(h.strip() for value in values for h in value.split(",") if h.strip()))
    if not hosts:
        raise UsageError("at least one host is required (comma-separated)")
    for host in hosts:
        validate_host_glob(host, "host")  # bad usage: exit 2 here, before the sandbox is asked
    return hosts


def _print_current(allowed: tuple[str, ...]) -> None:
    click.echo(
        f"Current allow-list: {','.join(allowed)}" if allowed else "Current allow-list: (empty: all hosts allowed)"
    )


@click.group("allow-list")
def allow_list() -> None:
    """Change which hosts a running sandbox may reach."""


@allow_list.command()
@click.argument("vm_id")
@click.argument("hosts", nargs=-1, required=True)
def add(vm_id: str, hosts: tuple[str, ...]) -> None:
    """Allow more hosts (comma-separated globs)."""
    reply = change_allow_list(vm_id, _hosts(hosts), add=True)
    added = reply.changed
    click.echo(f"Added to {vm_id}: {','.join(added)}" if added else f"No new hosts were added to {vm_id}")
    _print_current(reply.allowed_hosts)


@allow_list.command()
@click.argument("vm_id")
@click.argument("hosts", nargs=-1, required=True)
def delete(vm_id: str, hosts: tuple[str, ...]) -> None:
    """Remove hosts; an empty list means every host is allowed."""
    reply = change_allow_list(vm_id, _hosts(hosts), add=False)
    removed = reply.changed
    click.echo(f"Removed from {vm_id}: {','.join(removed)}" if removed else f"No hosts were removed from {vm_id}")
    _print_current(reply.allowed_hosts)
