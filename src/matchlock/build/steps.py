"""COPY and ADD: the entries a copy adds to a stage, from the context or another stage's tree.

Docker's destination rules: a destination ending in `/`, several sources or a
wildcard make it a directory; a directory source copies its contents; a
relative destination is under WORKDIR; missing parents are created (root,
0755); the destination is resolved through the stage's own symlinks, never
above its root. `ADD` unpacks local tar archives (plain, gzip, bzip2, xz).
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from ..api.errors import UsageError
from ..image.archive import normalise
from .context import BuildContext, Source
from .tree import LayerWriter, Tree, member_for, parent_chain, split, tar_member_opener


@dataclass(frozen=True)
class Ownership:
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None

    def apply(self, member: tarfile.TarInfo) -> tarfile.TarInfo:
        if self.uid is not None:
            member.uid = self.uid
        if self.gid is not None:
            member.gid = self.gid
        if self.mode is not None and not member.issym():
            member.mode = self.mode
        return member


def parse_ownership(chown: str, chmod: str, tree: Tree, where: str) -> Ownership:
    uid = gid = mode = None
    if chown:
        user, _, group = chown.partition(":")
        uid = _numeric_id(user, "passwd", tree, where)
        gid = _numeric_id(group, "group", tree, where) if group else uid
        if not group and not user.isdigit():
            gid = _primary_gid(user, tree)
    if chmod:
        try:
            mode = int(chmod, 8)
        except ValueError:
            raise UsageError(f"{where}: invalid --chmod={chmod!r}: use an octal mode such as 0755") from None
        if not 0 <= mode <= 0o7777:
            raise UsageError(f"{where}: invalid --chmod={chmod!r}: use an octal mode such as 0755")
    return Ownership(uid, gid, mode)


def _numeric_id(name: str, file: str, tree: Tree, where: str) -> int:
    if name.isdigit():
        return int(name)
    found = tree.lookup_id(file, name)
    if found is None:
        raise UsageError(f"{where}: unknown {'user' if file == 'passwd' else 'group'} {name!r} (not in /etc/{file})")
    return found


def _primary_gid(user: str, tree: Tree) -> int:
    try:
        text = tree.open(("etc", "passwd")).read(1 << 20).decode(errors="replace")
    except Exception:  # noqa: BLE001 - no passwd file: the uid doubles as gid, as Docker does
        text = ""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == user and fields[3].isdigit():
            return int(fields[3])
    return tree.lookup_id("passwd", user) or 0


def _directory_member(epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo("")
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
    return info


def ensure_dirs(
    writer: LayerWriter, tree: Tree, parts: tuple[str, ...], epoch: int, own: Ownership | None = None
) -> None:
    """Create `parts` and its missing parents in the layer (the existing ones are left alone)."""
    for prefix in parent_chain(parts) + [parts]:
        member = tree.get(prefix)
        if member is None and prefix not in writer.items:
            created = _directory_member(epoch)
            writer.add(prefix, own.apply(created) if own and prefix == parts else created)
        elif member is not None and not member.isdir():
            raise UsageError(f"cannot copy into /{'/'.join(prefix)}: it exists and is not a directory")


@dataclass
class CopyPlan:
    """Where each source lands: resolved destination and whether it is a directory."""

    dest: tuple[str, ...]
    into_dir: bool


def plan_destination(dest: str, workdir: str, tree: Tree, several: bool) -> CopyPlan:
    absolute = dest if dest.startswith("/") else posixpath.join(workdir or "/", dest)
    into_dir = dest.endswith("/") or dest in (".", "") or several
    parts = tree.resolve(posixpath.normpath(absolute))
    existing = tree.get(parts)
    if existing is not None and existing.isdir():
        into_dir = True
    return CopyPlan(parts, into_dir)


def copy_context(
    writer: LayerWriter, tree: Tree, context: BuildContext, sources: list[Source], plan: CopyPlan,
    own: Ownership, epoch: int, unpack: bool,
) -> None:  # fmt: skip
    for source in sources:
        is_dir = stat.S_ISDIR(source.st.st_mode)
        if unpack and stat.S_ISREG(source.st.st_mode) and tarfile.is_tarfile(source.path):
            ensure_dirs(writer, tree, plan.dest, epoch)
            _unpack(writer, tree, source, plan.dest)
            continue
        if is_dir:
            base = plan.dest
            ensure_dirs(writer, tree, base, epoch, own)
        else:
            base = plan.dest + (posixpath.basename(source.relative),) if plan.into_dir else plan.dest
            ensure_dirs(writer, tree, base[:-1], epoch)
        for item in context.walk(source):
            inner = item.relative[len(source.relative) :].lstrip("/") if is_dir else ""
            if is_dir and not inner:
                continue  # the directory itself: its contents land in the destination
            parts = _landing(tree, base + split(inner), stat.S_ISDIR(item.st.st_mode))
            member = own.apply(member_for("/".join(parts), item.st))
            if member.issym():
                member.linkname = os.readlink(item.path)
            writer.add(parts, member, _file_opener(item) if member.isreg() else None)


def copy_tree(
    writer: LayerWriter, tree: Tree, source_tree: Tree, paths: list[str], plan: CopyPlan, own: Ownership, epoch: int,
    where: str,
) -> None:  # fmt: skip
    for path in paths:
        parts = source_tree.resolve(path)
        member = source_tree.get(parts) if parts else _directory_member(0)
        if member is None:
            raise UsageError(f"{where}: {path} not found in the source stage")
        if member.isdir():
            base = plan.dest
            ensure_dirs(writer, tree, base, epoch, own)
            for key, entry in sorted(source_tree.children(parts)):
                copied = own.apply(_clone(entry.member))
                if copied.islnk():
                    copied = _as_regular(source_tree, key, copied)
                landing = _landing(tree, base + key[len(parts) :], copied.isdir())
                writer.add(landing, copied, _tree_opener(source_tree, key) if copied.isreg() else None)
        else:
            base = plan.dest + (parts[-1],) if plan.into_dir else plan.dest
            ensure_dirs(writer, tree, base[:-1], epoch)
            copied = own.apply(_clone(member))
            if copied.islnk():
                copied = _as_regular(source_tree, parts, copied)
            writer.add(base, copied, _tree_opener(source_tree, parts) if copied.isreg() else None)


def _as_regular(source_tree: Tree, parts: tuple[str, ...], member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A hardlink copied on its own becomes the file it points to."""
    target = source_tree.get(split(member.linkname))
    if target is None or not target.isreg():
        raise UsageError(f"hardlink /{'/'.join(parts)} points to a missing file")
    member.type, member.linkname, member.size = tarfile.REGTYPE, "", target.size
    return member


