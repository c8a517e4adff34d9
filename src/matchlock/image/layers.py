"""Squash image layers and build the read-only erofs lower disk.

Layers are applied in order into an in-memory tree (OCI whiteouts honoured,
escaping paths rejected), materialised into an empty staging directory
without ever following a symlink, and turned into an erofs image by
`mkfs.erofs`, published atomically under a content-derived name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import ImageError, SetupError
from .archive import normalise

SQUASH_DOMAIN = b"matchlock-squash-v1\n"
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def squash_digest(diff_ids: Iterable[str]) -> str:
    """Hex key of the squashed blob: the same layers always give the same blob."""
    h = hashlib.sha256(SQUASH_DOMAIN)
    for diff_id in diff_ids:
        h.update(diff_id.encode() + b"\n")
    return h.hexdigest()


def blob_path(blobs_dir: Path, hexdigest: str) -> Path:
    return blobs_dir / f"sha256_{hexdigest}.erofs"


# ---------------------------------------------------------------------------
# Squashing


class _Node:
    """One path of the squashed tree. `member` is None for implied directories."""

    __slots__ = ("member", "layer", "children", "link_target")

    def __init__(self, member: tarfile.TarInfo | None, layer: int, is_dir: bool) -> None:
        self.member = member
        self.layer = layer
        self.children: dict[str, _Node] | None = {} if is_dir else None
        self.link_target: tuple[str, ...] = ()

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass
class SquashedTree:
    root: _Node
    layers: list[tarfile.TarFile]


def _lookup(root: _Node, parts: tuple[str, ...]) -> _Node | None:
    node = root
    for part in parts:
        if node.children is None:
            return None
        child = node.children.get(part)
        if child is None:
            return None
        node = child
    return node


def _kind(member: tarfile.TarInfo | None) -> str:
    if member is None or member.isdir():
        return "directory"
    return "symlink" if member.issym() else "hardlink" if member.islnk() else "file"


def _insert(root: _Node, parts: tuple[str, ...], member: tarfile.TarInfo, layer: int) -> None:
    where = f"layer {layer + 1}: {'/'.join(parts) or '/'}"
    if not parts:
        if not member.isdir():
            raise ImageError(f"{where}: the image root must be a directory")
        root.member = member
        return
    node = root
    for depth, part in enumerate(parts[:-1]):
        assert node.children is not None
        child = node.children.get(part)
        if child is None:
            child = node.children[part] = _Node(None, layer, True)
        elif not child.is_dir:
            # Extracting through a symlink (or file) parent could write outside the root.
            parent = "/".join(parts[: depth + 1])
            raise ImageError(f"{where}: parent {parent} is a {_kind(child.member)}, not a directory (path escape)")
        node = child
    assert node.children is not None
    existing = node.children.get(parts[-1])
    if member.isdir() and existing is not None and existing.is_dir:
        existing.member, existing.layer = member, layer  # directories merge
    else:
        node.children[parts[-1]] = _Node(member, layer, member.isdir())  # replaces any old subtree


def _supported(member: tarfile.TarInfo) -> bool:
    return member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isdev()


def squash(layers: list[tarfile.TarFile]) -> SquashedTree:
    root = _Node(None, 0, True)
    for index, tar in enumerate(layers):
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise ImageError(f"layer {index + 1} is not a valid tar: {exc}") from None
        additions: list[tuple[tuple[str, ...], tarfile.TarInfo]] = []
        deletions: list[tuple[tuple[str, ...], bool]] = []  # (path, opaque)
        for member in members:
            parts = normalise(member.name, f"layer {index + 1}")
            base = parts[-1] if parts else ""
            if base == ".wh..wh..opq":
                deletions.append((parts[:-1], True))
            elif base.startswith(".wh..wh."):
                continue  # aufs bookkeeping such as .wh..wh.plnk
            elif base.startswith(".wh."):
                if base[4:] in ("", ".", ".."):
                    raise ImageError(f"layer {index + 1}: invalid whiteout {member.name!r}")
                deletions.append((parts[:-1] + (base[4:],), False))
            elif _supported(member):
                additions.append((parts, member))
        # Whiteouts hide only lower layers, so apply them before this layer's entries.
        for parts, opaque in deletions:
            if opaque:
                node = _lookup(root, parts)
                if node is not None and node.children is not None:
                    node.children.clear()
            else:
                parent = _lookup(root, parts[:-1])
                if parent is not None and parent.children is not None:
                    parent.children.pop(parts[-1], None)
        additions.sort(key=lambda item: item[0])  # parents first; stable, so later duplicates win
        for parts, member in additions:
            _insert(root, parts, member, index)
    _check_hardlinks(root, root, ())
    return SquashedTree(root, layers)


def _check_hardlinks(root: _Node, node: _Node, parts: tuple[str, ...]) -> None:
    assert node.children is not None
    for name, child in node.children.items():
        path = parts + (name,)
        if child.is_dir:
            _check_hardlinks(root, child, path)
        elif child.member is not None and child.member.islnk():
            where = f"hardlink {'/'.join(path)} -> {child.member.linkname}"
            target, current = child, child
            for _ in range(32):
                assert current.member is not None
                if not current.member.islnk():
                    break
                target_parts = normalise(current.member.linkname, where)
                found = _lookup(root, target_parts)
                if found is None or found is child:
                    raise ImageError(f"{where}: target is not a regular file in the image")
                target, current = found, found
                child.link_target = target_parts
            if target.member is None or not target.member.isreg():
                raise ImageError(f"{where}: target is not a regular file in the image")


# ---------------------------------------------------------------------------
# Materialising


def _xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    prefix = "SCHILY.xattr."
    return [
        (key[len(prefix) :], value.encode("utf-8", "surrogateescape"))
        for key, value in member.pax_headers.items()
        if key.startswith(prefix)
    ]


def _set_xattrs(target: int | str, member: tarfile.TarInfo) -> None:
    for key, value in _xattrs(member):
        try:
            os.setxattr(target, key, value, follow_symlinks=isinstance(target, int))
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EINVAL, errno.EACCES):
                raise


def _ns(member: tarfile.TarInfo | None) -> tuple[int, int]:
    mtime = int(member.mtime * 1_000_000_000) if member is not None else 0
    return (mtime, mtime)


def _open_dir(root_fd: int, parts: tuple[str, ...]) -> int:
    fd = os.dup(root_fd)
    for part in parts:
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nxt
    return fd


def materialise(tree: SquashedTree, dest: Path) -> None:
    """Write the squashed tree into the empty directory `dest`, never following a symlink."""
    if any(dest.iterdir()):
        raise ImageError(f"staging directory {dest} is not empty")
    root_fd = os.open(dest, _DIR_FLAGS)
    dirs: list[tuple[tuple[str, ...], _Node]] = [((), tree.root)]
    links: list[tuple[tuple[str, ...], _Node]] = []
    path: tuple[str, ...] = ()
    try:
        _create_children(tree, root_fd, (), tree.root, dirs, links)
        # Hardlinks once every target exists; directory metadata last, deepest first,
        # so creating entries does not disturb a directory's mtime.
        for path, node in links:
            parent = _open_dir(root_fd, path[:-1])
            try:
                os.link(
                    "/".join(node.link_target), path[-1], src_dir_fd=root_fd, dst_dir_fd=parent, follow_symlinks=False
                )
            finally:
                os.close(parent)
        for path, node in sorted(dirs, key=lambda item: len(item[0]), reverse=True):
            fd = _open_dir(root_fd, path)
            try:
                member = node.member
                os.fchown(fd, member.uid if member else 0, member.gid if member else 0)
                os.fchmod(fd, stat.S_IMODE(member.mode) if member else 0o755)
                if member is not None:
                    _set_xattrs(fd, member)
                os.utime(fd, ns=_ns(member))
            finally:
                os.close(fd)
    except OSError as exc:
        raise ImageError(f"cannot materialise /{'/'.join(path)}: {exc}") from None
    finally:
        os.close(root_fd)


def _create_children(
    tree: SquashedTree,
    dir_fd: int,
    parts: tuple[str, ...],
    node: _Node,
    dirs: list[tuple[tuple[str, ...], _Node]],
    links: list[tuple[tuple[str, ...], _Node]],
) -> None:
    assert node.children is not None
    for name in sorted(node.children):
        child = node.children[name]
        path = parts + (name,)
        member = child.member
        try:
            if child.is_dir:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    _create_children(tree, fd, path, child, dirs, links)
                finally:
                    os.close(fd)
                dirs.append((path, child))
                continue
            assert member is not None
            if member.islnk():
                links.append((path, child))
            elif member.isreg():
                _write_file(tree.layers[child.layer], member, dir_fd, name)
            else:
                if member.issym():
                    os.symlink(member.linkname, name, dir_fd=dir_fd)
                else:
                    kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
                    device = os.makedev(member.devmajor, member.devminor) if member.ischr() or member.isblk() else 0
                    os.mknod(name, kind | 0o600, device, dir_fd=dir_fd)
                os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
                if not member.issym():  # we created it: not a symlink, so chmod cannot be redirected
                    os.chmod(name, stat.S_IMODE(member.mode), dir_fd=dir_fd)
                _set_xattrs(f"/proc/self/fd/{dir_fd}/{name}", member)
                os.utime(name, ns=_ns(member), dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise ImageError(f"cannot materialise /{'/'.join(path)}: {exc}") from None


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, dir_fd: int, name: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            src = tar.extractfile(member)
            written = 0
            while src is not None and (chunk := src.read(_CHUNK)):
                _write_all(fd, chunk)
                written += len(chunk)
        except (tarfile.TarError, EOFError) as exc:
            raise ImageError(f"{member.name}: truncated layer data: {exc}") from None
        if written != member.size:
            raise ImageError(f"{member.name}: expected {member.size} bytes, layer has {written}")
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, stat.S_IMODE(member.mode))  # after chown, which clears setuid/setgid
        _set_xattrs(fd, member)  # after chown, which drops security.capability
        os.utime(fd, ns=_ns(member))
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---------------------------------------------------------------------------
# erofs


def build_erofs(staging: Path, out: Path) -> None:
    """mkfs.erofs into `<out>.tmp`, fsync, then rename so a partial blob is never trusted."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    # Extended inodes keep per-file mtimes and 32-bit uids/gids exactly.
    argv = ["mkfs.erofs", "--quiet", "--preserve-mtime", "-Eforce-inode-extended", str(tmp), str(staging)]
    try:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            raise SetupError("mkfs.erofs is not installed; fix: apt-get install erofs-utils") from None
        if proc.returncode != 0:
            raise ImageError(f"mkfs.erofs failed: {(proc.stderr or proc.stdout).strip()}")
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, out)
        dir_fd = os.open(out.parent, _DIR_FLAGS)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def build_lower(layers: list[tarfile.TarFile], diff_ids: list[str], blobs_dir: Path, workdir: Path) -> Path:
    """The squashed erofs blob for these layers, built unless a complete one exists.

    The caller holds the store lock, so only one process builds a given blob.
    """
    out = blob_path(blobs_dir, squash_digest(diff_ids))
    if out.exists() and out.stat().st_size > 0:
        return out
    blobs_dir.mkdir(parents=True, exist_ok=True)
    tree = squash(layers)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=workdir))
    try:
        if os.geteuid() == 0:
            materialise(tree, staging)
            build_erofs(staging, out)
        else:  # only root can give files other owners: fakeroot records them for mkfs.erofs
            from . import unprivileged

            unprivileged.build(tree, staging, out, workdir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
