"""vfs/snapshot.py: a router's VFS state saved and restored into a freshly built router (memory, overlay, nodes)."""

from __future__ import annotations

import errno
import itertools
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from vfs_kit import Guest

from matchlock.vfs import snapshot
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.overlay import OverlayProvider
from matchlock.vfs.router import Mount
from matchlock.vfs.types import FsError
from matchlock.wire import vfs as wire

_sandboxes = itertools.count()


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    lower, shared = tmp_path / "lower", tmp_path / "shared"
    (lower / "pkg" / "sub").mkdir(parents=True)
    (lower / "pkg" / "a.py").write_text("a = 1\n")
    (lower / "pkg" / "sub" / "b.py").write_text("b = 2\n")
    (lower / "gone.txt").write_text("deleted by the guest\n")
    (lower / "old").mkdir()
    (lower / "old" / "inside.txt").write_text("hidden once old is made again\n")
    shared.mkdir()
    (shared / "host.txt").write_text("on the host\n")
    return {"lower": lower, "shared": shared, "root": tmp_path}


def build(dirs: dict[str, Path]) -> Guest:
    """A sandbox's router as sandbox/vfs.py builds it: each call a fresh one with its own overlay upper."""
    sandbox = dirs["root"] / f"sandbox-{next(_sandboxes)}"
    return Guest([
        Mount("/h", HostFSProvider(str(dirs["shared"]), ino_base=3 << 56)),
        Mount("/m", MemoryProvider()),
        Mount("/o", OverlayProvider(str(dirs["lower"]), str(sandbox / "vfs" / "overlay-2"), ino_base=2 << 56)),
    ])  # fmt: skip


def memory_tree(provider: MemoryProvider) -> dict[str, tuple]:
    out = {}
    pending: list[tuple[tuple[str, ...], Any]] = [((), provider.root)]
    while pending:
        path, inode = pending.pop()
        out["/".join(path)] = (inode.mode, inode.uid, inode.gid, inode.ino, inode.nlink, inode.atime_ns,
                               inode.mtime_ns, inode.ctime_ns, bytes(inode.data), inode.target, inode.rdev)  # fmt: skip
        pending += [(path + (name,), child) for name, child in inode.children.items()]
    return out


def provider(guest: Guest, path: str) -> object:
    return next(m.provider for m in guest.router.mounts if m.path == path)


async def test_a_memory_tree_round_trips_with_modes_owners_times_links_and_data(dirs: dict[str, Path]) -> None:
    guest, fresh = build(dirs), build(dirs)
    try:
        await guest.mkdir("/m/dir", 0o750)
        await guest.write("/m/dir/f.bin", bytes(range(256)) * 40, 0o640)
        await guest.write("/m/empty", b"")
        await guest.symlink("/m/dir/ln", "../empty")
        await guest.call(wire.Link(await guest.node("/m/dir/f.bin"), await guest.node("/m"), b"hard"))
        await guest.call(wire.Mknod(await guest.node("/m"), stat.S_IFCHR | 0o600, os.makedev(4, 5), b"tty"))
        await guest.call(wire.Setattr(await guest.node("/m/dir/f.bin"), wire.SET_UID | wire.SET_GID | wire.SET_MTIME,
                                      0, 0, 0, 123_456_789_012, 0, 1000, 1001))  # fmt: skip
        memory = provider(guest, "/m")
        assert isinstance(memory, MemoryProvider)
        saved = memory_tree(memory)
        snapshot.save(guest.router, dirs["root"] / "snap", with_nodes=False)
        snapshot.restore(fresh.router, dirs["root"] / "snap", with_nodes=False)
        restored = provider(fresh, "/m")
        assert isinstance(restored, MemoryProvider)
        assert memory_tree(restored) == saved
        assert restored.root.children["hard"] is restored.root.children["dir"].children["f.bin"]  # one inode
        assert (memory.nodes, memory.bytes_used) == (6, 10240)
        assert (restored.nodes, restored.bytes_used) == (6, 10240)  # the limits count what was saved
        assert (await fresh.stat("/m/tty")).rdev == os.makedev(4, 5)
        assert await fresh.read("/m/hard") == bytes(range(256)) * 40
        assert (await fresh.stat("/m/dir/f.bin")).mtime_ns == 123_456_789_012
        await fresh.write("/m/new", b"x")  # a new inode never takes a saved inode number
        assert restored.root.children["new"].ino not in {row[3] for row in saved.values()}
    finally:
        guest.close()
        fresh.close()