def _clone(member: tarfile.TarInfo) -> tarfile.TarInfo:
    copied = tarfile.TarInfo(member.name)
    copied.type, copied.mode, copied.uid, copied.gid = member.type, member.mode, member.uid, member.gid
    copied.mtime, copied.linkname, copied.size = member.mtime, member.linkname, member.size
    copied.devmajor, copied.devminor = member.devmajor, member.devminor
    return copied


def _landing(tree: Tree, parts: tuple[str, ...], is_dir: bool) -> tuple[str, ...]:
    """Where an entry lands: its parent resolved through the stage's symlinks (as Docker follows them),
    and a directory that meets a symlink to a directory goes into that directory."""
    landing = tree.resolve("/".join(parts[:-1])) + parts[-1:]
    if is_dir:
        target = tree.resolve("/".join(landing))
        member = tree.get(target)
        if member is not None and member.isdir():
            return target
    return landing


def _unpack(writer: LayerWriter, tree: Tree, source: Source, dest: tuple[str, ...]) -> None:
    """ADD of a local archive: its entries under `dest`, checked like an image layer's.

    A compressed archive is unpacked once into an anonymous plain tar, so the layer
    writer's sorted reads never decompress it again from the start."""
    plain = tempfile.TemporaryFile()
    with tarfile.open(source.path, "r:*") as packed, tarfile.open(fileobj=plain, mode="w:") as out:
        for member in packed:
            data = packed.extractfile(member) if member.isreg() else None
            out.addfile(member, data)
    plain.seek(0)
    tar = tarfile.open(fileobj=plain, mode="r:")  # kept open by the openers until the layer is written
    for member in tar.getmembers():
        parts = normalise(member.name, f"ADD {source.relative}")
        if not parts or not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            continue
        copied = _clone(member)
        if member.islnk():
            copied.linkname = "/".join(dest + normalise(member.linkname, f"ADD {source.relative}"))
        landing = _landing(tree, dest + parts, member.isdir())
        writer.add(
            landing, copied, tar_member_opener(tar, member, f"ADD {source.relative}") if member.isreg() else None
        )


def _file_opener(item: Source) -> Callable:
    return lambda: open(item.path, "rb")


def _tree_opener(tree: Tree, parts: tuple[str, ...]) -> Callable:
    return lambda: tree.open(parts)
