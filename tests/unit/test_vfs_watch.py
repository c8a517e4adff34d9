"""host_fs change notification: real inotify on a temporary tree, through the router, no mocks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from vfs_kit import Guest

from matchlock.vfs import notify
from matchlock.vfs.hostdir import HostDir
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.router import Mount
from matchlock.vfs.watch import Inotify, TreeWatch
from matchlock.wire import vfs as wire
from matchlock.wire.frames import LocalProtocolError, RemoteProtocolError

TRIES = 200  # polls of 20 ms: events arrive in well under that, this only bounds a broken test


def _tree(tmp_path: Path) -> tuple[Inotify, TreeWatch]:
    inotify = Inotify()
    tree = TreeWatch(inotify, HostDir(str(tmp_path)))
    tree.start()
    return inotify, tree


def _pump(inotify: Inotify, tree: TreeWatch) -> dict[tuple[str, ...], bool]:
    for event in inotify.read():
        tree.event(*event)
    tree.settle()
    return tree.take()


def test_the_tree_follows_renames_and_new_directories(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    inotify, tree = _tree(tmp_path)
    try:
        assert len(tree.dirs) == 3
        (tmp_path / "a" / "deep" / "f").write_text("x")
        assert _pump(inotify, tree) == {("a", "deep", "f"): True}
        (tmp_path / "a").rename(tmp_path / "b")  # the watched subtree moves with it
        (tmp_path / "b" / "deep" / "f").write_text("yy")
        assert _pump(inotify, tree) == {("a",): True, ("b",): True, ("b", "deep", "f"): False}
        (tmp_path / "new").mkdir()  # a directory made before its watch: its entries are reported
        (tmp_path / "new" / "early").write_text("z")
        changes = _pump(inotify, tree)
        assert changes[("new",)] is True and changes[("new", "early")] is True
        assert len(tree.dirs) == 4
        (tmp_path / "new" / "early").unlink()
        (tmp_path / "new").rmdir()
        assert _pump(inotify, tree) == {("new", "early"): True, ("new",): True}
        assert len(tree.dirs) == 3
    finally:
        tree.close()
        inotify.close()


def test_a_directory_moved_out_is_no_longer_watched(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    inotify = Inotify()
    tree = TreeWatch(inotify, HostDir(str(tmp_path / "in")))
    tree.start()
    try:
        assert len(tree.dirs) == 2
        (tmp_path / "in" / "sub").rename(tmp_path / "out" / "sub")
        assert _pump(inotify, tree) == {("sub",): True}
        assert len(tree.dirs) == 1
        (tmp_path / "out" / "sub" / "f").write_text("x")  # outside the mount now: nothing
        assert _pump(inotify, tree) == {}
    finally:
        tree.close()
        inotify.close()


def test_the_walk_never_leaves_the_root_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "secret")
    inotify = Inotify()
    tree = TreeWatch(inotify, HostDir(str(tmp_path / "root")))
    tree.start()
    try:
        assert len(tree.dirs) == 1
        (tmp_path / "secret" / "f").write_text("x")
        assert _pump(inotify, tree) == {}
    finally:
        tree.close()
        inotify.close()


def test_more_directories_than_the_cap_fail_the_watch(tmp_path: Path) -> None:
    for name in "abc":
        (tmp_path / name).mkdir()
    inotify = Inotify()
    tree = TreeWatch(inotify, HostDir(str(tmp_path)), cap=3)
    tree.start()
    try:
        assert "more than 3 directories" in tree.failed
    finally:
        tree.close()
        inotify.close()


# --- through the router -------------------------------------------------------------------------------


class Sent:
    """The guest's end of the notices: frames the server would send, decoded."""

    def __init__(self) -> None:
        self.notices: list[tuple[int, int, bytes]] = []

    def __call__(self, frames: bytes) -> None:
        decoder = wire.ReplyDecoder()
        for reply in decoder.feed(frames):
            assert reply.id == wire.NOTICE_ID
            self.notices.append(wire.decode_notice(reply.payload))

    async def until(self, notice: tuple[int, int, bytes]) -> None:
        for _ in range(TRIES):
            if notice in self.notices:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no notice {notice} in {self.notices}")


async def _watched(host: Path, cap: int | None = None, readonly: bool = False) -> tuple[Guest, Sent]:
    guest = Guest([Mount("/data", HostFSProvider(str(host), readonly=readonly), readonly)])
    if cap is not None:
        guest.router.notifier.cap = cap
    sent = await _started(guest)
    assert guest.router.notifier.walked
    return guest, sent


