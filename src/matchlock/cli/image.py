"""`matchlock image ...`: import, list, remove and garbage-collect images (local tags and the pull cache)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import click

from ..api.errors import UsageError
from ..image.reference import validate_new_tag
from ..image.store import ImageStore
from ..vm.snapshot import Template, TemplateCache

_MB = 1024 * 1024


def _created(stamp: str) -> str:
    """RFC3339 UTC -> local 'YYYY-MM-DD HH:MM:SS' (as `docker images` shows times)."""
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return stamp


@click.group("image")
def image() -> None:
    """Manage images (import, ls, rm, gc); `matchlock pull` fetches them."""


@image.command("import")
@click.argument("tag")
def import_(tag: str) -> None:
    """Import a `docker save` or OCI-layout tarball from stdin as TAG."""
    validate_new_tag(tag)
    stdin = sys.stdin.buffer
    if stdin.isatty():
        raise UsageError(
            f"pipe a docker save or OCI-layout tarball into stdin, e.g. docker save {tag} | matchlock image import {tag}"
        )
    click.echo(f"Importing {tag} from stdin...", err=True)
    info = ImageStore().import_tarball(stdin, tag)
    click.echo(f"Imported: {info.tag}")
    click.echo(f"Layers: {info.layers}")
    click.echo(f"Size: {info.size / _MB:.1f} MB")


@image.command("export")
@click.argument("tag")
def export(tag: str) -> None:
    """Write TAG to stdout as a docker-save/OCI tarball (for docker load, skopeo, image import)."""
    import tempfile

    from ..image.export import export as export_image

    if sys.stdout.isatty():
        raise UsageError(f"redirect stdout to a file, e.g. matchlock image export {tag} > image.tar")
    store = ImageStore()
    info = store.resolve(tag)
    with tempfile.TemporaryDirectory(prefix="export-") as work:
        export_image(store, info, sys.stdout.buffer, Path(work))
    sys.stdout.buffer.flush()


@image.command("ls")
def ls() -> None:
    """List local images, then the registry cache."""
    rows = [("TAG", "SOURCE", "SIZE", "CREATED")]
    # SOURCE: import, tag or builtin for local images; registry for the pull cache.
    rows += [(i.tag, i.source, f"{i.size / _MB:.1f} MB", _created(i.created_at)) for i in ImageStore().images()]
    widths = [max(len(row[col]) for row in rows) for col in range(3)]
    for row in rows:
        click.echo("   ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "   " + row[3])


@image.command("rm")
@click.argument("tag")
def rm(tag: str) -> None:
    """Remove a local tag (else a cached pull) and any blobs only it used."""
    ImageStore().remove(tag)
    click.echo(f"Removed {tag}")


@image.command("gc")
def gc() -> None:
    """Delete blobs no image references, kernels no current input selects, and stale or surplus boot templates."""
    from ..kernel.cache import remove_stale

    click.echo(f"Removed {ImageStore().gc()} unreferenced blobs")
    for kernel in remove_stale():  # before the templates: those of a removed kernel are stale then
        click.echo(f"Removed {kernel.path}: {kernel.why} ({kernel.size / _MB:.1f} MB)")
    removed = TemplateCache().prune()
    if removed:
        _report_removed_templates(removed)


@image.command("templates")
@click.option("--clear", is_flag=True, help="Remove every boot template (they are rebuilt on demand).")
def templates(clear: bool) -> None:
    """List the boot templates (snapshots of a booted guest, one per machine shape and one per image run on it), or clear them."""
    cache = TemplateCache()
    if clear:
        _report_removed_templates(cache.clear())
        return
    rows = [("TEMPLATE", "MACHINE", "STATUS", "SIZE", "LAST USED")]
    for t in cache.templates():
        used = datetime.fromtimestamp(t.last_used).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((t.key, t.shape, t.status, f"{t.size / _MB:.1f} MB", used))
    widths = [max(len(row[col]) for row in rows) for col in range(4)]
    for row in rows:
        click.echo("   ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "   " + row[4])


def _report_removed_templates(removed: list[Template]) -> None:
    freed = sum(t.size for t in removed)
    click.echo(f"Removed {len(removed)} boot templates ({freed / _MB:.1f} MB freed)")


# Aliases, hidden so --help lists each command once.
image.add_command(click.Command("list", callback=ls.callback, help=ls.help, hidden=True))
image.add_command(click.Command("remove", callback=rm.callback, params=rm.params, help=rm.help, hidden=True))
