"""A sandbox's writable upper disk: a sparse ext4 without a journal (the disk dies with the sandbox).

mke2fs took ~30 ms per sandbox here, of CPU the namespace helper beside it and the other sandboxes
share. Every blank disk of one size and one set of options is the same image, so it is made once,
under the cache directory, and each sandbox gets a sparse copy of it: only the ~3 MB of metadata a
5 GiB disk has, ~4.5 ms. The blanks are only read and are replaced by rename, so a copy never
sees a half-made one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path
from typing import BinaryIO

from ..api.errors import SetupError
from ..api.paths import cache_dir

MKFS_OPTIONS = ("-t", "ext4", "-O", "^has_journal", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1")
KEEP_BLANKS = 4  # sizes kept; each blank takes a few MB on disk
COPY_CHUNK = 1 << 20


def make_upper_disk(path: Path, size_mb: int) -> None:
    """A blank ext4 of `size_mb` at `path`, sparse."""
    try:
        with open(path, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
    except OSError as exc:
        raise SetupError(
            f"cannot create a {size_mb} MB sandbox disk in {path.parent}: {exc.strerror}; fix: a smaller --disk-size"
        ) from None
    with _open_blank(size_mb) as blank:
        try:
            copy_sparse(blank.fileno(), path)
        except OSError as exc:
            raise SetupError(
                f"cannot write the sandbox disk {path}: {exc.strerror}; fix: free space in {path.parent}"
            ) from None


def _open_blank(size_mb: int) -> BinaryIO:
    """The cached blank image of this size and these options, open (a prune may unlink it any time
    after), made now if missing."""
    options = hashlib.sha256(" ".join(MKFS_OPTIONS).encode()).hexdigest()[:12]
    directory = cache_dir() / "upper"
    blank = directory / f"ext4-{size_mb}m-{options}.img"
    with contextlib.suppress(FileNotFoundError):
        return open(blank, "rb")
    directory.mkdir(parents=True, exist_ok=True)
    partial = blank.with_name(f"{blank.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(partial, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        proc = subprocess.run(["mke2fs", "-q", "-F", *MKFS_OPTIONS, str(partial)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SetupError(
                f"mke2fs failed for the sandbox disk: {proc.stderr.strip()}; fix: apt-get install e2fsprogs"
            )
        made = open(partial, "rb")
        try:
            os.rename(partial, blank)
        except BaseException:
            made.close()
            raise
    finally:
        partial.unlink(missing_ok=True)
    _prune(directory, keep=blank)
    return made


def _prune(directory: Path, keep: Path) -> None:
    """Drop the least recently made blanks beyond KEEP_BLANKS (one per --disk-size in use)."""
    blanks = sorted(directory.glob("ext4-*.img"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in blanks if p != keep][KEEP_BLANKS - 1 :]:
        old.unlink(missing_ok=True)


def copy_sparse(source: int, target: Path) -> None:
    """Copy the data of the file open as `source` into `target` (already of its size, all hole), skipping holes."""
    with open(target, "r+b") as dst:
        end = os.fstat(source).st_size
        offset = 0
        while offset < end:
            try:
                offset = os.lseek(source, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            hole = os.lseek(source, offset, os.SEEK_HOLE)
            while offset < hole:
                chunk = os.pread(source, min(hole - offset, COPY_CHUNK), offset)
                if not chunk:
                    break
                offset += os.pwrite(dst.fileno(), chunk, offset)
