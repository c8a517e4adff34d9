"""Guest kernel: the tuned config, its build and cache, and Debian's fallback."""

from __future__ import annotations

from .resolve import KernelImage, resolve, tuned_config_hash


def build_tuned(jobs: int | None = None, log=print, *, install_deps: bool = False):
    """Build (or reuse) the tuned kernel; see `matchlock.kernel.build.build_tuned`."""
    from .build import build_tuned as _build_tuned

    return _build_tuned(jobs=jobs, log=log, install_deps=install_deps)


__all__ = ["KernelImage", "build_tuned", "resolve", "tuned_config_hash"]
