"""The mount router over real providers: routing, nesting, node and handle tables, interception."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from vfs_kit import Guest

from matchlock.api.globs import path_matches
from matchlock.api.vfs import VFSHookRule, VFSInterceptionConfig
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.overlay import OverlayProvider
from matchlock.vfs.router import Mount
from matchlock.vfs.types import Limits
from matchlock.wire import vfs as wire


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print(1)\n")
    return root


async def test_nested_mounts_get_synthesized_parents(host: Path, tmp_path: Path) -> None:
    single = tmp_path / "gitconfig"
    single.write_text("[user]\n")
    guest = Guest([
        Mount("/workspace", MemoryProvider()),
        Mount("/workspace/.host/repo", HostFSProvider(str(host))),
        Mount("/root/.gitconfig", HostFSProvider(str(single), readonly=True), readonly=True),
    ])  # fmt: skip
    try:
        # Only roots under no other mount are for the guest to mount; nesting is the router's.
        assert sorted(guest.roots) == ["/root/.gitconfig", "/workspace"]
        # ENOENT is cached no longer than the shortest validity inside each root (host_fs: 1 s).
        assert {m.path: m.negative_valid_ns for m in guest.router.hello()} == {
            "/workspace": 10**9, "/root/.gitconfig": 10**9,
        }  # fmt: skip
        assert await guest.listdir("/workspace") == [".host"]
        assert await guest.listdir("/workspace/.host") == ["repo"]
        assert stat.S_ISDIR((await guest.stat("/workspace/.host")).mode)
        assert await guest.read("/workspace/.host/repo/src/main.py") == b"print(1)\n"
        assert await guest.read("/root/.gitconfig") == b"[user]\n"
        assert stat.S_ISREG((await guest.stat("/root/.gitconfig")).mode)
        # A synthesized directory has nothing to write into, and mount points cannot be removed.
        parent, _ = await guest.parent("/workspace/.host/new")
        assert await guest.errno_of(wire.Mkdir(parent, 0o755, b"new")) == errno.EROFS
        parent, name = await guest.parent("/workspace/.host/repo")
        assert await guest.errno_of(wire.Rmdir(parent, name)) == errno.EBUSY
        # Across providers a rename is EXDEV, so `mv` copies.
        await guest.write("/workspace/a.txt", b"a")
        src_parent, src_name = await guest.parent("/workspace/a.txt")
        dst_parent = await guest.node("/workspace/.host/repo")
        rename = wire.Rename(src_parent, dst_parent, 0, src_name, b"a.txt")
        assert await guest.errno_of(rename) == errno.EXDEV
    finally:
        guest.close()


async def test_host_fs_round_trip_and_rename_moves_subtree(host: Path) -> None:
    guest = Guest([Mount("/w", HostFSProvider(str(host)))])
    try:
        await guest.mkdir("/w/dir")
        await guest.write("/w/dir/f.txt", b"hello")
        assert (host / "dir" / "f.txt").read_bytes() == b"hello"
        (host / "from-host.txt").write_text("x")
        assert "from-host.txt" in await guest.listdir("/w", plus=True)
        node = await guest.node("/w/dir/f.txt")
        await guest.rename("/w/dir", "/w/moved")
        # The node that was looked up before the rename now names the new place.
        reply = await guest.call(wire.Getattr(node, 0))
        assert isinstance(reply, wire.AttrReply) and reply.attr.size == 5
        assert (host / "moved" / "f.txt").exists() and not (host / "dir").exists()
        await guest.truncate("/w/moved/f.txt", 3 << 20)  # any size, not only 0
        assert (host / "moved" / "f.txt").stat().st_size == 3 << 20
        await guest.symlink("/w/link", "moved/f.txt")
        link = await guest.call(wire.Readlink(await guest.node("/w/link")))
        assert link == b"moved/f.txt"
        await guest.unlink("/w/link")
        await guest.unlink("/w/moved/f.txt")
        await guest.rmdir("/w/moved")
        assert sorted(os.listdir(host)) == ["from-host.txt", "src"]
    finally:
        guest.close()


async def test_read_only_refuses_every_mutation(host: Path) -> None:
    guest = Guest([Mount("/ro", HostFSProvider(str(host), readonly=True), readonly=True)])
    try:
        root = await guest.node("/ro")
        src = await guest.node("/ro/src")
        main = await guest.node("/ro/src/main.py")
        refused = [
            wire.Create(root, os.O_RDWR, 0o644, b"new"),
            wire.Mkdir(root, 0o755, b"d"),
            wire.Unlink(src, b"main.py"),
            wire.Rmdir(root, b"src"),
            wire.Rename(src, root, 0, b"main.py", b"x"),
            wire.Link(main, root, b"hard"),
            wire.Symlink(root, b"s", b"src"),
            wire.Setattr(main, wire.SET_MODE, 0, 0, 0, 0, 0o777, 0, 0),
            wire.Setattr(main, wire.SET_SIZE, 0, 0, 0, 0, 0, 0, 0),
            wire.Open(main, os.O_WRONLY),
            wire.Open(main, os.O_RDONLY | os.O_TRUNC),
        ]
        for args in refused:
            assert await guest.errno_of(args) == errno.EROFS, args
        assert await guest.read("/ro/src/main.py") == b"print(1)\n"
        assert (host / "src" / "main.py").read_text() == "print(1)\n"
    finally:
        guest.close()


async def test_owner_ids_are_presented_and_fixed(host: Path) -> None:
    guest = Guest([Mount("/w", HostFSProvider(str(host), owner_uid=1000, owner_gid=1001))])
    try:
        attr = await guest.stat("/w/src/main.py")
        assert (attr.uid, attr.gid) == (1000, 1001)
        main = await guest.node("/w/src/main.py")
        chown = wire.Setattr(main, wire.SET_UID, 0, 0, 0, 0, 0, 0, 0)
        assert await guest.errno_of(chown) == errno.EPERM
    finally:
        guest.close()


async def test_host_fs_never_keeps_setid_bits(host: Path) -> None:
    guest = Guest([Mount("/w", HostFSProvider(str(host)))])
    try:
        await guest.write("/w/prog", b"#!/bin/sh\n", mode=0o4755)
        assert not (host / "prog").stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
        await guest.chmod("/w/prog", 0o6755)
        assert stat.S_IMODE((host / "prog").stat().st_mode) == 0o755
    finally:
        guest.close()


async def test_block_rule_gives_eperm_and_events_name_guest_paths(host: Path) -> None:
    rules = (VFSHookRule(name="no-secrets", phase="before", ops=("create",), path="/w/*.key", action="block"),)
    guest = Guest([Mount("/w", HostFSProvider(str(host)))], VFSInterceptionConfig(emit_events=True, rules=rules))
    try:
        root = await guest.node("/w")
        assert await guest.errno_of(wire.Create(root, os.O_RDWR, 0o600, b"id.key")) == errno.EPERM
        assert not (host / "id.key").exists()
        await guest.write("/w/notes.txt", b"12345")
        ops = [(e.op, e.path, e.size) for e in guest.events if e.path == "/w/notes.txt"]
        assert ("create", "/w/notes.txt", 0) in ops and ("write", "/w/notes.txt", 5) in ops
        assert ("close", "/w/notes.txt", 0) in ops
        assert await guest.read("/w/notes.txt") == b"12345"
        assert ("read", "/w/notes.txt", 5) in [(e.op, e.path, e.size) for e in guest.events]
    finally:
        guest.close()


async def test_a_truncate_rule_refuses_an_open_with_o_trunc_before_the_bytes_go(host: Path) -> None:
    # `echo x > keep.txt` truncates in the OPEN: a rule refusing truncate (and write) left the file empty.
    rules = (VFSHookRule(phase="before", ops=("write", "truncate"), path="/w/src/main.py", action="block"),)
    guest = Guest([Mount("/w", HostFSProvider(str(host)))], VFSInterceptionConfig(rules=rules))
    try:
        node = await guest.node("/w/src/main.py")
        assert await guest.errno_of(wire.Open(node, os.O_WRONLY | os.O_TRUNC)) == errno.EPERM
        assert await guest.errno_of(wire.Setattr(node, wire.SET_SIZE, 0, 0, 0, 0, 0, 0, 0)) == errno.EPERM
        assert (host / "src" / "main.py").read_text() == "print(1)\n"
        opened = await guest.call(wire.Open(node, os.O_RDONLY))  # reading is still allowed
        assert isinstance(opened, wire.Opened)
        await guest.call(wire.Release(node, opened.fh))
        await guest.write("/w/other.txt", b"old")
        await guest.write("/w/other.txt", b"new")  # elsewhere an O_TRUNC open is an open and a truncate
        assert ("truncate", "/w/other.txt") in [(e.op, e.path) for e in guest.events]
    finally:
        guest.close()


async def test_a_non_root_guest_user_owns_what_it_makes_on_host_fs(host: Path) -> None:
    # Before, everything was the mount root's owner's: `-u 1000` made a file and could not append to it.
    os.chown(host, 4321, 4322)
    guest = Guest([Mount("/w", HostFSProvider(str(host)))])
    try:
        await guest.write("/w/by-root", b"r")
        guest.uid, guest.gid = 1000, 1001
        await guest.write("/w/by-user", b"u")
        await guest.mkdir("/w/dir-by-user")
        await guest.symlink("/w/link-by-user", "by-user")
        owners = {name: (os.lstat(host / name).st_uid, os.lstat(host / name).st_gid)
                  for name in ("by-root", "by-user", "dir-by-user", "link-by-user")}  # fmt: skip
        if os.geteuid() == 0:
            assert owners == {"by-root": (4321, 4322), "by-user": (1000, 1001), "dir-by-user": (1000, 1001),
                              "link-by-user": (1000, 1001)}  # fmt: skip
            assert (await guest.stat("/w/by-user")).uid == 1000  # what the guest kernel checks access by
        else:  # without root nothing can be given away: all the host process's
            assert set(owners.values()) == {(os.geteuid(), os.getegid())}
    finally:
        guest.close()


async def test_fixed_owners_keep_the_mount_roots_owner_on_the_host(host: Path) -> None:
    os.chown(host, 4321, 4322)
    guest = Guest([Mount("/w", HostFSProvider(str(host), owner_uid=7, owner_gid=8))], uid=1000, gid=1001)
    try:
        await guest.write("/w/f", b"x")
        st = os.lstat(host / "f")
        expected = (4321, 4322) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        assert (st.st_uid, st.st_gid) == expected and (await guest.stat("/w/f")).uid == 7
    finally:
        guest.close()


def test_globs_do_not_cross_slashes() -> None:
    assert path_matches("/workspace/*", "/workspace/a.txt")
    assert not path_matches("/workspace/*", "/workspace/a/b.txt")
    assert path_matches("/w/[^a]?.py", "/w/bc.py")
    assert not path_matches("/w/[^a]?.py", "/w/ac.py")
    assert not path_matches("/w/[a", "/w/[a")  # malformed, as Go's ErrBadPattern: matches nothing


async def test_tables_are_bounded_and_forget_frees_nodes(host: Path) -> None:
    for n in range(5):
        (host / f"f{n}").write_text("x")
    guest = Guest([Mount("/w", HostFSProvider(str(host)))], limits=Limits(max_nodes=4, max_handles=2))
    try:
        root = await guest.node("/w")
        nodes = []
        for n in range(3):  # the root is the first of the 4
            entry = await guest.call(wire.Lookup(root, f"f{n}".encode()))
            assert isinstance(entry, wire.Entry)
            nodes.append(entry.node)
        assert await guest.errno_of(wire.Lookup(root, b"f3")) == errno.ENFILE
        guest.router.forget(((nodes[0], 1),))
        assert await guest.errno_of(wire.Lookup(root, b"f3")) == 0
        assert await guest.errno_of(wire.Getattr(nodes[0], 0)) == errno.ESTALE
        for node in nodes[1:]:
            await guest.call(wire.Open(node, os.O_RDONLY))
        assert await guest.errno_of(wire.Opendir(root, 0)) == errno.EMFILE
    finally:
        guest.close()


async def test_reads_are_bounded(host: Path) -> None:
    guest = Guest([Mount("/w", HostFSProvider(str(host)))], limits=Limits(max_io=4096))
    try:
        node = await guest.node("/w/src/main.py")
        opened = await guest.call(wire.Open(node, os.O_RDONLY))
        assert isinstance(opened, wire.Opened)
        assert await guest.errno_of(wire.Read(node, opened.fh, 0, 8192)) == errno.EINVAL
        assert await guest.errno_of(wire.Read(node, opened.fh, 1 << 63, 10)) == errno.EINVAL
        assert await guest.errno_of(wire.Read(node, 999, 0, 10)) == errno.EBADF
    finally:
        guest.close()


async def test_unknown_nodes_are_stale(host: Path) -> None:
    guest = Guest([Mount("/w", HostFSProvider(str(host)))])
    try:
        assert await guest.errno_of(wire.Getattr(12345, 0)) == errno.ESTALE
        assert await guest.errno_of(wire.Lookup(12345, b"x")) == errno.ESTALE
    finally:
        guest.close()


@pytest.mark.parametrize("plus", [0, 1])
async def test_no_directory_entry_has_inode_zero(host: Path, plus: int) -> None:
    # glibc's readdir skips entries with d_ino 0 as deleted: `ls -a` would lose '.' and '..'.
    guest = Guest([Mount("/w", MemoryProvider()), Mount("/w/nested", HostFSProvider(str(host)))])
    try:
        node = await guest.node("/w")
        opened = await guest.call(wire.Opendir(node, 0))
        assert isinstance(opened, wire.Opened)
        page = await guest.call(wire.Readdir(node, opened.fh, 0, 4096, plus))
        assert isinstance(page, tuple)
        assert [e.name for e in page] == [b".", b"..", b"nested"]
        assert all(e.ino != 0 for e in page)
    finally:
        guest.close()


async def test_an_unlinked_open_file_still_reads_and_writes_under_interception(host: Path) -> None:
    guest = Guest([Mount("/w", HostFSProvider(str(host)))], VFSInterceptionConfig(emit_events=True))
    try:
        node = await guest.node("/w/src/main.py")
        opened = await guest.call(wire.Open(node, os.O_RDWR))
        assert isinstance(opened, wire.Opened)
        await guest.unlink("/w/src/main.py")
        assert await guest.call(wire.Write(node, opened.fh, 0, os.O_RDWR, b"PRINT")) == wire.Written(5)
        assert await guest.call(wire.Read(node, opened.fh, 0, 9)) == b"PRINT(1)\n"
        reply = await guest.call(wire.Getattr(node, opened.fh))
        assert isinstance(reply, wire.AttrReply) and reply.attr.nlink == 0
    finally:
        guest.close()


def test_a_private_mount_caches_enoent_long(host: Path) -> None:
    guest = Guest([Mount("/scratch", MemoryProvider()), Mount("/h", HostFSProvider(str(host)))])
    try:
        assert {m.path: m.negative_valid_ns for m in guest.router.hello()} == {"/scratch": 3600 * 10**9, "/h": 10**9}
    finally:
        guest.close()


def _one_mount(host: Path, provider: str) -> Guest:
    return Guest([Mount("/w", MemoryProvider() if provider == "memory" else HostFSProvider(str(host)))])


async def _written_and_opened(guest: Guest, path: str, data: bytes) -> tuple[int, wire.Opened]:
    await guest.write(path, data)
    node = await guest.node(path)
    opened = await guest.call(wire.Open(node, os.O_RDONLY))
    assert isinstance(opened, wire.Opened)
    return node, opened


@pytest.mark.parametrize("provider", ["memory", "host_fs"])
async def test_a_hard_linked_file_is_never_cached(host: Path, provider: str) -> None:
    # Nodes are names, so the guest kernel holds one inode per name of a hard-linked file: neither
    # may cache attributes or pages, or a write through one name leaves the other's size stale.
    guest = _one_mount(host, provider)
    try:
        plain, opened = await _written_and_opened(guest, "/w/plain", b"y\n")
        single_flags = opened.flags
        parent, _ = await guest.parent("/w/hard")
        entry = await guest.call(wire.Link(plain, parent, b"hard"))
        assert isinstance(entry, wire.Entry) and entry.attr.nlink == 2
        assert entry.attr_valid_ns == 0 and entry.entry_valid_ns > 0
        reply = await guest.call(wire.Getattr(plain, 0))
        assert isinstance(reply, wire.AttrReply) and reply.attr.nlink == 2 and reply.attr_valid_ns == 0
        reopened = await guest.call(wire.Open(plain, os.O_RDONLY))
        assert isinstance(reopened, wire.Opened) and not reopened.flags & wire.OPEN_KEEP_CACHE
        if provider == "memory":  # a private mount keeps a single-named file's pages across opens
            assert single_flags & wire.OPEN_KEEP_CACHE
        await guest.unlink("/w/hard")
        reply = await guest.call(wire.Getattr(plain, 0))
        assert isinstance(reply, wire.AttrReply) and reply.attr.nlink == 1 and reply.attr_valid_ns > 0
    finally:
        guest.close()


@pytest.mark.parametrize("provider", ["memory", "host_fs"])
async def test_a_hard_linked_fifo_is_never_cached_either(host: Path, provider: str) -> None:
    # pjdfstest link/00.t: after a chmod through one name of a FIFO, the other name showed the old mode
    # and nlink, because only regular files were treated as linked.
    guest = _one_mount(host, provider)
    try:
        parent = await guest.node("/w")
        made = await guest.call(wire.Mknod(parent, stat.S_IFIFO | 0o644, 0, b"fifo"))
        assert isinstance(made, wire.Entry) and made.attr_valid_ns > 0  # one name: cached
        entry = await guest.call(wire.Link(made.node, parent, b"again"))
        assert isinstance(entry, wire.Entry) and entry.attr.nlink == 2 and entry.attr_valid_ns == 0
        reply = await guest.call(wire.Getattr(made.node, 0))
        assert isinstance(reply, wire.AttrReply) and reply.attr.nlink == 2 and reply.attr_valid_ns == 0
    finally:
        guest.close()


@pytest.mark.parametrize("provider", ["host_fs", "overlay"])
async def test_new_files_keep_the_guests_mode_whatever_the_hosts_umask(host: Path, tmp_path: Path, provider: str):
    # pjdfstest open/02.t: the guest kernel applies the guest's umask; the host's 022 stripped g+w again.
    previous = os.umask(0o022)
    try:
        made = HostFSProvider(str(host)) if provider == "host_fs" else OverlayProvider(str(host), str(tmp_path / "up"))
    finally:
        os.umask(previous)
    guest = Guest([Mount("/w", made)])
    try:
        parent = await guest.node("/w")
        created = await guest.call(wire.Create(parent, os.O_RDWR, 0o620, b"file"))
        assert isinstance(created, wire.Created) and stat.S_IMODE(created.entry.attr.mode) == 0o620
        await guest.mkdir("/w/dir", 0o777)
        fifo = await guest.call(wire.Mknod(parent, stat.S_IFIFO | 0o662, 0, b"fifo"))
        assert isinstance(fifo, wire.Entry)
        modes = {name: stat.S_IMODE((await guest.stat(f"/w/{name}")).mode) for name in ("file", "dir", "fifo")}
        assert modes == {"file": 0o620, "dir": 0o777, "fifo": 0o662}
    finally:
        guest.close()


@pytest.mark.parametrize("provider", ["memory", "host_fs"])
async def test_fstat_of_an_unlinked_open_file_answers_from_its_handle(host: Path, provider: str) -> None:
    # pjdfstest unlink/14.t: open, unlink, fstat. The kernel's GETATTR for fstat carries no fh, and the
    # name is gone, so the router answered ESTALE; an open handle on the node answers instead (nlink 0).
    guest = _one_mount(host, provider)
    try:
        node, opened = await _written_and_opened(guest, "/w/f", b"Hello")
        await guest.unlink("/w/f")
        reply = await guest.call(wire.Getattr(node, 0))
        assert isinstance(reply, wire.AttrReply) and (reply.attr.nlink, reply.attr.size) == (0, 5)
        await guest.call(wire.Release(node, opened.fh))
        # Closed: nothing answers. ESTALE makes the guest kernel walk the path again (and find it gone).
        assert await guest.errno_of(wire.Getattr(node, 0)) == errno.ESTALE
    finally:
        guest.close()