async def test_an_overlay_upper_round_trips_with_whiteouts_opaque_dirs_and_kept_inodes(
    dirs: dict[str, Path],
) -> None:
    guest, fresh = build(dirs), build(dirs)
    before = sorted((p.relative_to(dirs["lower"]), p.lstat().st_mtime_ns) for p in dirs["lower"].rglob("*"))
    try:
        await guest.write("/o/pkg/a.py", b"a = 2\n")  # a copy-up
        await guest.unlink("/o/gone.txt")  # a whiteout
        await guest.unlink("/o/old/inside.txt")
        await guest.rmdir("/o/old")
        await guest.mkdir("/o/old")  # opaque: the lower one no longer shows
        await guest.symlink("/o/pkg/ln", "a.py")
        await guest.call(wire.Link(await guest.node("/o/pkg/a.py"), await guest.node("/o"), b"hard"))
        await guest.chmod("/o/pkg/sub/b.py", 0o600)
        sock = wire.Mknod(await guest.node("/o/pkg"), stat.S_IFSOCK | 0o755, 0, b"app.sock")  # a bind() there
        assert isinstance(await guest.call(sock), wire.Entry)
        view = {}
        for path in ("/o", "/o/pkg", "/o/old", "/o/pkg/sub"):
            view[path] = await guest.listdir(path)
        paths = ("/o", "/o/pkg/a.py", "/o/hard", "/o/pkg/sub/b.py", "/o/pkg/ln", "/o/pkg/app.sock")
        attrs = {p: await guest.stat(p) for p in paths}
        snapshot.save(guest.router, dirs["root"] / "snap", with_nodes=False)
        snapshot.restore(fresh.router, dirs["root"] / "snap", with_nodes=False)
        for path, names in view.items():
            assert await fresh.listdir(path) == names
        assert "gone.txt" not in view["/o"] and view["/o/old"] == []
        for path, attr in attrs.items():
            got = await fresh.stat(path)
            assert (got.ino, got.mode, got.size, got.mtime_ns, got.nlink) == (
                attr.ino, attr.mode, attr.size, attr.mtime_ns, attr.nlink)  # fmt: skip
        assert await fresh.read("/o/hard") == b"a = 2\n"
        await fresh.write("/o/hard", b"a = 3\n")  # still one file in the restored upper
        assert await fresh.read("/o/pkg/a.py") == b"a = 3\n"
        assert await guest.read("/o/pkg/a.py") == b"a = 2\n"  # the copies are apart
        after = sorted((p.relative_to(dirs["lower"]), p.lstat().st_mtime_ns) for p in dirs["lower"].rglob("*"))
        assert after == before and (dirs["lower"] / "pkg" / "a.py").read_text() == "a = 1\n"
    finally:
        guest.close()
        fresh.close()


async def test_nodes_and_handles_survive_a_restore_and_new_ids_never_collide(dirs: dict[str, Path]) -> None:
    guest, fresh = build(dirs), build(dirs)
    try:
        writers = {}
        for path in ("/m/w.txt", "/o/pkg/w.txt", "/h/w.txt"):
            parent, name = await guest.parent(path)
            created = await guest.call(wire.Create(parent, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, name))
            assert isinstance(created, wire.Created)
            await guest.call(wire.Write(created.entry.node, created.fh, 0, os.O_RDWR, b"before "))
            writers[path] = (created.entry.node, created.fh)
        doomed = await guest.node("/o/pkg/a.py")
        opened = await guest.call(wire.Open(doomed, os.O_RDONLY))
        assert isinstance(opened, wire.Opened)
        await guest.unlink("/o/pkg/a.py")  # unlinked while open: its restored handle has no file
        directory = await guest.node("/o/pkg")
        dir_opened = await guest.call(wire.Opendir(directory, 0))
        assert isinstance(dir_opened, wire.Opened)
        await guest.call(wire.Readdir(directory, dir_opened.fh, 0, 4096, 0))
        saved_ids, saved_fhs = set(guest.router.nodes), set(guest.router.handles)
        snapshot.save(guest.router, dirs["root"] / "snap", with_nodes=True)
        snapshot.restore(fresh.router, dirs["root"] / "snap", with_nodes=True)
        assert set(fresh.router.nodes) == saved_ids and set(fresh.router.handles) == saved_fhs
        for node, fh in writers.values():  # writable through the same fh
            assert await fresh.call(wire.Write(node, fh, 7, os.O_RDWR, b"after")) == wire.Written(5)
            assert await fresh.call(wire.Read(node, fh, 0, 64)) == b"before after"
            reply = await fresh.call(wire.Getattr(node, 0))  # and the node still names it
            assert isinstance(reply, wire.AttrReply) and reply.attr.size == 12
        assert (dirs["shared"] / "w.txt").read_bytes() == b"before after"  # host_fs: the same host file
        for request in (wire.Read(doomed, opened.fh, 0, 9), wire.Getattr(doomed, opened.fh)):
            assert await fresh.errno_of(request) == errno.ESTALE
        assert await fresh.errno_of(wire.Release(doomed, opened.fh)) == 0
        page = await fresh.call(wire.Readdir(directory, dir_opened.fh, 0, 4096, 0))  # listed again
        assert isinstance(page, tuple) and b"w.txt" in {e.name for e in page} and b"a.py" not in {e.name for e in page}
        await fresh.write("/m/later.txt", b"new")
        new_node = await fresh.node("/m/later.txt")
        new_open = await fresh.call(wire.Open(new_node, os.O_RDONLY))
        assert isinstance(new_open, wire.Opened)
        assert new_node > max(saved_ids) and new_open.fh > max(saved_fhs)
    finally:
        guest.close()
        fresh.close()


