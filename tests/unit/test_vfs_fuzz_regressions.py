"""The defects test_vfs_fuzz.py found, each kept as the exact input that showed it."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vfs_kit import Guest
from vfs_peer import serving

from matchlock.vfs import hostfs, snapshot
from matchlock.vfs.hostfs import HostFile, HostFSProvider
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.types import FsError, Limits
from matchlock.wire import vfs as wire
from matchlock.wire.frames import RemoteProtocolError

pytestmark = pytest.mark.timeout(60)  # a hang detector, not a performance assertion


def _payload(op: int, reply: wire.Reply) -> wire.Result:
    assert reply.status == 0, (op, reply.status)
    return wire.decode_result(op, wire.split_parent(op, reply.payload)[0])


async def test_a_hello_nested_thousands_deep_is_a_protocol_error_not_a_crash() -> None:
    # Found by the fuzzer's ending frames: json raised RecursionError out of the decoder, out of the
    # server's read loop and into its task group, which cancelled the task that started the server.
    nested = b"[" * 60_000
    frame = wire.REQUEST_HEADER.pack(len(nested), 1, wire.Op.HELLO, 0, 0, 0) + nested
    with pytest.raises(RemoteProtocolError, match="HELLO is not JSON"):
        wire.RequestDecoder().feed(frame)
    async with serving([Mount("/m", MemoryProvider())]) as (guest, server, _):
        await asyncio.get_running_loop().sock_sendall(guest.sock, frame)
        await server.wait()
        assert server.broken.startswith("the guest broke the VFS protocol: HELLO is not JSON"), server.broken


async def test_a_handle_of_another_node_changes_nothing() -> None:
    # Found by seed 1 of the nested sessions: SETATTR of a file on a writable mount with the handle of
    # /secret (a read-only single-file memory mount, opened for reading) truncated and chmodded /secret.
    secret = MemoryProvider.single_file(b"s3cret", 0o4755, 0, 0)
    async with serving([Mount("/secret", secret, readonly=True), Mount("/scratch", MemoryProvider())]) as (
        guest,
        _,
        hello,
    ):
        roots = {m.path: m.root for m in hello.mounts}
        opened = _payload(wire.Op.OPEN, await guest.call(wire.Open(roots["/secret"], os.O_RDONLY)))
        made = _payload(wire.Op.CREATE, await guest.call(wire.Create(roots["/scratch"], os.O_RDWR, 0o644, b"mine")))
        assert isinstance(opened, wire.Opened) and isinstance(made, wire.Created)
        node = made.entry.node
        change = wire.Setattr(node, wire.SET_SIZE | wire.SET_MODE, opened.fh, 0, 0, 0, 0o777, 0, 0)
        assert (await guest.call(change)).status == -errno.EBADF
        assert (await guest.call(wire.Getattr(node, opened.fh))).status == -errno.EBADF
        assert (bytes(secret.root.data), secret.root.mode & 0o7777) == (b"s3cret", 0o4755)
        # Its own handle still serves both.
        own = wire.Setattr(node, wire.SET_SIZE, made.fh, 3, 0, 0, 0, 0, 0)
        changed = _payload(wire.Op.SETATTR, await guest.call(own))
        assert isinstance(changed, wire.AttrReply) and changed.attr.size == 3
        assert (await guest.call(wire.Getattr(node, made.fh))).status == 0


class NoChmod(MemoryProvider):
    """A mount whose chmod fails (as a host filesystem without permission to change the mode would)."""

    def setattr(self, path, changes, handle):
        if changes.mode is not None:
            raise FsError(errno.EPERM)
        return super().setattr(path, changes, handle)


async def test_an_open_whose_set_id_drop_fails_keeps_no_handle(tmp_path: Path) -> None:
    # Found by seed 0 of the nested sessions: OPEN(/secret's root, O_RDONLY | KILL_SUIDGID) opened the
    # file, then its set-id drop (a chmod) failed with EROFS: the guest got the error, and the host kept
    # the handle forever. Now an open without O_TRUNC drops nothing (the guest kernel sends the flag only
    # with it), and an open whose drop fails closes its handle.
    secret = MemoryProvider.single_file(b"s3cret", 0o4755, 0, 0)
    async with serving([Mount("/secret", secret, readonly=True)]) as (guest, server, hello):
        root = hello.mounts[0].root
        opened = _payload(wire.Op.OPEN, await guest.call(wire.Open(root, os.O_RDONLY | wire.KILL_SUIDGID)))
        assert isinstance(opened, wire.Opened) and list(server.router.handles) == [opened.fh]
        assert secret.root.mode & 0o7777 == 0o4755
    provider = NoChmod()
    async with serving([Mount("/m", provider)]) as (guest, server, hello):
        made = _payload(wire.Op.CREATE, await guest.call(wire.Create(hello.mounts[0].root, os.O_RDWR, 0o4755, b"f")))
        assert isinstance(made, wire.Created)
        await guest.ok(wire.Release(made.entry.node, made.fh))
        trunc = wire.Open(made.entry.node, os.O_WRONLY | os.O_TRUNC | wire.KILL_SUIDGID)
        assert (await guest.call(trunc, uid=1000)).status == -errno.EPERM
        assert not server.router.handles


async def test_a_setattr_notice_naming_the_root_alias_ends_nothing() -> None:
    # Found by seed 0 of the flat sessions: a SETATTR with id 0 (FEATURE_SETATTR_NOTICE) for node 1
    # failed, and the INVAL_INODE notice for node 1 that answers a failure could not be encoded: the
    # LocalProtocolError escaped the read loop and cancelled the task that started the server.
    async with serving([Mount("/m", MemoryProvider())]) as (guest, server, hello):
        assert server.features & wire.FEATURE_SETATTR_NOTICE
        await guest.send(0, wire.Setattr(wire.ROOT_ALIAS, wire.SET_MODE, 0, 0, 0, 0, 0o644, 0, 0))
        await guest.ok(wire.Statfs(hello.mounts[0].root))
        assert not server.broken and server.check_failures == 1


def _open_below(directory: Path) -> list[str]:
    """The files under `directory` this process holds open (the mount root's own fd aside)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory) + "/"):
                out.append(target)
    return sorted(out)


async def test_a_create_refused_for_a_full_table_keeps_no_file_open_and_no_lookup(tmp_path: Path) -> None:
    # Found by the tight-limit sessions (odd seeds): a CREATE refused with ENFILE (node table full) left
    # its host file open, one fd per request (a guest could use up the owner's fds), and one refused
    # with EMFILE (handle table full) left a lookup of the new node that no FORGET could give back.
    limits = Limits(max_nodes=2, max_handles=1)
    async with serving([Mount("/m", HostFSProvider(str(tmp_path)))], limits=limits) as (guest, server, hello):
        root = hello.mounts[0].root
        first = _payload(wire.Op.CREATE, await guest.call(wire.Create(root, os.O_RDWR, 0o644, b"a")))
        assert isinstance(first, wire.Created)
        for n in range(5):
            assert (await guest.call(wire.Create(root, os.O_RDWR, 0o644, b"b%d" % n))).status == -errno.ENFILE
            assert (await guest.call(wire.Mkdir(root, 0o755, b"d%d" % n))).status == -errno.ENFILE
        assert _open_below(tmp_path) == [str(tmp_path / "a")]  # the handle of "a", and nothing else
        assert sorted(os.listdir(tmp_path)) == ["a"]
    async with serving([Mount("/m", MemoryProvider())], limits=Limits(max_handles=1)) as (guest, server, hello):
        root = hello.mounts[0].root
        assert (await guest.call(wire.Create(root, os.O_RDWR, 0o644, b"a"))).status == 0
        assert (await guest.call(wire.Create(root, os.O_RDWR, 0o644, b"b"))).status == -errno.EMFILE
        assert [node.name for node in server.router.nodes.values()] == ["", "a"]


async def test_a_bug_in_the_read_loop_ends_the_channel_not_the_owner(monkeypatch) -> None:
    async with serving([Mount("/m", MemoryProvider())]) as (guest, server, hello):
        monkeypatch.setattr(server.router, "forget", lambda items: 1 / 0)
        await guest.send(0, wire.Forget(((hello.mounts[0].root, 1),)))
        await server.wait()
        assert server.broken == "the VFS server failed: ZeroDivisionError: division by zero"


def test_a_host_file_closes_its_fd_only_after_the_call_using_it(tmp_path: Path, monkeypatch) -> None:
    # Found by the flat sessions as "VFS FSYNC failed: file descriptor cannot be a negative integer": a
    # RELEASE on the event loop closed the fd while a READ, WRITE or FSYNC of the same handle waited in
    # the pool. Had another open reused the number meanwhile, that call reached the other file.
    (tmp_path / "mine").write_bytes(b"guest file")
    (tmp_path / "other").write_bytes(b"someone else's")
    provider = HostFSProvider(str(tmp_path))
    handle = provider.open(("mine",), os.O_RDONLY)
    assert isinstance(handle, HostFile)
    entered, go = threading.Event(), threading.Event()
    real_pread = os.pread

    def slow_pread(fd: int, size: int, offset: int) -> bytes:
        entered.set()
        assert go.wait(30)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(hostfs.os, "pread", slow_pread)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(handle.read(0, 100)))
    reader.start()
    assert entered.wait(30)
    fd = handle.fd
    handle.close()  # the RELEASE, while the read is in its syscall
    other = os.open(tmp_path / "other", os.O_RDONLY)  # would take the number the close freed
    try:
        assert other != fd
        go.set()
        reader.join()
        assert got == [b"guest file"]
    finally:
        os.close(other)
        monkeypatch.undo()
        provider.close()
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    with pytest.raises(FsError) as released:
        handle.read(0, 1)
    assert released.value.errno == errno.EBADF


