"""`matchlock pull`: fetch an image from a registry into the local cache."""

from __future__ import annotations

import click

from ..image import progress
from ..image.pull import pull as pull_image
from ..image.store import ImageStore, validate_tag

_MB = 1024 * 1024


@click.command("pull")
@click.option("--force", is_flag=True, help="Pull even when the image is cached.")
@click.option("-t", "--tag", default="", help="Also save the image under this local tag.")
@click.option("--platform", default="", metavar="OS/ARCH[/VARIANT]", help="Platform to pull (default: this host's).")
@click.argument("ref")
def pull(ref: str, force: bool, tag: str, platform: str) -> None:
    """Pull REF (e.g. alpine:3.20, ghcr.io/org/app@sha256:..., localhost:5000/team/img)."""
    if tag:
        validate_tag(tag)
    click.echo(f"Pulling {ref}...")
    store = ImageStore()
    with progress.for_stderr() as bars:
        info, _ = pull_image(ref, store=store, force=force, platform=platform or None, progress=bars)
    if tag:
        store.tag(tag, info)
        click.echo(f"Tagged: {tag}")
    click.echo(f"Digest: {info.digest}")
    click.echo(f"Size: {info.size / _MB:.1f} MB")
