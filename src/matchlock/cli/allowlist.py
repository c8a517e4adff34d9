"""`matchlock allow-list add|delete <id> h1,h2`: change a running sandbox's allow-list."""

from __future__ import annotations

import json

import click

from ..api.errors import MatchlockError, UsageError
from ..sandbox import relay_protocol as rp
from .exec import connect_relay


def _hosts(values: tuple[str, ...]) -> list[str]:
    hosts = list(dict.fromkeys(h.strip() for value in values for h in value.split(",") if h.strip()))
    if not hosts:
        raise UsageError("at least one host is required (comma-separated)")
    return hosts


def _request(vm_id: str, kind: int, hosts: list[str]) -> dict:
    sock = connect_relay(vm_id)
    try:
        sock.sendall(rp.encode(kind, json.dumps({"hosts": hosts}).encode()))
        decoder, frames = rp.Decoder(rp.SERVER_TYPES), []
        while not frames:
            data = sock.recv(65536)
            if not data:
                raise MatchlockError(f"sandbox {vm_id} closed the connection")
            frames = decoder.feed(data)
    finally:
        sock.close()
    kind, payload = frames[0]
    reply = json.loads(payload)
    if reply.get("error"):
        raise MatchlockError(reply["error"])
    return reply


def _print_current(allowed) -> None:
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
    reply = _request(vm_id, rp.ALLOW_LIST_ADD, _hosts(hosts))
    added = reply.get("added") or []
    click.echo(f"Added to {vm_id}: {','.join(added)}" if added else f"No new hosts were added to {vm_id}")
    _print_current(reply.get("allowed_hosts") or [])


@allow_list.command()
@click.argument("vm_id")
@click.argument("hosts", nargs=-1, required=True)
def delete(vm_id: str, hosts: tuple[str, ...]) -> None:
    """Remove hosts; an empty list means every host is allowed."""
    reply = _request(vm_id, rp.ALLOW_LIST_DELETE, _hosts(hosts))
    removed = reply.get("removed") or []
    click.echo(f"Removed from {vm_id}: {','.join(removed)}" if removed else f"No hosts were removed from {vm_id}")
    _print_current(reply.get("allowed_hosts") or [])
