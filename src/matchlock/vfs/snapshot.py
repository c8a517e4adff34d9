"""A router's host VFS state saved beside a snapshot, and restored into a freshly built router.

`save` runs while the VFS server is parked (no request in flight), `restore` before the restored
server starts. Under `<directory>/vfs`: `state.json` (written last, by rename, so a partial save has
none), and per private mount `mount-<i>/` (i: the mount's place in path order): a memory mount's
`index.json` (one row per inode, hard links one row) and `data.bin` (every file's bytes, end to end);
a host-side overlay's `index.json` (whiteouts, opaque directories, kept inode numbers) and `upper/`, a
`cp -a --reflink=auto` of its upper (modes, owners, times, symlinks, hard links, xattrs). host_fs mounts
and guest-local overlays keep nothing here: the host directory is shared, and a guest-local overlay's
writes are on the sandbox's upper disk, which the snapshot copies.

With nodes (full snapshots and forks, whose guest kernel still holds node ids and file handles), the
node table and the open handles come too. A handle is reopened by its path with its open flags minus
O_CREAT/O_TRUNC/O_EXCL, and kept only if it shows the inode number it had at the save; one that cannot
be (unlinked while open, gone or replaced on the host) answers ESTALE to every use, never another file.
Directory handles list afresh at their next READDIR. Both id counters continue past the saved ones.

The snapshot is host data but is read as untrusted: JSON shapes, names, ids, counts and sizes are
checked, a saved tree is walked without following a symlink, and anything off is refused with
`VfsStateError`, as are mounts that differ from the saved ones or a host path that is gone.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

from ..api.errors import MatchlockError
from .hostfs import HostFSProvider
from .memory import MKNOD_KINDS, MemoryProvider, _Inode, reserve_inos
from .nodes import DETACHED, NEVER_FORGOTTEN, Node
from .overlay import OverlayProvider
from .router import Mount, Router, _Open
from .types import MAX_DEPTH, PATH_MAX, FsError, Handle, check_name, wants_write

VERSION = 1
MAX_STATE_BYTES = 64 << 20  # state.json: 200,000 nodes take ~10 MB
MAX_INDEX_BYTES = 256 << 20  # a mount's index.json
MAX_SET = 1 << 20  # whiteouts, opaque directories, kept inode numbers of one overlay
MAX_UPPER_ENTRIES = 1 << 22  # entries of a saved overlay upper
_I64 = 1 << 63
_REOPEN_DROP = os.O_CREAT | os.O_TRUNC | os.O_EXCL
_KINDS = (stat.S_IFDIR, stat.S_IFLNK, *MKNOD_KINDS)  # what a memory mount holds


class VfsStateError(MatchlockError):
    """A saved VFS state that cannot be restored here: the message names the mount or field, and the fix."""


class Gone(Handle):
    """A restored handle whose file could not be reopened: every use fails, none reaches another file."""

    def _stale(self, *args: Any, **kwargs: Any) -> Any:
        raise FsError(errno.ESTALE, "a handle whose file was gone at restore")

    read = write = fsync = fstat = truncate = _stale


# --- entry points --------------------------------------------------------------------------------------------


def save(router: Router, directory: Path, *, with_nodes: bool) -> None:
    """Write the VFS state under directory / "vfs": a state.json and each private provider's content.
    Called while the VFS server is parked (no request in flight, the router does not change)."""
    vfs = directory / "vfs"
    vfs.mkdir(parents=True, exist_ok=True)
    if (vfs / "state.json").exists():
        raise VfsStateError(f"{vfs} already holds a saved VFS state; fix: save into a new directory")
    mounts = _ordered(router)
    for index, m in enumerate(mounts):
        if isinstance(m.provider, MemoryProvider):
            _save_memory(m.provider, vfs / f"mount-{index}")
        elif isinstance(m.provider, OverlayProvider):
            _save_overlay(m.provider, vfs / f"mount-{index}")
    state: dict[str, Any] = {"version": VERSION, "mounts": [_fingerprint(m) for m in mounts], "nodes": None}
    if with_nodes:
        state["nodes"] = _nodes_state(router)
    _write_new(vfs / "state.json", json.dumps(state, separators=(",", ":")).encode())


def restore(router: Router, directory: Path, *, with_nodes: bool) -> None:
    """Fill a freshly built router (built from the same VFSConfig by sandbox/vfs.py) from a saved state:
    providers' content first, then (with_nodes) the node table and open handles, before the server starts."""
    vfs = _real_dir(directory / "vfs")
    state = _load_json(vfs / "state.json", MAX_STATE_BYTES)
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise VfsStateError(f"{vfs / 'state.json'}: not a version {VERSION} VFS state; fix: take the snapshot again")
    if len(router.nodes) != len(router.root_nodes) or router.handles:
        raise VfsStateError("restore needs a freshly built router (it already holds nodes or handles)")
    mounts = _ordered(router)
    _check_mounts(state.get("mounts"), mounts)
    nodes = state.get("nodes")
    if with_nodes and not isinstance(nodes, dict):
        raise VfsStateError("this snapshot saved no node table (a filesystem snapshot); fix: boot it cold")
    table = _node_table(router, nodes) if with_nodes and isinstance(nodes, dict) else None  # checked first
    for index, m in enumerate(mounts):
        if isinstance(m.provider, MemoryProvider):
            _restore_memory(m.provider, _real_dir(vfs / f"mount-{index}"), m.path)
        elif isinstance(m.provider, OverlayProvider):
            _restore_overlay(m.provider, _real_dir(vfs / f"mount-{index}"), m.path)
    if table is not None and isinstance(nodes, dict):
        _install(router, nodes, *table)