def _restored(router: Router, where: Path, mounts: list[Mount]) -> Router:
    """A snapshot of `router` with its nodes, restored into a fresh router of `mounts`."""
    snapshot.save(router, where, with_nodes=True)
    copy = Router(mounts, Interceptor(None), ThreadPoolExecutor(1))
    snapshot.restore(copy, where, with_nodes=True)
    return copy


async def test_a_forget_of_more_than_held_leaves_a_snapshot_that_restores(tmp_path: Path) -> None:
    # Found by the snapshot step of every session: FORGET(node, 2^64-1) of a directory whose child the
    # guest still held left the directory with a lookup count of about -2^64, which a snapshot saved and
    # its restore refused ("a node's lookup count is not an integer in ..."): no clone could boot.
    guest = Guest([Mount("/m", MemoryProvider())])
    try:
        await guest.mkdir("/m/d")
        await guest.write("/m/d/f", b"x")
        child = await guest.node("/m/d/f")
        directory = await guest.node("/m/d")
        guest.router.forget(((directory, (1 << 64) - 1),))
        assert await guest.node("/m/d") == directory  # kept for its child, and found again
        copy = _restored(guest.router, tmp_path, [Mount("/m", guest.router.mounts[0].provider)])
        assert copy.nodes[directory].nlookup == 1 and copy._parts(copy.nodes[child]) == ("m", "d", "f")
        copy.executor.shutdown()
    finally:
        guest.close()


