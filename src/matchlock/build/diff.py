"""A RUN step's layer: the guest's root filesystem (as a tar it sends) against the tree before the step.

The guest is hostile, so its tar is checked entry by entry: relative names
without `..`, known entry types, no duplicates, hardlinks only to earlier
entries, a bounded size (the caller stops reading past its limit) and count.
Paths the runtime manages (/proc, /sys, /dev, /run, /tmp, and the /etc files
the agent writes) are neither captured nor deleted, and neither is anything at or
below a RUN --mount target (`hidden`: the mount is not part of the layer, and
what the image had there stays as it was; the directories the guest made on the way to
a target, still holding nothing else, are left out too). Unchanged entries are
recognised by type, mode, owner, size, mtime and link target, so only what
the step touched lands in the layer; deletions become whiteouts, and a
directory whose old children are all gone becomes opaque.
"""

from __future__ import annotations

import shlex
import tarfile
from pathlib import Path

from ..api.errors import ImageError
from ..wire.boot import CA_FALLBACK_PATHS, CA_PATH
from .tree import LayerWriter, Opener, Tree, parent_chain, split, tar_member_opener

# Top-level directories the runtime mounts over (tmpfs, proc, sysfs, devtmpfs).
EXCLUDED_TOP = frozenset({"proc", "sys", "dev", "run", "tmp"})
# Files the guest agent writes at boot (the CA where a mount covers CA_PATH too).
EXCLUDED_FILES = frozenset(
    {("etc", "hosts"), ("etc", "hostname"), ("etc", "resolv.conf")} | {split(p) for p in (CA_PATH, *CA_FALLBACK_PATHS)}
)
MAX_ENTRIES = 1_000_000

# The guest side: tar every top-level entry except the mounted ones, without following symlinks.
CAPTURE_SCRIPT = (
    'cd / && set -- && for f in * .[!.]* ..?*; do case "$f" in '
    + "|".join(sorted(EXCLUDED_TOP))
    + ') continue;; esac; if [ -e "$f" ] || [ -L "$f" ]; then set -- "$@" "$f"; fi; done; '
    'if [ $# -gt 0 ]; then exec tar -c -f - "$@"; fi'
)


Hidden = tuple[tuple[str, ...], ...]  # mount targets, as path parts


def capture_script(hidden: Hidden = ()) -> str:
    """CAPTURE_SCRIPT, leaving the mount targets out in the guest too (so their files never cross the channel).

    The directories on the way to a target are archived without their contents (`tar --no-recursion`, a
    first archive the host reads on into the second one); their other entries are archived whole."""
    inside = sorted({t for t in hidden if t and t[0] not in EXCLUDED_TOP})
    if not inside:
        return CAPTURE_SCRIPT
    ways = sorted({t[:i] for t in inside for i in range(1, len(t))} - set(inside))
    skip = sorted(EXCLUDED_TOP) + [shlex.quote("/".join(p)) for p in sorted(set(inside) | set(ways))]
    globs = " ".join(
        ["* .[!.]* ..?*"] + [f"{shlex.quote('/'.join(w))}/{g}" for w in ways for g in ("*", ".[!.]*", "..?*")]
    )
    script = (
        f'cd / && set -- && for f in {globs}; do case "$f" in {"|".join(skip)}) continue;; esac; '
        'if [ -e "$f" ] || [ -L "$f" ]; then set -- "$@" "$f"; fi; done; '
    )
    if ways:
        script += f"tar -c --no-recursion -f - {' '.join(shlex.quote('/'.join(w)) for w in ways)} || exit; "
    return script + 'if [ $# -gt 0 ]; then exec tar -c -f - "$@"; fi'


def excluded(parts: tuple[str, ...], hidden: Hidden = ()) -> bool:
    if not parts or parts[0] in EXCLUDED_TOP or parts in EXCLUDED_FILES:
        return True
    return any(parts[: len(target)] == target for target in hidden)


def read_guest_tar(
    spool: Path, hidden: Hidden = ()
) -> tuple[tarfile.TarFile | None, dict[tuple[str, ...], tarfile.TarInfo]]:
    """Open and validate the guest's tar; (None, {}) for an empty stream (an empty root).

    With mounts the capture may be two archives end to end (capture_script), read as one."""
    if spool.stat().st_size == 0:
        return None, {}
    try:
        tar = tarfile.open(spool, "r:", ignore_zeros=bool(hidden))
        entries: dict[tuple[str, ...], tarfile.TarInfo] = {}
        for count, member in enumerate(tar, 1):
            if count > MAX_ENTRIES:
                raise ImageError(f"the step left more than {MAX_ENTRIES} files")
            name = member.name
            raw = name.rstrip("/").split("/")
            if "\0" in name or name.startswith("/") or any(p in ("..", "") for p in raw):
                raise ImageError(f"the guest sent an invalid path {name!r}")
            parts = split(name)
            if not parts or excluded(parts, hidden):
                continue
            if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isdev()):
                raise ImageError(f"the guest sent {name!r} of unsupported type {member.type!r}")
            if parts in entries:
                raise ImageError(f"the guest sent {name!r} twice")
            if member.islnk():
                target = entries.get(split(member.linkname))
                if target is None or not target.isreg():
                    raise ImageError(f"the guest sent hardlink {name!r} to {member.linkname!r}, not an earlier file")
            entries[parts] = member
    except tarfile.TarError as exc:
        raise ImageError(f"the guest's file list is not a valid tar: {exc}") from None
    return tar, entries


