"""Small filesystem helpers used by every cache: locks, atomic publication, anonymous memory files."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Advisory lock (flock) held for the duration of the block; exclusive unless `shared`."""
    with try_file_lock(path, shared=shared, blocking=True):
        yield


@contextlib.contextmanager
def try_file_lock(path: Path, *, shared: bool = False, blocking: bool = False) -> Iterator[bool]:
    """Like file_lock, but yields False instead of waiting when the lock is busy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _flocked(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), shared, blocking) as taken:
        yield taken


@contextlib.contextmanager
def try_directory_lock(path: Path, *, shared: bool = False) -> Iterator[bool | None]:
    """flock on the directory `path` itself, never waiting: True when taken, False when busy, None when
    there is no such directory (a lock file beside it would outlive it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    with _flocked(fd, shared, blocking=False) as taken:
        yield taken


@contextlib.contextmanager
def _flocked(fd: int, shared: bool, blocking: bool) -> Iterator[bool]:
    """flock `fd`, which this closes at the end; yields whether the lock was taken."""
    try:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Build into a temporary sibling directory, then rename it to `final`.

    Readers only ever see a complete directory, and a crash mid-build leaves a
    `.tmp-*` directory that is removed on the next attempt.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield work
        if final.exists():
            shutil.rmtree(final)
        os.rename(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files under `root` ending in one of `suffixes`, sorted; bytecode caches are not even listed."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name != "__pycache__"]
        found += [path for name in names if (path := Path(directory, name)).suffix in suffixes and path.is_file()]
    return sorted(found)


def directory_digest_input(root: Path, suffixes: tuple[str, ...] = (".py",)) -> bytes:
    """Stable bytes describing the files under `root` (paths and contents), for cache keys."""
    parts = []
    for path in _files(root, suffixes):
        parts.append(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return b"".join(parts)


def directory_stat_input(root: Path, suffixes: tuple[str, ...] = (".py",)) -> tuple[bytes, int]:
    """The files `directory_digest_input` reads, described by their stat alone (no file is read), and the
    newest change time among them (ns). A file's content cannot change without its ctime changing."""
    parts, newest = [], 0
    for path in _files(root, suffixes):
        st = path.stat()
        parts.append(f"{path}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\0".encode())
        newest = max(newest, st.st_ctime_ns)
    return b"".join(parts), newest


def memfd_holding(name: str, data: bytes) -> int:
    """A close-on-exec memfd holding `data` (never on disk), for a consumer that wants a path:
    `/proc/self/fd/N`. The caller closes it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd
