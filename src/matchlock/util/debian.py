"""Fetch and unpack Debian packages without installing them.

The guest runtime (Python + libc), the built-in busybox image and the
fallback kernel are all assembled from Debian packages. Downloads are cached
under `~/.cache/matchlock/debs/` by exact version, so a version is fetched
once and a package upgrade changes the cache keys built from `versions()`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..api.errors import SetupError
from ..api.paths import debs_dir
from .fs import file_lock


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SetupError(f"{argv[0]} is not installed; matchlock needs a Debian host with apt and dpkg") from None
    if proc.returncode != 0:
        raise SetupError(
            f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}\n"
            "  fix: run `apt-get update` and check that the Debian mirror is reachable"
        )
    return proc.stdout


def candidate_version(package: str) -> str:
    """The version `apt-get download` would fetch now."""
    out = _run(["apt-cache", "show", "--no-all-versions", package])
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise SetupError(f"apt-cache knows no version of {package}; fix: run `apt-get update`")


def versions(packages: list[str]) -> dict[str, str]:
    return {name: candidate_version(name) for name in packages}


def _deb_filename(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_"


def download(packages: list[str]) -> dict[str, Path]:
    """Download (or reuse) the candidate .deb of each package; returns name -> path."""
    target = debs_dir()
    target.mkdir(parents=True, exist_ok=True)
    wanted = versions(packages)

    def cached(name: str) -> Path | None:
        matches = sorted(target.glob(_deb_filename(name, wanted[name]) + "*.deb"))
        return matches[0] if matches else None

    with file_lock(target / ".lock"):
        _fetch_missing(target, [f"{n}={v}" for n, v in wanted.items() if cached(n) is None])
    result = {name: path for name in packages if (path := cached(name)) is not None}
    absent = [name for name in packages if name not in result]
    if absent:
        raise SetupError(f"apt-get download did not produce {', '.join(absent)}")
    return result


def _fetch_missing(target: Path, missing: list[str]) -> None:
    if missing:
        # apt-get writes into the current directory; a staging directory keeps
        # half-downloaded files out of the cache.
        staging = target / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _run(["apt-get", "download", "-q", *missing], cwd=staging)
        for deb in staging.glob("*.deb"):
            deb.rename(target / deb.name)
        shutil.rmtree(staging, ignore_errors=True)


def extract(deb: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(destination)])