# --- mounts --------------------------------------------------------------------------------------------------


def _ordered(router: Router) -> list[Mount]:
    return sorted(router.mounts, key=lambda m: m.path)


def _fingerprint(m: Mount) -> dict[str, Any]:
    p = m.provider
    host = p.host_path if isinstance(p, HostFSProvider) else p.lower_path if isinstance(p, OverlayProvider) else None
    return {
        "path": m.path, "kind": p.kind, "readonly": m.readonly, "guest_overlay": m.guest_overlay,
        "host_path": host, "owner_uid": getattr(p, "owner_uid", None), "owner_gid": getattr(p, "owner_gid", None),
    }  # fmt: skip


def _check_mounts(saved: Any, mounts: list[Mount]) -> None:
    if not isinstance(saved, list) or len(saved) > 1024 or not all(isinstance(s, dict) for s in saved):
        raise VfsStateError("state.json: a bad mount list; fix: take the snapshot again")
    now = [_fingerprint(m) for m in mounts]
    saved_by_path = {s.get("path"): s for s in saved}
    for current in now:
        was = saved_by_path.get(current["path"])
        if was is None:
            raise VfsStateError(f"vfs mount {current['path']} is not in the snapshot; fix: restore with its mounts")
        if was != current:
            raise VfsStateError(
                f"vfs mount {current['path']}: the snapshot has {_describe(was)}, this sandbox {_describe(current)};"
                " fix: restore with the snapshot's own mounts"
            )
    for was in saved:
        if was.get("path") not in {c["path"] for c in now}:
            raise VfsStateError(f"vfs mount {was.get('path')!r} of the snapshot is missing; fix: restore with it")
    for current in now:
        host = current["host_path"]
        if host is not None and not os.path.lexists(host):
            raise VfsStateError(
                f"vfs mount {current['path']}: its host path {host} is gone; fix: recreate it, or restore elsewhere"
            )


def _describe(f: dict[str, Any]) -> str:
    extra = f" {f.get('host_path')}" if f.get("host_path") else ""
    ro = " read-only" if f.get("readonly") else ""
    return f"{f.get('kind')}{extra}{ro} (owner {f.get('owner_uid')}:{f.get('owner_gid')})"