def _effective(member: tarfile.TarInfo, lookup) -> tarfile.TarInfo | None:
    """A hardlink's target (what it really is), else the member itself."""
    if member.islnk():
        return lookup(split(member.linkname))
    return member


def _same(old: tarfile.TarInfo | None, new: tarfile.TarInfo) -> bool:
    if old is None or old.type != new.type:
        return False
    if (old.uid, old.gid) != (new.uid, new.gid):
        return False
    if new.issym():
        return old.linkname == new.linkname
    if (old.mode & 0o7777) != (new.mode & 0o7777):
        return False
    if new.isreg():
        return (old.size, int(old.mtime)) == (new.size, int(new.mtime))
    if new.isdev():
        return (old.devmajor, old.devminor) == (new.devmajor, new.devminor)
    return True  # directories: mtime changes whenever an entry does, so it is no signal


def diff_layer(
    tree: Tree, tar: tarfile.TarFile | None, guest: dict[tuple[str, ...], tarfile.TarInfo], hidden: Hidden = ()
) -> LayerWriter:
    writer = LayerWriter()
    guest = _without_stubs(tree, guest, hidden)
    changed: set[tuple[str, ...]] = set()
    for parts, member in guest.items():
        new = _effective(member, guest.get)
        old_member = tree.get(parts)
        old = _effective(old_member, tree.get) if old_member is not None else None
        if new is None or not _same(old, new):
            changed.add(parts)
    for parts in list(changed):
        changed.update(p for p in parent_chain(parts) if p in guest)  # parents come along, as Docker's layers do
    for parts in sorted(changed):
        member = guest[parts]
        if member.islnk() and split(member.linkname) not in changed:
            target = guest[split(member.linkname)]  # validated: an earlier regular file
            regular = tarfile.TarInfo(member.name)
            regular.type, regular.size = tarfile.REGTYPE, target.size
            regular.mode, regular.uid, regular.gid, regular.mtime = target.mode, target.uid, target.gid, target.mtime
            writer.add(parts, regular, _opener(tar, target))
        else:
            writer.add(parts, member, _opener(tar, member) if member.isreg() else None)
    _deletions(tree, guest, writer, hidden)
    return writer


def _without_stubs(
    tree: Tree, guest: dict[tuple[str, ...], tarfile.TarInfo], hidden: Hidden
) -> dict[tuple[str, ...], tarfile.TarInfo]:
    """Leave out the directories the guest made on the way to a mount point (BuildKit drops its mount stubs):
    not in the tree before, and holding nothing but the way to a target."""
    ways = {t[:i] for t in hidden for i in range(1, len(t))}
    candidates = [w for w in ways if w not in tree.entries and w in guest and guest[w].isdir()]
    if not candidates:
        return guest
    stubs: set[tuple[str, ...]] = set()
    for way in sorted(candidates, key=len, reverse=True):  # the deepest first: a stub may hold only stubs
        below = [p for p in guest if len(p) > len(way) and p[: len(way)] == way]
        if all(p in stubs for p in below):
            stubs.add(way)
    return {p: m for p, m in guest.items() if p not in stubs} if stubs else guest


def _deletions(tree: Tree, guest: dict[tuple[str, ...], tarfile.TarInfo], writer: LayerWriter, hidden: Hidden) -> None:
    gone = [p for p in tree.entries if not excluded(p, hidden) and p not in guest]
    gone_set = set(gone)
    opaque: set[tuple[str, ...]] = set()
    for parts in sorted(gone):
        if any(a in gone_set or a in opaque for a in parent_chain(parts)):
            continue  # an ancestor's whiteout (or opacity) covers it
        if not all(a in guest and guest[a].isdir() for a in parent_chain(parts)):
            continue  # an ancestor that is no longer a directory replaced the whole subtree
        parent = parts[:-1]
        if parent and parent not in opaque and _all_children_gone(tree, guest, parent, hidden):
            opaque.add(parent)
            writer.opaque(parent)
            continue
        writer.whiteout(parts)


def _all_children_gone(
    tree: Tree, guest: dict[tuple[str, ...], tarfile.TarInfo], parent: tuple[str, ...], hidden: Hidden
) -> bool:
    n = len(parent) + 1
    children = [k for k, _ in tree.children(parent) if len(k) == n]
    # An entry never captured (a mount target, the agent's /etc files) is not gone: opacity would hide it.
    return len(children) > 1 and not any(child in guest or excluded(child, hidden) for child in children)


def _opener(tar: tarfile.TarFile | None, member: tarfile.TarInfo) -> Opener:
    assert tar is not None  # a member came from it
    return tar_member_opener(tar, member, "the RUN step's file list")
