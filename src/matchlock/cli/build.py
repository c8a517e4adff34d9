"""`matchlock build`: build an image from a Dockerfile; every RUN step runs in a sandbox."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from ..api.config import DEFAULT_CPUS, DEFAULT_DISK_SIZE_MB, DEFAULT_MEMORY_MB, Resources
from ..api.errors import UsageError
from ..api.network import NetworkConfig, parse_host_list
from ..api.secrets import parse_secrets
from ..build import secrets as build_secrets
from ..image.reference import validate_new_tag

_MB = 1024 * 1024


def parse_build_args(values: tuple[str, ...]) -> dict[str, str]:
    """`--build-arg K=V`; `K` alone copies the host's $K (skipped when unset), as Docker does."""
    out: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UsageError(f"invalid --build-arg {value!r}: use NAME=VALUE")
        if sep:
            out[key] = val
        elif key in os.environ:
            out[key] = os.environ[key]
    return out


@click.command("build")
@click.option("-t", "--tag", default="", help="Tag of the image to build (required).")
@click.option("-f", "--file", "dockerfile", default=None, help="Dockerfile (default: CONTEXT/Dockerfile).")
@click.option("--build-arg", multiple=True, metavar="NAME[=VALUE]", help="Set a build-time ARG (repeatable).")
@click.option("--target", default="", help="Build this stage (and what it needs) instead of the last one.")
@click.option("--no-cache", is_flag=True, help="Run every step, ignoring the layer cache.")
@click.option("--platform", default="", metavar="linux/ARCH", help="Only this host's platform is supported.")
@click.option("--allow-host", multiple=True, metavar="GLOB[,GLOB]",
              help="Hosts RUN steps may reach (default: RUN steps have no network).")  # fmt: skip
@click.option("--secret", multiple=True, metavar="id=ID[,src=PATH|,env=VAR] | NAME=VALUE@HOSTS",
              help="id=ID,src=PATH (or env=VAR; neither: $ID if set, else the file ID): a file for RUN "
                   "--mount=type=secret,id=ID, at most 500 KiB, kept in memory. NAME=VALUE@HOSTS (NAME@HOSTS reads "
                   "$NAME): a secret the proxy adds for HOSTS; RUN steps see a placeholder.")  # fmt: skip
@click.option("--cpus", type=float, default=DEFAULT_CPUS, show_default=True, help="CPUs of each RUN sandbox.")
@click.option("--memory", type=int, default=DEFAULT_MEMORY_MB, show_default=True, help="Memory (MB) of each RUN.")
@click.option("--disk-size", type=int, default=DEFAULT_DISK_SIZE_MB, show_default=True,
              help="Writable disk (MB) of each RUN sandbox.")  # fmt: skip
@click.argument("context", type=click.Path(path_type=Path))
def build(tag, dockerfile, build_arg, target, no_cache, platform, allow_host, secret, cpus, memory, disk_size,
          context) -> None:  # fmt: skip
    """Build CONTEXT's Dockerfile into the image store as TAG (then: matchlock run --image TAG)."""
    if not tag:
        raise UsageError("-t/--tag is required when building from a Dockerfile")
    validate_new_tag(tag)
    if not context.is_dir():
        raise UsageError(f'build context "{context}" is not a directory')
    file_secrets = build_secrets.parse_all([s for s in secret if build_secrets.is_file_secret(s)], os.environ)
    secrets = parse_secrets([s for s in secret if not build_secrets.is_file_secret(s)], (), None, os.environ)
    hosts = parse_host_list(allow_host)
    network = NetworkConfig(no_network=not (hosts or secrets), allowed_hosts=hosts, secrets=secrets)
    network.validate()
    resources = Resources(cpus=cpus, memory_mb=memory, disk_size_mb=disk_size)
    resources.validate()
    from ..build.builder import Builder, BuildOptions

    options = BuildOptions(
        context=context, tag=tag, dockerfile=Path(dockerfile) if dockerfile else None,
        build_args=parse_build_args(build_arg), target=target, no_cache=no_cache, platform=platform,
        network=network, resources=resources, secrets=file_secrets,
    )  # fmt: skip

    def say(line: str) -> None:
        click.echo(line, err=True)

    def output(data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()

    builder = Builder(options, say, output)
    info = asyncio.run(builder.build())
    click.echo(f"Successfully built and tagged {info.tag}")
    click.echo(f"Digest: {info.digest}")
    click.echo(f"Layers: {info.layers}")
    click.echo(f"Size: {info.size / _MB:.1f} MB")