# --- node table and handles ----------------------------------------------------------------------------------


def _peek(counter: itertools.count[int]) -> tuple[int, itertools.count[int]]:
    value = next(counter)
    return value, itertools.count(value)


def _nodes_state(router: Router) -> dict[str, Any]:
    next_id, router._ids = _peek(router._ids)
    next_fh, router._fhs = _peek(router._fhs)
    table = []
    for node in router.nodes.values():
        if node.parent is None:
            table.append([node.id, None, "/" + "/".join(node.root), 0, False])
        else:
            parent = 0 if node.parent is DETACHED else node.parent.id
            table.append([node.id, parent, node.name, node.nlookup, node.linked])
    handles = []
    for fh, opened in router.handles.items():
        held = router.nodes.get(opened.node.id) is opened.node
        ino = None  # what a file handle shows: its reopen must show the same, else it reached another file
        if not opened.directory and opened.handle is not None and not isinstance(opened.handle, Gone):
            try:
                ino = opened.handle.fstat().ino
            except FsError:
                pass
        gone = not opened.directory and ino is None
        handles.append([fh, opened.node.id if held else None, opened.flags, opened.directory, gone, ino])
    # The features a guest was granted are not saved: the restored server grants them again (VfsServer).
    return {"next_id": next_id, "next_fh": next_fh, "table": table, "handles": handles}


def _node_table(router: Router, saved: dict[str, Any]) -> tuple[dict[int, Node], dict[tuple[int, str], Node]]:
    """The saved node table, checked, its nodes linked to each other (the router itself not yet changed)."""
    limits = router.limits
    table = _list(saved.get("table"), limits.max_nodes, "node table")
    roots = {n.id: n for n in router.root_nodes}
    nodes: dict[int, Node] = {}
    parent_of: dict[int, int] = {}
    for row in table:
        if not isinstance(row, list) or len(row) != 5:
            raise _bad("a node row is not [id, parent, name, nlookup, linked]")
        node_id, parent, name, nlookup, linked = row
        node_id = _int(node_id, 2, _I64, "a node id")
        if node_id in nodes:
            raise _bad(f"node {node_id} twice")
        if parent is None:
            root = roots.get(node_id)
            if root is None or name != "/" + "/".join(root.root):
                raise _bad(f"root node {node_id} ({name!r}) is not a root of these mounts")
            nodes[node_id] = root
            continue
        if node_id in roots:  # else the guest's mount root would be a node somewhere below it
            raise _bad(f"node {node_id}, a mount root here, has a parent")
        node = Node(node_id, None, _name(name, "a node name"))
        node.nlookup = _int(nlookup, -NEVER_FORGOTTEN + 1, NEVER_FORGOTTEN, "a node's lookup count")
        if not isinstance(linked, bool):
            raise _bad("a node's linked flag")
        node.linked = linked
        parent_of[node_id] = _int(parent, 0, _I64, "a parent id")
        nodes[node_id] = node
    if set(roots) - set(nodes):
        raise _bad("a mount root is missing from the node table")
    index: dict[tuple[int, str], Node] = {}
    for node_id, parent_id in parent_of.items():
        node = nodes[node_id]
        found = DETACHED if parent_id == 0 else nodes.get(parent_id)
        if found is None or found is node:
            raise _bad(f"node {node_id} has no parent {parent_id}")
        node.parent = found
        if found is not DETACHED:  # unlinked nodes are counted nowhere (NodeTable._detach)
            if (parent_id, node.name) in index:
                raise _bad(f"two nodes named {node.name!r} in node {parent_id}")
            index[(parent_id, node.name)] = node
    _check_acyclic(nodes)
    _int(saved.get("next_id"), 2, _I64, "next_id")
    _list(saved.get("handles"), router.limits.max_handles, "handle list")
    return nodes, index


