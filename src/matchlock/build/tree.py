"""A stage's filesystem as the build sees it, and deterministic layer tars.

`Tree` is the flattened view of a layer list (whiteouts applied): a map from
relative path to the tar member that provides it, so COPY --from, RUN diffs
and parent lookups read file data straight from the layer tars. `LayerWriter`
writes one layer: sorted entries, PAX format, no user or group names, and
mtimes clamped to SOURCE_DATE_EPOCH when set, so equal inputs give equal
digests.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat as stat_mod
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..api.errors import ImageError, UsageError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20


def split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p and p != ".")


@dataclass
class Entry:
    member: tarfile.TarInfo
    layer: Path | None  # the tar holding the data (None: no data)


class Tree:
    """The flattened filesystem of a list of layer tars."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, ...], Entry] = {}
        self._open: dict[Path, tarfile.TarFile] = {}

    def copy(self) -> Tree:
        clone = Tree()
        clone.entries = dict(self.entries)
        clone._open = self._open  # shared read handles; closed by the owner of the first tree
        return clone

    def close(self) -> None:
        for tar in self._open.values():
            tar.close()
        self._open.clear()

    def _remove_under(self, parts: tuple[str, ...], include_self: bool) -> None:
        n = len(parts)
        for key in [k for k in self.entries if k[:n] == parts and (include_self or len(k) > n)]:
            del self.entries[key]

    def apply(self, layer: Path) -> None:
        """Apply a layer tar we wrote or validated (entries normalised, no escapes)."""
        tar = self._open.get(layer)
        if tar is None:
            tar = self._open[layer] = tarfile.open(layer, "r:")
        members = tar.getmembers()
        for member in members:
            parts = split(member.name)
            base = parts[-1] if parts else ""
            if base == OPAQUE:
                self._remove_under(parts[:-1], include_self=False)
            elif base.startswith(WHITEOUT):
                self._remove_under(parts[:-1] + (base[len(WHITEOUT) :],), include_self=True)
        for member in members:
            parts = split(member.name)
            if not parts or parts[-1].startswith(WHITEOUT):
                continue
            old = self.entries.get(parts)
            if old is not None and not (old.member.isdir() and member.isdir()):
                self._remove_under(parts, include_self=True)  # a replaced directory takes its subtree along
            self.entries[parts] = Entry(member, layer if member.isreg() else None)

    def get(self, parts: tuple[str, ...]) -> tarfile.TarInfo | None:
        entry = self.entries.get(parts)
        return entry.member if entry is not None else None

    def children(self, parts: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Entry]]:
        n = len(parts)
        for key, entry in self.entries.items():
            if len(key) > n and key[:n] == parts:
                yield key, entry

    def open(self, parts: tuple[str, ...]) -> BinaryIO:
        """The data of a regular file or hardlink (followed to its target)."""
        entry = self.entries.get(parts)
        for _ in range(8):
            if entry is None or not entry.member.islnk():
                break
            entry = self.entries.get(split(entry.member.linkname))
        if entry is None or entry.layer is None:
            raise ImageError(f"/{'/'.join(parts)} has no file data in the image")
        data = self._open[entry.layer].extractfile(entry.member)
        assert data is not None
        return data  # type: ignore[return-value]

    def resolve(self, path: str, *, follow_last: bool = True) -> tuple[str, ...]:
        """Follow symlinks in `path` within the tree (never above its root), as a container would."""
        out: list[str] = []
        pending = list(split(path))
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if out:
                    out.pop()
                continue
            candidate = tuple(out) + (part,)
            member = self.get(candidate)
            if member is not None and member.issym() and (pending or follow_last):
                hops += 1
                if hops > 40:
                    raise UsageError(f"too many levels of symbolic links in {path}")
                target = member.linkname
                if target.startswith("/"):
                    out = []
                pending = list(p for p in target.split("/") if p and p != ".") + pending
                continue
            out.append(part)
        return tuple(out)

    def lookup_id(self, file: str, name: str) -> int | None:
        """uid/gid of `name` from the tree's /etc/passwd or /etc/group (for --chown and USER names)."""
        try:
            text = self.open(("etc", file)).read(1 << 20).decode(errors="replace")
        except ImageError:
            return None
        for line in text.splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
                return int(fields[2])
        return None


