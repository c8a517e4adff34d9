"""`matchlock kernel`: build the tuned guest kernel, show which kernel runs."""

from __future__ import annotations

import sys

import click


def _progress(stream=sys.stderr):
    """One status line: rewritten in place on a terminal, one line per update otherwise."""
    tty = stream.isatty()

    def log(message: str) -> None:
        if tty:
            width = 200
            stream.write("\r\033[K" + message[:width])
        else:
            stream.write(message + "\n")
        stream.flush()

    def done() -> None:
        if tty:
            stream.write("\r\033[K")
            stream.flush()

    return log, done


@click.group("kernel")
def kernel() -> None:
    """Build and inspect the guest kernel."""


@kernel.command("build")
@click.option(
    "--jobs", "-j", type=click.IntRange(min=1), default=None, help="Parallel make jobs (default: number of CPUs)."
)
@click.option("--install-deps", is_flag=True, help="apt-get install the build packages first (as root).")
def build(jobs: int | None, install_deps: bool) -> None:
    """Build the tuned guest kernel (a few minutes, once; cached afterwards).

    When a build is already running (the one `matchlock setup` starts in the
    background), this waits for it instead of starting a second.
    """
    from ..kernel import background
    from ..kernel.build import build_tuned, cached_tuned

    existing = cached_tuned()
    if existing is not None:
        click.echo(f"Kernel already built: {existing}")
        return
    current = background.status()
    if current.state == "running":
        click.echo(f"Waiting for the tuned kernel: {current.describe()}", err=True)
        current = background.wait(log=lambda _: None)
        if current.kernel is not None:
            click.echo(str(current.kernel))
            return
        click.echo(f"That build ended without a kernel ({current.describe()}); building here.", err=True)
    log, done = _progress()
    try:
        path = build_tuned(jobs=jobs, log=log, install_deps=install_deps)
    finally:
        done()
    click.echo(str(path))


@kernel.command("path")
def path() -> None:
    """Show the kernel `matchlock run` would boot: kind, version and path.

    Without a tuned kernel this prepares (downloads and caches) the fallback,
    as `matchlock run` would.
    """
    from ..kernel.resolve import resolve

    image = resolve()
    click.echo(f"{image.kind} {image.version} {image.path}")
    if image.initrd is not None:
        click.echo(f"initrd {image.initrd}")