async def test_a_handle_whose_file_is_gone_on_the_host_answers_estale(dirs: dict[str, Path]) -> None:
    guest, fresh = build(dirs), build(dirs)
    try:
        node = await guest.node("/h/host.txt")
        opened = await guest.call(wire.Open(node, os.O_RDWR | os.O_APPEND | os.O_TRUNC))
        assert isinstance(opened, wire.Opened)
        snapshot.save(guest.router, dirs["root"] / "snap", with_nodes=True)
        (dirs["shared"] / "host.txt").unlink()
        (dirs["shared"] / "host.txt").mkdir()  # another thing at its path: never opened in its place
        snapshot.restore(fresh.router, dirs["root"] / "snap", with_nodes=True)
        restored = fresh.router.handles[opened.fh].handle
        assert isinstance(restored, snapshot.Gone)
        with pytest.raises(FsError) as caught:
            restored.write(0, b"x")
        assert caught.value.errno == errno.ESTALE
    finally:
        guest.close()
        fresh.close()


async def test_a_handle_whose_host_file_was_replaced_never_reaches_the_new_file(dirs: dict[str, Path]) -> None:
    guest, fresh = build(dirs), build(dirs)
    try:
        node = await guest.node("/h/host.txt")
        opened = await guest.call(wire.Open(node, os.O_RDWR))
        assert isinstance(opened, wire.Opened)
        snapshot.save(guest.router, dirs["root"] / "snap", with_nodes=True)
        (dirs["root"] / "new.txt").write_text("another file\n")  # an editor's save: a new inode at the path
        os.replace(dirs["root"] / "new.txt", dirs["shared"] / "host.txt")
        snapshot.restore(fresh.router, dirs["root"] / "snap", with_nodes=True)
        assert isinstance(fresh.router.handles[opened.fh].handle, snapshot.Gone)
        assert await fresh.errno_of(wire.Write(node, opened.fh, 0, os.O_RDWR, b"x")) == errno.ESTALE
        assert (dirs["shared"] / "host.txt").read_text() == "another file\n"
    finally:
        guest.close()
        fresh.close()


async def test_a_reopened_handle_keeps_its_flags_but_never_truncates_again(dirs: dict[str, Path]) -> None:
    guest, fresh = build(dirs), build(dirs)
    try:
        await guest.write("/m/log", b"")
        node = await guest.node("/m/log")
        opened = await guest.call(wire.Open(node, os.O_WRONLY | os.O_APPEND | os.O_TRUNC))
        assert isinstance(opened, wire.Opened)
        await guest.call(wire.Write(node, opened.fh, 0, os.O_WRONLY, b"one "))
        snapshot.save(guest.router, dirs["root"] / "snap", with_nodes=True)
        snapshot.restore(fresh.router, dirs["root"] / "snap", with_nodes=True)
        await fresh.call(wire.Write(node, opened.fh, 0, os.O_WRONLY, b"two"))  # O_APPEND: at the end
        assert await fresh.read("/m/log") == b"one two"
        assert stat.S_ISREG((await fresh.stat("/m/log")).mode)
    finally:
        guest.close()
        fresh.close()


async def test_nested_mounts_restore_their_nodes_and_handles_through_one_top(dirs: dict[str, Path]) -> None:
    def nested() -> Guest:
        upper = dirs["root"] / f"sandbox-{next(_sandboxes)}" / "vfs" / "overlay-1"
        return Guest([
            Mount("/w", MemoryProvider()),
            Mount("/w/ov", OverlayProvider(str(dirs["lower"]), str(upper), ino_base=2 << 56)),
            Mount("/w/shared", HostFSProvider(str(dirs["shared"]), ino_base=3 << 56)),
        ])  # fmt: skip

    guest, fresh = nested(), nested()
    try:
        await guest.write("/w/top.txt", b"memory")
        handles = {}
        for path in ("/w/top.txt", "/w/ov/pkg/a.py", "/w/shared/host.txt"):
            node = await guest.node(path)
            opened = await guest.call(wire.Open(node, os.O_RDWR))
            assert isinstance(opened, wire.Opened)
            handles[path] = (node, opened.fh)
        snapshot.save(guest.router, dirs["root"] / "snap", with_nodes=True)
        snapshot.restore(fresh.router, dirs["root"] / "snap", with_nodes=True)
        assert fresh.router.hello() == guest.router.hello()  # one top, the same root node
        for node, fh in handles.values():
            assert await fresh.call(wire.Write(node, fh, 0, os.O_RDWR, b"X")) == wire.Written(1)
            data = await fresh.call(wire.Read(node, fh, 0, 3))
            assert isinstance(data, bytes) and data[:1] == b"X"
        assert sorted(await fresh.listdir("/w")) == ["ov", "shared", "top.txt"]
        assert (dirs["shared"] / "host.txt").read_text().startswith("X")
        assert (dirs["lower"] / "pkg" / "a.py").read_text() == "a = 1\n"
    finally:
        guest.close()
        fresh.close()