def _install(router: Router, saved: dict[str, Any], nodes: dict[int, Node], index: dict[tuple[int, str], Node]) -> None:
    for node in index.values():
        assert node.parent is not None
        node.parent.children += 1
    router.nodes, router.index = nodes, index
    router._ids = itertools.count(max(saved["next_id"], max(nodes) + 1))
    _restore_handles(router, saved)


def _check_acyclic(nodes: dict[int, Node]) -> None:
    """Every node's parent chain ends at a root or at DETACHED (a tampered table could loop `_parts` forever)."""
    good: set[int] = set()
    for node in nodes.values():
        seen: list[Node] = []
        walk: Node | None = node
        while walk is not None and walk is not DETACHED and walk.id not in good:
            seen.append(walk)
            if len(seen) > len(nodes):
                raise _bad(f"node {node.id}'s parents loop")
            walk = walk.parent
        good.update(n.id for n in seen)


def _restore_handles(router: Router, saved: dict[str, Any]) -> None:
    rows = _list(saved.get("handles"), router.limits.max_handles, "handle list")
    top = 0
    for row in rows:
        if not isinstance(row, list) or len(row) != 6:
            raise _bad("a handle row is not [fh, node, flags, directory, gone, ino]")
        fh = _int(row[0], 1, _I64, "a handle number")
        if fh in router.handles:
            raise _bad(f"handle {fh} twice")
        node = router.nodes.get(_int(row[1], 2, _I64, "a handle's node")) if row[1] is not None else None
        flags = _int(row[2], 0, 1 << 32, "a handle's flags")
        directory, gone = row[3], row[4]
        if not isinstance(directory, bool) or not isinstance(gone, bool):
            raise _bad("a handle's directory or gone flag")
        ino = None if directory or gone else _int(row[5], 0, 1 << 64, "a handle's inode number")
        held = node if node is not None else Node(0, DETACHED, "")  # its node was forgotten: it has no path
        if directory:
            router.handles[fh] = _Open(held, directory=True, flags=flags)
        else:
            handle = Gone() if ino is None or node is None else _reopen(router, node, flags, ino)
            router.handles[fh] = _Open(held, handle, flags=flags)
        top = max(top, fh)
    router._fhs = itertools.count(max(_int(saved.get("next_fh"), 1, _I64, "next_fh"), top + 1))


def _reopen(router: Router, node: Node, flags: int, ino: int) -> Handle:
    try:
        parts = router._parts(node)
        m, rel = router.route(parts)
        if parts in router.virtual or (wants_write(flags) and m.readonly):
            return Gone()
        handle = m.provider.open(rel, flags & ~_REOPEN_DROP)
    except FsError:
        return Gone()
    try:  # a host_fs file replaced on the host since the save (or a tampered path) is another inode
        if handle.fstat().ino == ino:
            return handle
    except FsError:
        pass
    handle.close()
    return Gone()


# --- memory mounts -------------------------------------------------------------------------------------------

# A row per inode, the root first: [mode, uid, gid, ino, atime_ns, mtime_ns, ctime_ns, data offset, size,
# symlink target, [[name, row], ...], rdev]. A state saved before device nodes has no rdev (11 fields).