async def _started(guest: Guest) -> Sent:
    """Starts the guest's notifier and waits (bounded) for its first walk of the watched trees."""
    sent = Sent()
    guest.router.notifier.start(sent)
    for _ in range(TRIES):
        if guest.router.notifier.walked:
            break
        await asyncio.sleep(0.02)
    return sent


@pytest.fixture
def host(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.txt").write_text("one")
    (root / "top.txt").write_text("top")
    return root


async def test_host_changes_invalidate_what_the_guest_holds(host: Path) -> None:
    guest, sent = await _watched(host)
    try:
        entry = await guest.call(wire.Lookup(guest.roots["/data"], b"src"))
        assert isinstance(entry, wire.Entry)
        assert entry.entry_valid_ns == entry.attr_valid_ns == int(notify.LONG * 1e9)
        src = entry.node
        a = await guest.node("/data/src/a.txt")
        (host / "src" / "a.txt").write_text("changed")  # modified: its attributes and pages
        await sent.until((wire.INVAL_INODE, a, b""))
        (host / "src" / "b.txt").write_text("new")  # created: the name (a cached ENOENT) and the listing
        await sent.until((wire.INVAL_ENTRY, src, b"b.txt"))
        await sent.until((wire.INVAL_INODE, src, b""))
        (host / "src" / "a.txt").rename(host / "src" / "c.txt")
        await sent.until((wire.INVAL_ENTRY, src, b"a.txt"))
        await sent.until((wire.INVAL_ENTRY, src, b"c.txt"))
        (host / "src" / "c.txt").unlink()
        await sent.until((wire.INVAL_ENTRY, src, b"c.txt"))
        top = await guest.node("/data/top.txt")
        os.chmod(host / "top.txt", 0o600)
        await sent.until((wire.INVAL_INODE, top, b""))
        assert all(node != 0 for _, node, _ in sent.notices)
    finally:
        guest.close()


async def test_the_guests_own_changes_send_no_notices(host: Path) -> None:
    guest, sent = await _watched(host)
    try:
        await guest.write("/data/src/mine.txt", b"guest data")
        await guest.chmod("/data/src/mine.txt", 0o600)
        await guest.mkdir("/data/src/dir")
        await guest.write("/data/src/dir/inner", b"x")
        await guest.rename("/data/src/mine.txt", "/data/src/moved.txt")
        await guest.unlink("/data/src/a.txt")
        src = await guest.node("/data/src")
        (host / "src" / "marker").write_text("host")  # events come in order: once this one is seen ...
        await sent.until((wire.INVAL_ENTRY, src, b"marker"))
        own = {b"mine.txt", b"moved.txt", b"dir", b"inner", b"a.txt"}
        assert [n for n in sent.notices if n[2] in own] == []  # ... the guest's own were dropped
        # A host change to a file the guest just wrote is not taken for the guest's own.
        await guest.write("/data/src/both.txt", b"guest")
        (host / "src" / "both.txt").write_text("host wrote more")
        await sent.until((wire.INVAL_INODE, await guest.node("/data/src/both.txt"), b""))
    finally:
        guest.close()


async def test_two_mounts_of_one_directory_are_both_told(host: Path) -> None:
    guest = Guest([Mount("/a", HostFSProvider(str(host))), Mount("/b", HostFSProvider(str(host)))])
    sent = await _started(guest)
    try:
        assert len(guest.router.notifier.watched) == 2
        a, b = await guest.node("/a/top.txt"), await guest.node("/b/top.txt")
        (host / "top.txt").write_text("both see it")
        await sent.until((wire.INVAL_INODE, a, b""))
        await sent.until((wire.INVAL_INODE, b, b""))
    finally:
        guest.close()


async def test_names_hidden_under_a_nested_mount_are_never_told(host: Path) -> None:
    from matchlock.vfs.memory import MemoryProvider

    guest = Guest([Mount("/data", HostFSProvider(str(host))), Mount("/data/src", MemoryProvider())])
    sent = await _started(guest)
    try:
        assert guest.router.notifier.watched
        src = await guest.node("/data/src")  # the memory mount's root, over the host's src/
        await guest.node("/data/top.txt")
        (host / "src" / "secret-name").write_text("x")
        (host / "top.txt").write_text("marker")
        await sent.until((wire.INVAL_INODE, await guest.node("/data/top.txt"), b""))
        assert [n for n in sent.notices if n[1] == src or n[2] == b"secret-name"] == []
    finally:
        guest.close()


async def test_a_failing_watch_invalidates_everything_and_falls_back(host: Path) -> None:
    guest, sent = await _watched(host, cap=3)  # the root and src fit: watched
    provider = guest.router.mounts[0].provider
    try:
        assert provider.cache_seconds == notify.LONG
        a = await guest.node("/data/src/a.txt")
        (host / "d1").mkdir()
        (host / "d2").mkdir()  # one directory past the cap
        await sent.until((wire.INVAL_INODE, a, b""))  # everything the guest holds
        assert provider.cache_seconds == notify.SHORT
        entry = await guest.call(wire.Lookup(guest.roots["/data"], b"top.txt"))
        assert isinstance(entry, wire.Entry) and entry.entry_valid_ns == int(notify.SHORT * 1e9)
        assert not guest.router.notifier.watched  # nothing is watched any more
    finally:
        guest.close()


async def test_a_queue_overflow_invalidates_everything_and_falls_back(host: Path) -> None:
    guest, sent = await _watched(host)
    provider = guest.router.mounts[0].provider
    try:
        a = await guest.node("/data/src/a.txt")
        with open("/proc/sys/fs/inotify/max_queued_events") as f:
            queue = int(f.read())
        names = [str(host / "top.txt"), str(host / "src" / "a.txt")]
        for i in range(queue + 10):  # without yielding to the loop, so nothing reads the queue meanwhile
            os.chmod(names[i % 2], 0o600 | i % 2)  # alternating names: the kernel merges no two events
        await sent.until((wire.INVAL_INODE, a, b""))
        assert provider.cache_seconds == notify.SHORT and not guest.router.notifier.watched
    finally:
        guest.close()


async def test_a_tree_over_the_cap_is_never_trusted(host: Path) -> None:
    guest, sent = await _watched(host, cap=1)
    try:
        assert not guest.router.notifier.watched
        assert guest.router.mounts[0].provider.cache_seconds == notify.SHORT
        assert guest.router.hello()[0].negative_valid_ns == int(notify.SHORT * 1e9)
    finally:
        guest.close()


def test_notices_are_validated_both_ways() -> None:
    frame = wire.encode_notice(wire.INVAL_ENTRY, 7, b"name")
    (reply,) = wire.ReplyDecoder().feed(frame)
    assert reply.id == wire.NOTICE_ID and wire.decode_notice(reply.payload) == (wire.INVAL_ENTRY, 7, b"name")
    for bad in (b"", b"a/b", b".."):
        with pytest.raises(LocalProtocolError):
            wire.encode_notice(wire.INVAL_ENTRY, 7, bad)
    with pytest.raises(LocalProtocolError):
        wire.encode_notice(wire.INVAL_INODE, wire.ROOT_ALIAS)
    with pytest.raises(RemoteProtocolError):
        wire.decode_notice(frame[wire.REPLY_HEADER.size : -1])  # a name shorter than its length
    with pytest.raises(RemoteProtocolError):
        wire.decode_notice(bytes([3]) + bytes(10))  # an unknown kind


def test_the_guest_daemon_writes_notices_to_each_mount(tmp_path: Path) -> None:
    import socket
    import threading

    from matchlock.guest import fuse, fuse_daemon

    kernel, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mount = fuse_daemon.Mount(wire.Mount("/m", 9, False, 10**9), daemon_end.fileno(), wire.MAX_IO)
    mount.initialized.set()
    mount.translator._absent[(9, b"new")] = 1 << 62  # a remembered ENOENT the notice must drop
    notices = fuse_daemon.Notices()
    notices.mounts.append(mount)
    threading.Thread(target=notices.serve, daemon=True).start()
    notices.put(wire.encode_notice(wire.INVAL_ENTRY, 9, b"new")[wire.REPLY_HEADER.size :])
    notices.put(wire.encode_notice(wire.INVAL_INODE, 12)[wire.REPLY_HEADER.size :])
    kernel.settimeout(10)
    assert kernel.recv(4096) == fuse.inval_entry_notice(fuse.ROOT_ID, b"new")  # the mount's root is node 1
    assert kernel.recv(4096) == fuse.inval_inode_notice(12)
    assert (9, b"new") not in mount.translator._absent
    kernel.close()
    daemon_end.close()


def test_a_tree_on_a_network_filesystem_is_never_trusted(tmp_path: Path, monkeypatch) -> None:
    import ctypes

    from matchlock.vfs import watch

    buf = ctypes.create_string_buffer(256)
    fd = os.open(tmp_path, os.O_PATH)
    try:
        assert ctypes.CDLL(None).fstatfs(fd, buf) == 0
    finally:
        os.close(fd)
    # This test's own filesystem, listed as remote: whatever it is, the watch must then refuse it.
    monkeypatch.setitem(watch.REMOTE_FS, ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF, "nfs")
    (tmp_path / "sub").mkdir()
    inotify = Inotify()
    tree = TreeWatch(inotify, HostDir(str(tmp_path)))
    tree.start()
    try:
        assert "is on nfs" in tree.failed and not tree.dirs
    finally:
        tree.close()
        inotify.close()
