"""`matchlock setup`: build every cached artefact a sandbox needs, once."""

from __future__ import annotations

import time

import click


def _step(label: str, action) -> object:
    started = time.monotonic()
    click.echo(f"{label}...", err=True)
    result = action()
    click.echo(f"  done in {time.monotonic() - started:.1f} s: {result}", err=True)
    return result


@click.command()
@click.option(
    "--kernel/--no-kernel",
    "build_kernel",
    default=True,
    show_default=True,
    help="Build the tuned guest kernel (~5-10 min once); without it the Debian fallback kernel is used.",
)
@click.option("--jobs", type=int, default=None, help="Parallel jobs for the kernel build (default: all CPUs).")
def setup(build_kernel: bool, jobs: int | None) -> None:
    """Prepare the guest runtime, kernel and built-in image (cached under ~/.cache/matchlock)."""
    from ..api.image import DEFAULT_IMAGE
    from ..image.runtime import ensure_runtime_disk
    from ..kernel import build_tuned, fallback, resolve

    _step("Guest runtime disk", ensure_runtime_disk)
    if build_kernel:
        _step(
            "Guest kernel (tuned)", lambda: build_tuned(jobs=jobs, log=lambda line: click.echo(f"  {line}", err=True))
        )
    _step(
        "Fallback kernel (Debian cloud kernel + initramfs)",
        lambda: (fallback.cached_fallback() or fallback.build_fallback(log=lambda m: None)).vmlinuz,
    )
    kernel = resolve()
    click.echo(f"Kernel in use: {kernel.kind} {kernel.version}", err=True)
    _step(f"Built-in image {DEFAULT_IMAGE}", _builtin_image)
    _step("Boot templates (default machine, with and without a network)", _warm_templates)
    click.echo(f"Ready: {kernel.kind} kernel, run `matchlock run -- uname -a` to try it.")


def _builtin_image() -> str:
    """Check the built-in image and rebuild it when it is missing, replaced or damaged."""
    from ..image.store import ImageStore

    info, problem = ImageStore().ensure_builtin()
    return f"rebuilt because {problem}: {info.lower_path}" if problem else str(info.lower_path)


def _warm_templates() -> str:
    """Boot one sandbox of each common shape, so the first real `run` starts from a template."""
    import asyncio

    from ..api.config import SandboxConfig
    from ..api.image import DEFAULT_IMAGE
    from ..api.network import NetworkConfig
    from ..sandbox.sandbox import Sandbox

    async def warm() -> None:
        for network in (NetworkConfig(), NetworkConfig(no_network=True)):
            sandbox = await Sandbox.create(SandboxConfig(image=DEFAULT_IMAGE, network=network))
            await sandbox.aclose()

    asyncio.run(warm())
    return "ready"
