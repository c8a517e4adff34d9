"""`matchlock volume ...`: named ext4 volumes that outlive sandboxes (create, ls, rm, cp).

The `--json` outputs are what the published SDK parses (`volume_create`, `volume_list`): compact
objects `{"name","size","path"}`, as upstream's Go encoder prints them.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..api.errors import UsageError
from ..state.volume_copy import copy_in, copy_out, parse_location
from ..state.volumes import DEFAULT_SIZE_MB, VolumeStore


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@click.group("volume")
def volume() -> None:
    """Manage named volumes: ext4 images that outlive sandboxes."""


@volume.command("create")
@click.argument("name")
@click.option("--size", "size_mb", type=int, default=DEFAULT_SIZE_MB, show_default=True, help="Size in MB.")
@click.option("--json", "as_json", is_flag=True, help="Print the volume as a JSON object.")
def create(name: str, size_mb: int, as_json: bool) -> None:
    """Create the volume NAME (a sparse ext4 image)."""
    created = VolumeStore().create(name, size_mb)
    click.echo(_json(created.to_json()) if as_json else f"Created volume {created.name} ({size_mb} MB)")


@volume.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array ([] when there are none).")
def ls(as_json: bool) -> None:
    """List the volumes."""
    volumes = VolumeStore().list()
    if as_json:
        click.echo(_json([v.to_json() for v in volumes]))
        return
    rows = [("NAME", "SIZE")] + [(v.name, v.size) for v in volumes]
    width = max(len(row[0]) for row in rows)
    for row in rows:
        click.echo(f"{row[0].ljust(width)}   {row[1]}")


@volume.command("rm")
@click.argument("name")
def rm(name: str) -> None:
    """Remove the volume NAME (refused while a sandbox uses it)."""
    store = VolumeStore()
    store.remove(name)
    click.echo(f"Removed volume {name.strip()}")


@volume.command("cp")
@click.argument("source")
@click.argument("dest")
def cp(source: str, dest: str) -> None:
    """Copy a volume, or files between the host and a volume.

    \b
      matchlock volume cp SRC DEST             copy volume SRC to a new volume DEST
      matchlock volume cp ./dir NAME:/data     host path into volume NAME
      matchlock volume cp NAME:/data ./dir     out of volume NAME to the host
    The destination must not exist. Modes, owners and mtimes are kept.
    """
    into, out_of = parse_location(dest), parse_location(source)
    store = VolumeStore()
    if into and out_of:
        raise UsageError("copy between two volumes' paths is not supported; copy out to the host, then in")
    if into:
        copy_in(store, Path(source), into)
    elif out_of:
        copy_out(store, out_of, Path(dest))
    elif ":" in source or ":" in dest or "/" in source or "/" in dest:
        raise UsageError(
            f"cannot copy {source!r} to {dest!r}: write a volume path as NAME:/path "
            "(one side), or give two volume names to copy a whole volume"
        )
    else:
        store.clone(source, dest)
        click.echo(f"Copied volume {source.strip()} to {dest.strip()}")
        return
    click.echo(f"Copied {source} to {dest}")


# Aliases, hidden so --help lists each command once.
volume.add_command(click.Command("list", callback=ls.callback, params=ls.params, help=ls.help, hidden=True))
volume.add_command(click.Command("remove", callback=rm.callback, params=rm.params, help=rm.help, hidden=True))
volume.add_command(click.Command("copy", callback=cp.callback, params=cp.params, help=cp.help, hidden=True))
