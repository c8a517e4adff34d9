"""`matchlock setup`: build every cached artefact a sandbox needs, once.

By default the first sandbox runs on Debian's cloud kernel (the fallback,
ready in ~10 s) and the tuned kernel builds in the background (5-9 minutes on
2 cores, at the lowest priority): a new user's first sandbox then starts about
a minute after a fresh clone instead of ten. `--tuned now` builds it first
(joining a background build), for a test suite that must run on one kernel.

`setup` is a group: without a subcommand it is this artefact setup, and
`setup linux` (cli/setup_linux.py) is the one privileged host step.
"""

from __future__ import annotations

import time

import click

from .setup_linux import linux


def _step(label: str, action) -> object:
    started = time.monotonic()
    click.echo(f"{label}...", err=True)
    result = action()
    click.echo(f"  done in {time.monotonic() - started:.1f} s: {result}", err=True)
    return result


@click.group(invoke_without_command=True)
@click.option(
    "--tuned",
    type=click.Choice(["background", "now", "skip"]),
    default="background",
    show_default=True,
    help="The tuned guest kernel (5-9 min to build once): build it in the background while sandboxes run on "
    "the Debian fallback kernel, build it now (waiting for a background build), or not at all.",
)
@click.option("--jobs", type=int, default=None, help="Parallel jobs for the kernel build (default: all CPUs).")
@click.pass_context
def setup(context: click.Context, tuned: str, jobs: int | None) -> None:
    """Prepare the guest runtime, kernel and built-in image (cached under ~/.cache/matchlock)."""
    if context.invoked_subcommand is not None:
        return  # `setup linux`: the host step only, no artefacts
    from ..api.image import DEFAULT_IMAGE
    from ..image.runtime import ensure_runtime_disk
    from ..kernel import fallback, resolve

    _step("Guest runtime disk", ensure_runtime_disk)
    if tuned == "now":
        _step("Guest kernel (tuned)", lambda: _tuned_now(jobs))
    # Always there: the first sandbox's kernel until the tuned one is built, and what it falls back to.
    _step(
        "Fallback kernel (Debian cloud kernel + initramfs)",
        lambda: (fallback.cached_fallback() or fallback.build_fallback(log=lambda m: None)).vmlinuz,
    )
    kernel = resolve()
    click.echo(f"Kernel in use: {kernel.kind} {kernel.version}", err=True)
    _step(f"Built-in image {DEFAULT_IMAGE}", _builtin_image)
    # The fallback's templates serve only until the tuned kernel lands: warm just the default shape then.
    everything = kernel.kind != "fallback" or tuned == "skip"
    _step("Boot templates" + ("" if everything else " (default machine)"), lambda: _warm_templates(everything))
    if tuned == "background":
        click.echo(f"Tuned kernel: {_start_background(jobs)}", err=True)
        from ..kernel import background

        if kernel.kind == "fallback" and background.status().state == "running":
            click.echo(
                "  sandboxes use it from the next run once it is built; `matchlock kernel build` waits for it",
                err=True,
            )
    click.echo(f"Ready: {kernel.kind} kernel, run `matchlock run -- uname -a` to try it.")


setup.add_command(linux)


def _start_background(jobs: int | None) -> str:
    """Start (or join) the background build, unless it could only fail: then say what it needs."""
    from ..api.errors import SetupError
    from ..kernel import background
    from ..kernel.build import missing_prerequisites

    current = background.status()
    if current.state in ("built", "running"):
        return current.describe()
    try:
        missing = [] if _is_root() else missing_prerequisites()
    except SetupError as exc:
        return f"not built: {exc}"
    if missing:
        return (
            f"not built: it needs {' '.join(missing)}, which only root can install\n"
            f"  fix: sudo apt-get install -y {' '.join(missing)} && matchlock kernel build"
        )
    return background.start(jobs).describe()


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def _tuned_now(jobs: int | None) -> object:
    from ..kernel import background
    from ..kernel.build import build_tuned

    current = background.status()
    if current.state == "running":
        click.echo(f"  waiting for it: {current.describe()}", err=True)
    return build_tuned(jobs=jobs, log=lambda line: click.echo(f"  {line}", err=True), install_deps=True)


def _builtin_image() -> str:
    """Check the built-in image and rebuild it when it is missing, replaced or damaged."""
    from ..image.store import ImageStore

    info, problem = ImageStore().ensure_builtin()
    return f"rebuilt because {problem}: {info.lower_path}" if problem else str(info.lower_path)


def _warm_templates(everything: bool) -> str:
    """Boot one sandbox of each common shape, so the first real `run` starts from a template."""
    import asyncio

    from ..api.config import SandboxConfig
    from ..api.image import DEFAULT_IMAGE
    from ..api.network import NetworkConfig
    from ..sandbox.sandbox import Sandbox

    shapes = [NetworkConfig(), NetworkConfig(no_network=True)] if everything else [NetworkConfig()]

    async def warm() -> None:
        for network in shapes:
            sandbox = await Sandbox.create(SandboxConfig(image=DEFAULT_IMAGE, network=network))
            await sandbox.aclose()

    asyncio.run(warm())
    return "ready"
