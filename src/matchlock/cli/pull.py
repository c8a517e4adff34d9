"""`matchlock pull`: fetch an image from a registry into the local cache."""

from __future__ import annotations

import click

from ..image import progress
from ..image.pull import pull as pull_image
from ..image.reference import validate_new_tag
from ..image.store import ImageStore

_MB = 1024 * 1024


@click.command("pull")
@click.option("--force", is_flag=True, help="Pull even when the image is cached.")
@click.option("-t", "--tag", default=None, help="Also save the image under this local tag.")
@click.option("--platform", default="", metavar="OS/ARCH[/VARIANT]", help="Platform to pull (default: this host's).")
@click.argument("ref")
def pull(ref: str, force: bool, tag: str | None, platform: str) -> None:
    """Pull REF (e.g. alpine:3.20, ghcr.io/org/app@sha256:..., localhost:5000/team/img)."""
    if tag is not None:
        validate_new_tag(tag)  # before the pull: a refused tag must not cost a download
    click.echo(f"Pulling {ref}...")
    store = ImageStore()
    with progress.for_stderr() as bars:
        info, _ = pull_image(ref, store=store, force=force, platform=platform or None, progress=bars)
    if tag is not None:
        store.tag(tag, info)
        click.echo(f"Tagged: {tag}")
    click.echo(f"Digest: {info.digest}")
    click.echo(f"Size: {info.size / _MB:.1f} MB")