def clamp_epoch() -> int | None:
    """SOURCE_DATE_EPOCH when set: layer mtimes and the image's created time never exceed it."""
    text = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH={text!r} is not a number of seconds; fix: unset it or use e.g. 0")
    return int(text)


Opener = Callable[[], BinaryIO]


def tar_member_opener(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> Opener:
    """An opener of a regular member's data in `tar` (a RUN step's or an ADD archive's), read at write time."""

    def open_member() -> BinaryIO:
        data = tar.extractfile(member)
        if data is None:
            raise ImageError(
                f"{where}: tar entry {member.name!r} (type {member.type!r}) has no file data; "
                "fix: make it a regular file or remove it, then build again"
            )
        return data  # type: ignore[return-value]  # an IO[bytes] reading the member

    return open_member


@dataclass
class _Item:
    member: tarfile.TarInfo
    data: Opener | None


class LayerWriter:
    """Collects entries, then writes them sorted into one deterministic tar."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, ...], _Item] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, parts: tuple[str, ...], member: tarfile.TarInfo, data: Opener | None = None) -> None:
        clean = tarfile.TarInfo(("/".join(parts) + "/") if member.isdir() else "/".join(parts))
        clean.type = member.type
        clean.mode = member.mode & 0o7777
        clean.uid, clean.gid = member.uid, member.gid
        clean.mtime = int(member.mtime)
        clean.linkname = member.linkname
        clean.size = member.size if member.isreg() else 0
        clean.devmajor, clean.devminor = member.devmajor, member.devminor
        clean.pax_headers = {k: v for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        self.items[parts] = _Item(clean, data if member.isreg() else None)

    def whiteout(self, parts: tuple[str, ...]) -> None:
        info = tarfile.TarInfo("/".join(parts[:-1] + (WHITEOUT + parts[-1],)))
        info.mode = 0o644
        self.items[parts[:-1] + (WHITEOUT + parts[-1],)] = _Item(info, None)

    def opaque(self, parts: tuple[str, ...]) -> None:
        """Hide everything lower layers have under the directory `parts`."""
        info = tarfile.TarInfo("/".join(parts + (OPAQUE,)))
        info.mode = 0o644
        self.items[parts + (OPAQUE,)] = _Item(info, None)

    def write(self, out_dir: Path) -> tuple[str, Path]:
        """Write `<out_dir>/<hex>.tar`; returns (diff_id, path)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        epoch = clamp_epoch()
        tmp = out_dir / f".tmp-{os.getpid()}-{id(self)}.tar"
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as raw:
                hashing = _HashingWriter(raw, digest)
                with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for parts in sorted(self.items):
                        item = self.items[parts]
                        member = item.member
                        if epoch is not None and member.mtime > epoch:
                            member.mtime = epoch
                        if item.data is None:
                            tar.addfile(member)
                            continue
                        with item.data() as src:
                            tar.addfile(member, _Exact(src, member.size, member.name))
            final = out_dir / f"{digest.hexdigest()}.tar"
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return "sha256:" + digest.hexdigest(), final


class _HashingWriter(io.RawIOBase):
    def __init__(self, raw: BinaryIO, digest) -> None:
        self.raw, self.digest = raw, digest

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.raw.write(data)
        return len(data)


class _Exact(io.RawIOBase):
    """A source that must deliver exactly `size` bytes (a file that changed meanwhile is an error)."""

    def __init__(self, src: BinaryIO, size: int, name: str) -> None:
        self.src, self.left, self.name = src, size, name

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.src.read(n) if n else b""
        if len(data) < n:
            raise UsageError(f"{self.name} shrank while it was being copied; build again")
        self.left -= len(data)
        return data


def member_for(path: str, st: os.stat_result) -> tarfile.TarInfo:
    """A tar member describing a host file's metadata (the context side of COPY)."""
    info = tarfile.TarInfo(path)
    info.mode = stat_mod.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    if stat_mod.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat_mod.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
    elif stat_mod.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
    else:
        raise UsageError(f"{path}: only files, directories and symlinks can be copied")
    return info


def parent_chain(parts: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [parts[:i] for i in range(1, len(parts))]
