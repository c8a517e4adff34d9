"""Tar entries and layers made from bytes: every image the tests build starts here.

`entry()` describes one member; `layer()` packs entries into a PAX tar (what an
image layer is); `add()` writes entries into a tar that is already open.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from typing import NamedTuple

MTIME = 1_700_000_000
KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "sym": tarfile.SYMTYPE,
    "link": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


class Entry(NamedTuple):
    info: tarfile.TarInfo
    data: bytes | None


def entry(
    name: str,
    kind: str = "file",
    data: bytes | str = b"",
    *,
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    link: str = "",
    mtime: int = MTIME,
    xattrs: dict[str, str] | None = None,
    dev: tuple[int, int] = (0, 0),
) -> Entry:
    """One member: `kind` is file, dir, sym, link (hard), chr, blk or fifo; modes default to 644/755/777."""
    info = tarfile.TarInfo(name)
    info.type = KINDS[kind]
    info.mode = mode if mode is not None else {"dir": 0o755, "sym": 0o777}.get(kind, 0o644)
    info.uid, info.gid, info.linkname, info.mtime = uid, gid, link, mtime
    info.devmajor, info.devminor = dev
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    if kind != "file":
        return Entry(info, None)
    raw = data.encode() if isinstance(data, str) else data
    info.size = len(raw)
    return Entry(info, raw)


def add(tar: tarfile.TarFile, entries: Iterable[Entry]) -> None:
    for member in entries:
        tar.addfile(member.info, io.BytesIO(member.data) if member.data is not None else None)


def layer(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, entries)
    return buf.getvalue()


def tar_layer(
    files: dict[str, bytes | str],
    *,
    dirs: tuple[str, ...] = (),
    symlinks: dict[str, str] | None = None,
    modes: dict[str, int] | None = None,
) -> bytes:
    """A layer of directories, then symlinks, then files (`modes` overrides a file's 0644)."""
    return layer(
        [
            *(entry(name, "dir") for name in dirs),
            *(entry(name, "sym", link=target) for name, target in (symlinks or {}).items()),
            *(entry(name, data=data, mode=(modes or {}).get(name)) for name, data in files.items()),
        ]
    )
