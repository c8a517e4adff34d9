"""Stale guest kernels in the cache, removed by `matchlock image gc`.

Every kernel is cached under the inputs it was made from: a tuned kernel in
`kernels/<linux-source version>-<config hash12>/`, a fallback in
`kernels/fallback-<Debian release>-<initramfs inputs hash12>/`, and a tuned
build works in `kernel-build/<version>-<hash12>/` beside its `.lock-`,
`status-` and `background-<hash12>` files. `resolve()` looks only for the
current hashes, so an entry of another hash is never booted again, and of the
fallbacks of the current inputs it boots only the newest (`cached_fallback`).
Those are stale. Kept whatever their name:
- a kernel that a live process names on its command line (QEMU's -kernel and
  -initrd of a running sandbox) or MATCHLOCK_KERNEL/_INITRD point into
  (snapshots hard-link their kernel, so they need no cache entry);
- everything of a build whose lock is held (a running build, foreground or
  background, of either kind), and every tuned build of the current config
  (one that is running or can resume); staging `.tmp-*` directories, which
  the next publish removes.
Kernels pulled as OCI artifacts (`kernels/oci/`) are left alone: each is the
layer its reference record names, and records are never re-pointed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..api.paths import kernels_dir
from ..util.fs import try_file_lock
from .background import build_root
from .fallback import input_hash
from .resolve import ENV_INITRD, ENV_KERNEL, tuned_config_hash

FALLBACK_LOCK = ".lock-fallback"  # held by build_fallback while it builds and publishes
OCI_DIR = "oci"
BUILD_RECORDS = (".lock-", "status-", "background-")  # a tuned build's files, each ending in its hash12
HASH12 = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class Removed:
    path: Path
    why: str
    size: int  # bytes freed


def _hash_of(name: str) -> str | None:
    """`6.1.192-3-3a6f2bab3600`, `.lock-3a6f2bab3600`, `status-3a6f2bab3600.json` -> `3a6f2bab3600`.

    None for a name that carries no hash: nothing the cache writes, so it is left alone."""
    found = name.removesuffix(".json").removesuffix(".log").rpartition("-")[2]
    return found if HASH12.fullmatch(found) else None


def kernels_in_use() -> set[Path]:
    """The absolute paths that live processes name in their argv, and the override variables'."""
    named = {os.environ.get(ENV_KERNEL, ""), os.environ.get(ENV_INITRD, "")}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone, or another user's under hidepid
        named.update(os.fsdecode(arg) for arg in argv if arg.startswith(b"/"))
    return {Path(os.path.realpath(path)) for path in named if path}


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*"))


@contextlib.contextmanager
def _lock_free(lock: Path | None) -> Iterator[bool]:
    """Whether nobody holds `lock` (then held here meanwhile); no lock, or no lock file, is free."""
    if lock is None or not lock.exists():
        yield True
        return
    with try_file_lock(lock) as free:
        yield free


def _candidates(kernels: Path, builds: Path, fallback_free: bool) -> Iterator[tuple[Path, str, str | None]]:
    """(entry, why it is stale, the tuned config hash whose build lock must be free, or None)."""
    tuned, inputs = tuned_config_hash()[:12], input_hash()[:12]
    entries = sorted(kernels.iterdir()) if kernels.is_dir() else []
    fallbacks = [e for e in entries if e.name.startswith("fallback-") and e.is_dir()]
    current = [e for e in fallbacks if _hash_of(e.name) == inputs]
    newest = max(current, key=lambda e: e.stat().st_mtime, default=None)
    for entry in entries:
        if entry.name.startswith(".") or entry.name == OCI_DIR or not entry.is_dir():
            continue
        if entry in fallbacks:
            if not fallback_free:
                continue  # a fallback build is publishing
            if _hash_of(entry.name) != inputs:
                yield entry, "a fallback built from other initramfs inputs", None
            elif newest is not None and entry != newest:
                yield entry, f"a fallback superseded by {newest.name}", None
        elif (built := _hash_of(entry.name)) not in (None, tuned):
            yield entry, "a tuned kernel built from another config fragment", built
    for entry in sorted(builds.iterdir()) if builds.is_dir() else []:
        if entry.name.startswith("fallback-") and entry.is_dir():
            if fallback_free:
                yield entry, "the scratch directory of a fallback build that was killed", None
        elif (built := _hash_of(entry.name)) not in (None, tuned) and (
            entry.is_dir() or entry.name.startswith(BUILD_RECORDS)
        ):
            yield entry, "a tuned build of another config fragment", built


def remove_stale() -> list[Removed]:
    """Delete the stale kernels and kernel builds of this user's cache; returns what was removed."""
    kernels, builds = kernels_dir(), build_root()
    in_use = kernels_in_use()
    removed: list[Removed] = []
    with _lock_free(kernels / FALLBACK_LOCK) as fallback_free:
        for entry, why, build_hash in list(_candidates(kernels, builds, fallback_free)):
            real = Path(os.path.realpath(entry))
            if any(path == real or real in path.parents for path in in_use):
                continue
            with _lock_free(builds / f".lock-{build_hash}" if build_hash else None) as free:
                if not free:
                    continue  # that build is running
                size = _size(entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            removed.append(Removed(entry, why, size))
    return removed