def _save_memory(provider: MemoryProvider, where: Path) -> None:
    where.mkdir()
    rows: list[list[Any]] = []
    offset = 0
    buffered: list[bytes | bytearray] = []
    fd = os.open(where / "data.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with provider.lock:
            order = [provider.root]  # a row's number is its place here: the root 0, then as first seen
            seen = {id(provider.root): 0}
            for inode in order:  # grows while walked
                children = []
                for name, child in inode.children.items():
                    if id(child) not in seen:
                        seen[id(child)] = len(order)
                        order.append(child)
                    children.append([name, seen[id(child)]])
                rows.append([inode.mode, inode.uid, inode.gid, inode.ino, inode.atime_ns, inode.mtime_ns,
                             inode.ctime_ns, offset, len(inode.data), inode.target, children, inode.rdev])  # fmt: skip
                offset += len(inode.data)
                buffered.append(bytes(inode.data))
                if sum(map(len, buffered)) > 1 << 23 or len(buffered) > 4096:
                    _write_all(fd, b"".join(buffered))
                    buffered.clear()
        _write_all(fd, b"".join(buffered))
        os.fsync(fd)
    finally:
        os.close(fd)
    _write_new(where / "index.json", json.dumps({"inodes": rows}, separators=(",", ":")).encode())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _restore_memory(provider: MemoryProvider, where: Path, mount: str) -> None:
    index = _load_json(where / "index.json", MAX_INDEX_BYTES)
    rows = index.get("inodes") if isinstance(index, dict) else None
    limits = provider.limits
    if not isinstance(rows, list) or not rows or len(rows) > limits.max_nodes:
        raise _bad(f"memory mount {mount}: its index holds no inodes, or more than {limits.max_nodes}")
    inodes: list[_Inode] = []
    spans: list[tuple[int, int]] = []
    total = 0
    for row in rows:
        if not isinstance(row, list) or len(row) not in (11, 12):
            raise _bad(f"memory mount {mount}: an inode row of the wrong shape")
        mode = _int(row[0], 0, 1 << 32, "a mode")
        if stat.S_IFMT(mode) not in _KINDS:
            raise _bad(f"memory mount {mount}: an inode of type {stat.S_IFMT(mode):o}")
        target = row[9]
        if not isinstance(target, str) or len(target) > PATH_MAX or "\0" in target:
            raise _bad(f"memory mount {mount}: a bad symlink target")
        if stat.S_ISLNK(mode) != bool(target):
            raise _bad(f"memory mount {mount}: a symlink without a target, or a target on another type")
        inode = _Inode(mode, _int(row[1], 0, 1 << 32, "a uid"), _int(row[2], 0, 1 << 32, "a gid"),
                       ino=_int(row[3], 1, 1 << 62, "an inode number"), target=target)  # fmt: skip
        inode.atime_ns, inode.mtime_ns, inode.ctime_ns = (_int(t, -_I64, _I64, "a time") for t in row[4:7])
        inode.rdev = _int(row[11], 0, 1 << 32, "a device number") if len(row) == 12 else 0
        if inode.rdev and not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            raise _bad(f"memory mount {mount}: a device number on an inode that is no device")
        size = _int(row[8], 0, limits.memory_bytes + 1, "a file size")
        if size and not stat.S_ISREG(mode):
            raise _bad(f"memory mount {mount}: data on an inode that is no file")
        total += size
        if total > limits.memory_bytes:
            raise _bad(f"memory mount {mount}: more data than its limit of {limits.memory_bytes} bytes")
        spans.append((_int(row[7], 0, _I64, "a data offset"), size))
        inodes.append(inode)
    names = _link_memory(inodes, rows, mount)
    _read_data(where / "data.bin", inodes, spans, mount)
    for inode, count in zip(inodes, names):
        inode.nlink = max(count, 1)
    if len({i.ino for i in inodes}) != len(inodes):
        raise _bad(f"memory mount {mount}: two inodes with one inode number")
    with provider.lock:
        provider.root, provider.nodes, provider.bytes_used = inodes[0], len(inodes), total
    reserve_inos(max(i.ino for i in inodes))


def _link_memory(inodes: list[_Inode], rows: list[Any], mount: str) -> list[int]:
    """Give each directory its children; checks the rows make one tree from the root (files may have several
    names, directories one, the root none) within MAX_DEPTH. Returns each inode's count of names."""
    names = [0] * len(inodes)
    for number, row in enumerate(rows):
        children = row[10]
        if not isinstance(children, list) or (children and not inodes[number].is_dir):
            raise _bad(f"memory mount {mount}: children on an inode that is no directory")
        for pair in children:
            if not isinstance(pair, list) or len(pair) != 2:
                raise _bad(f"memory mount {mount}: a child that is not [name, inode]")
            name, child = _name(pair[0], "a file name"), _int(pair[1], 1, len(inodes), "an inode row")
            if name in inodes[number].children:
                raise _bad(f"memory mount {mount}: {name!r} twice in one directory")
            inodes[number].children[name] = inodes[child]
            names[child] += 1
            if inodes[child].is_dir and names[child] > 1:
                raise _bad(f"memory mount {mount}: a directory with two names")
    if not inodes[0].is_dir:
        raise _bad(f"memory mount {mount}: its root is no directory")
    depth = {id(inodes[0]): 0}
    pending = [inodes[0]]
    while pending:
        inode = pending.pop()
        for below in inode.children.values():
            if id(below) not in depth:
                depth[id(below)] = depth[id(inode)] + 1
                if depth[id(below)] > MAX_DEPTH:
                    raise _bad(f"memory mount {mount}: deeper than {MAX_DEPTH}")
                pending.append(below)
    if len(depth) != len(inodes):
        raise _bad(f"memory mount {mount}: inodes that no name reaches from the root")
    return names


def _read_data(path: Path, inodes: list[_Inode], spans: list[tuple[int, int]], mount: str) -> None:
    fd = _open_regular(path)
    try:
        end = os.fstat(fd).st_size
        for inode, (offset, size) in zip(inodes, spans):
            if offset + size > end:
                raise _bad(f"memory mount {mount}: data past the end of data.bin")
            data = bytearray()
            while len(data) < size:
                chunk = os.pread(fd, min(size - len(data), 1 << 24), offset + len(data))
                if not chunk:
                    raise _bad(f"memory mount {mount}: data.bin shrank while read")
                data += chunk
            inode.data = data
    finally:
        os.close(fd)


# --- host-side overlays ----------------------------------------------------------------------------------------


def _save_overlay(provider: OverlayProvider, where: Path) -> None:
    where.mkdir()
    with provider.lock:
        _copy_tree(Path(provider.upper_path), where / "upper", into=False)
        index = {
            "whiteouts": sorted(list(p) for p in provider.whiteouts),
            "opaque": sorted(list(p) for p in provider.opaque),
            "kept_ino": [[list(p), ino] for p, ino in _shown_inos(provider).items()],
        }
    _write_new(where / "index.json", json.dumps(index, separators=(",", ":")).encode())


def _shown_inos(provider: OverlayProvider) -> dict[tuple[str, ...], int]:
    """The inode number the guest sees for every upper entry: the copy in a restored upper has other host inode
    numbers, so each is kept as a copied-up entry's is (`OverlayProvider.kept_ino`)."""
    shown = dict(provider.kept_ino)
    root = os.lstat(provider.upper_path).st_ino
    shown[()] = provider._ino_base(root, True, ()) ^ root
    pending: list[tuple[str, ...]] = [()]
    while pending:
        path = pending.pop()
        with os.scandir(os.path.join(provider.upper_path, *path)) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                below = path + (entry.name,)
                shown[below] = provider._ino_base(st.st_ino, True, below) ^ st.st_ino
                if stat.S_ISDIR(st.st_mode):
                    pending.append(below)
    return shown


def _restore_overlay(provider: OverlayProvider, where: Path, mount: str) -> None:
    index = _load_json(where / "index.json", MAX_INDEX_BYTES)
    if not isinstance(index, dict):
        raise _bad(f"overlay mount {mount}: its index is not an object")
    whiteouts = {_path(p, mount) for p in _list(index.get("whiteouts"), MAX_SET, "whiteouts")}
    opaque = {_path(p, mount, root=True) for p in _list(index.get("opaque"), MAX_SET, "opaque directories")}
    kept = {}
    for pair in _list(index.get("kept_ino"), MAX_SET, "kept inode numbers"):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _bad(f"overlay mount {mount}: a kept inode number that is not [path, ino]")
        kept[_path(pair[0], mount, root=True)] = _int(pair[1], 0, 1 << 64, "a kept inode number")
    upper = where / "upper"
    _check_tree(upper, mount)
    if os.listdir(provider.upper_path):
        raise VfsStateError(f"overlay mount {mount}: its new upper is not empty; restore needs a fresh router")
    with provider.lock:
        _copy_tree(upper, Path(provider.upper_path), into=True)
        provider.whiteouts, provider.opaque, provider.kept_ino = whiteouts, opaque, kept


def _check_tree(top: Path, mount: str) -> None:
    """A saved upper holds only directories, files, symlinks, FIFOs and sockets, within MAX_DEPTH and MAX_UPPER_ENTRIES."""
    try:
        if not stat.S_ISDIR(os.lstat(top).st_mode):
            raise _bad(f"overlay mount {mount}: its saved upper is no directory")
    except FileNotFoundError:
        raise _bad(f"overlay mount {mount}: its saved upper is missing") from None
    count = 0
    pending: list[tuple[Path, int]] = [(top, 0)]
    while pending:
        directory, depth = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                count += 1
                if count > MAX_UPPER_ENTRIES:
                    raise _bad(f"overlay mount {mount}: more than {MAX_UPPER_ENTRIES} saved entries")
                kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                if kind == stat.S_IFDIR:
                    if depth + 1 > MAX_DEPTH:
                        raise _bad(f"overlay mount {mount}: saved upper deeper than {MAX_DEPTH}")
                    pending.append((Path(entry.path), depth + 1))
                elif kind not in (stat.S_IFREG, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK):
                    raise _bad(
                        f"overlay mount {mount}: {entry.path} is neither file, directory, symlink, FIFO nor socket"
                    )


def _copy_tree(source: Path, target: Path, *, into: bool) -> None:
    """cp -a never follows a symlink in the source; `into` copies the source's entries (and its own metadata)
    into the existing directory `target`, else makes `target` a copy of `source`."""
    src = f"{source}/." if into else str(source)
    done = subprocess.run(["cp", "-a", "--reflink=auto", "--", src, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        raise VfsStateError(f"cannot copy {source} to {target}: {done.stderr.strip()[-500:]}")


# --- small checked pieces ---------------------------------------------------------------------------------------


def _bad(what: str) -> VfsStateError:
    return VfsStateError(f"saved VFS state: {what}; fix: take the snapshot again (it was changed or is damaged)")


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value < hi:
        raise _bad(f"{what} is not an integer in [{lo}, {hi})")
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{what} is not a string")
    try:
        return check_name(value)
    except (FsError, UnicodeError):
        raise _bad(f"{what} {value[:300]!r} is not a file name") from None


def _path(value: Any, mount: str, *, root: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_DEPTH or (not value and not root):
        raise _bad(f"mount {mount}: a path that is not a list of 1 to {MAX_DEPTH} names")
    return tuple(_name(v, "a path's name") for v in value)


def _list(value: Any, most: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > most:
        raise _bad(f"the {what} is not a list of at most {most}")
    return value


def _real_dir(path: Path) -> Path:
    """`path`, a directory itself: a symlink there would take the restore's reads to any host directory."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return path
    except OSError:
        pass
    raise _bad(f"{path} is missing or no directory (a symlink is never followed)")


def _open_regular(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _bad(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _bad(f"{path} is not a regular file")
    return fd


def _load_json(path: Path, most: int) -> Any:
    fd = _open_regular(path)
    try:  # one read: a regular file of at most `most` (< 2 GiB) bytes comes whole
        data = os.pread(fd, most + 1, 0) if os.fstat(fd).st_size <= most else b""
    finally:
        os.close(fd)
    if not data or len(data) > most:
        raise _bad(f"{path} is empty or larger than {most} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise _bad(f"{path} is not JSON") from None


def _write_new(path: Path, data: bytes) -> None:
    """Write a file by rename, so a reader sees all of it or none; never through a symlink."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
