"""`matchlock pause ID` / `matchlock resume ID`: stop and restart a sandbox's vCPUs, memory kept.

The sandbox's owner does it (QMP `stop`/`cont`) when asked through the exec
relay. A paused sandbox shows as `paused` in `list`; `exec` into it fails
at once with a hint to resume it, rather than hanging until someone does.
"""

from __future__ import annotations

import click

from ..sandbox.relay_client import control


@click.command()
@click.argument("vm_id")
def pause(vm_id: str) -> None:
    """Stop a running sandbox's vCPUs (memory, disks and network are kept)."""
    result = control(vm_id, "pause")
    click.echo(f"Paused {result.get('id', vm_id)}")


@click.command()
@click.argument("vm_id")
def resume(vm_id: str) -> None:
    """Let a paused sandbox run again."""
    result = control(vm_id, "resume")
    click.echo(f"Resumed {result.get('id', vm_id)}")