async def test_a_memory_fifo_or_symlink_cannot_be_truncated_into_holding_data(tmp_path: Path) -> None:
    # Found by the snapshot step: SETATTR(SET_SIZE) of a memory FIFO gave it bytes, and a snapshot of the
    # mount then failed to restore ("data on an inode that is no file").
    guest = Guest([Mount("/m", MemoryProvider())])
    try:
        root = guest.roots["/m"]
        await guest.call(wire.Mknod(root, stat.S_IFIFO | 0o644, 0, b"fifo"))
        await guest.symlink("/m/link", "target")
        for name in ("/m/fifo", "/m/link"):
            node = await guest.node(name)
            size = wire.Setattr(node, wire.SET_SIZE, 0, 10, 0, 0, 0, 0, 0)
            assert await guest.errno_of(size) == errno.EINVAL
        copy = _restored(guest.router, tmp_path, [Mount("/m", MemoryProvider())])
        assert sorted(e.name for e in copy.mounts[0].provider.listdir((), 10)) == ["fifo", "link"]
        copy.executor.shutdown()
    finally:
        guest.close()


class SlowStat(MemoryProvider):
    """A mount whose getattr of "x" waits in the pool until the test lets it go (an overlay's copy-up)."""

    quick_getattr = False

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.go = threading.Event(), threading.Event()

    def getattr(self, path):
        if path[-1:] == ("x",):
            self.entered.set()
            assert self.go.wait(30)
        return super().getattr(path)


async def test_a_lookup_in_a_directory_forgotten_meanwhile_makes_no_orphan() -> None:
    # Found by the snapshot step of the nested sessions: a FORGET of a directory (read at once) while a
    # LOOKUP in it waited for the overlay's stat put the found node under a directory no longer in the
    # table; a snapshot saved it and its restore refused it ("node 54 has no parent 41").
    provider = SlowStat()
    guest = Guest([Mount("/m", provider)])
    try:
        await guest.mkdir("/m/d")
        await guest.write("/m/d/x", b"")
        directory = await guest.node("/m/d")
        provider.go.set()
        guest.router.forget(((await guest.node("/m/d/x"), 1 << 40),))  # the guest holds only /m/d now
        provider.entered.clear()
        provider.go.clear()
        lookup = asyncio.ensure_future(guest.errno_of(wire.Lookup(directory, b"x")))
        await asyncio.to_thread(provider.entered.wait, 30)
        guest.router.forget(((directory, 1 << 40),))
        provider.go.set()
        assert await lookup == errno.ESTALE
        assert set(guest.router.nodes) == {node.id for node in guest.router.root_nodes}
    finally:
        guest.close()
