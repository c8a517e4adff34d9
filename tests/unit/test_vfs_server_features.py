"""The VFS server's HELLO features: parent attributes after a change, set-id bits dropped host-side, and
directories the guest opens itself."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import AsyncIterator

import pytest
from vfs_peer import Peer

from matchlock.api.vfs import VFSHookRule, VFSInterceptionConfig
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.server import VfsServer
from matchlock.vfs.types import Limits
from matchlock.wire import vfs as wire


@contextlib.asynccontextmanager
async def _serving(
    features: int, interception: VFSInterceptionConfig | None = None, limits: Limits | None = None
) -> AsyncIterator[tuple[Peer, int]]:
    """A served memory mount after a HELLO with `features`: the guest's end and the mount's root node."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    intercepts = Interceptor(interception, lambda _: None)
    router = Router([Mount("/m", MemoryProvider())], intercepts, VfsServer.executor(), limits)
    server = VfsServer(theirs, router)
    await server.start()
    guest = Peer(ours)
    try:
        hello = wire.decode_result(wire.Op.HELLO, await guest.ok(wire.Hello(wire.VERSION, 1 << 20, features)))
        refused = wire.FEATURE_LOOKUP_DIR | wire.FEATURE_SETATTR_NOTICE  # rules see every LOOKUP and SETATTR
        served = features & ~refused if interception is not None else features
        assert isinstance(hello, wire.HelloReply) and hello.features == served
        yield guest, hello.mounts[0].root
    finally:
        await server.aclose()
        ours.close()


async def _setuid_file(guest: Peer, root: int, name: bytes, mode: int) -> tuple[int, int]:
    """A file with `mode` (set-id bits included) open for writing by anyone: (node, fh)."""
    body, _ = wire.split_parent(wire.Op.CREATE, await guest.ok(wire.Create(root, os.O_RDWR, 0o666, name)))
    created = wire.decode_result(wire.Op.CREATE, body)
    assert isinstance(created, wire.Created)
    await guest.ok(wire.Setattr(created.entry.node, wire.SET_MODE, 0, 0, 0, 0, mode, 0, 0))
    return created.entry.node, created.fh


async def _mode(guest: Peer, node: int) -> int:
    got = wire.decode_result(wire.Op.GETATTR, await guest.ok(wire.Getattr(node, 0)))
    assert isinstance(got, wire.AttrReply)
    return stat.S_IMODE(got.attr.mode)


async def test_making_a_name_returns_the_parents_new_attributes_only_when_asked() -> None:
    for features, suffix in ((wire.FEATURE_PARENT_ATTR, True), (0, False)):
        async with _serving(features) as (guest, root):
            payload = await guest.ok(wire.Mkdir(root, 0o755, b"d"))
            body, parent = wire.split_parent(wire.Op.MKDIR, payload)
            assert (parent is not None) == suffix
            assert isinstance(wire.decode_result(wire.Op.MKDIR, body), wire.Entry)
            if parent is not None:
                assert parent.attr.nlink == 3 and stat.S_ISDIR(parent.attr.mode)  # counts the new directory
            payload = await guest.ok(wire.Create(root, os.O_WRONLY, 0o644, b"f"))
            body, parent = wire.split_parent(wire.Op.CREATE, payload)
            assert (parent is not None) == suffix
            assert isinstance(wire.decode_result(wire.Op.CREATE, body), wire.Created)


async def test_a_write_without_cap_fsetid_drops_setuid_and_group_executable_setgid() -> None:
    async with _serving(wire.FEATURES_ALL) as (guest, root):
        node, fh = await _setuid_file(guest, root, b"s", 0o6777)
        await guest.ok(wire.Write(node, fh, 0, os.O_RDWR, b"root writes"))  # no KILL flag: CAP_FSETID
        assert await _mode(guest, node) == 0o6777
        await guest.ok(wire.Write(node, fh, 0, os.O_RDWR | wire.KILL_SUIDGID, b"x"), uid=1000)
        assert await _mode(guest, node) == 0o777
        # setgid without group execute is mandatory locking, not privilege: it stays.
        node, fh = await _setuid_file(guest, root, b"g", 0o2666)
        await guest.ok(wire.Write(node, fh, 0, os.O_RDWR | wire.KILL_SUIDGID, b"x"), uid=1000)
        assert await _mode(guest, node) == 0o2666


async def test_chown_and_an_unprivileged_truncate_drop_setuid() -> None:
    async with _serving(wire.FEATURES_ALL) as (guest, root):
        node, _ = await _setuid_file(guest, root, b"c", 0o4755)
        got = wire.decode_result(wire.Op.SETATTR, await guest.ok(wire.Setattr(node, wire.SET_UID, 0, 0, 0, 0, 0, 7, 0)))
        assert isinstance(got, wire.AttrReply) and got.attr.uid == 7 and stat.S_IMODE(got.attr.mode) == 0o755
        node, _ = await _setuid_file(guest, root, b"t", 0o4777)
        await guest.ok(wire.Setattr(node, wire.SET_SIZE, 0, 0, 0, 0, 0, 0, 0))  # by root: kept
        assert await _mode(guest, node) == 0o4777
        await guest.ok(wire.Setattr(node, wire.SET_SIZE | wire.SET_KILL_SUIDGID, 0, 0, 0, 0, 0, 0, 0), uid=1000)
        assert await _mode(guest, node) == 0o777
        node, _ = await _setuid_file(guest, root, b"o", 0o4777)
        await guest.ok(wire.Open(node, os.O_WRONLY | os.O_TRUNC | wire.KILL_SUIDGID), uid=1000)
        assert await _mode(guest, node) == 0o777
        # A file made by this very create keeps the mode it was made with, as on a local filesystem.
        made = wire.Create(root, os.O_RDWR | os.O_TRUNC | wire.KILL_SUIDGID, 0o4755, b"new")
        body, _ = wire.split_parent(wire.Op.CREATE, await guest.ok(made, uid=1000))
        created = wire.decode_result(wire.Op.CREATE, body)
        assert isinstance(created, wire.Created) and stat.S_IMODE(created.entry.attr.mode) == 0o4755
        assert await _mode(guest, created.entry.node) == 0o4755


def test_which_provider_calls_are_quick_enough_to_make_on_the_event_loop(tmp_path) -> None:
    from matchlock.vfs import server
    from matchlock.vfs.hostfs import HostFSProvider
    from matchlock.vfs.overlay import OverlayProvider
    from matchlock.vfs.types import SetAttr

    (tmp_path / "f").write_bytes(b"data")
    provider = HostFSProvider(str(tmp_path))
    overlay = OverlayProvider(str(tmp_path), str(tmp_path / "private" / "upper"))
    executor = VfsServer.executor()
    try:
        assert executor.runs_here(provider.setattr, (("f",), SetAttr(mode=0o600), None))
        handle = provider.open(("f",), os.O_RDWR)
        assert executor.runs_here(handle.read, (0, 4))
        # What may wait on the disk or copy a file stays in the pool: fsync, a truncate, big I/O, the overlay.
        assert not server._inline(handle.fsync, (False,))
        assert not server._inline(handle.write, (0, bytes(1 << 20)))
        assert not server._inline(provider.setattr, (("f",), SetAttr(size=0), None))
        assert not server._inline(overlay.setattr, (("f",), SetAttr(mode=0o600), None))
        assert server._inline(handle.write, (0, b"x")) and server._inline(provider.create, (("g",), 0, 0o644, None))
        handle.close()
    finally:
        executor.shutdown()
        provider.close()
        overlay.close()


async def test_the_router_makes_quick_calls_itself_and_submits_the_rest(tmp_path) -> None:
    from matchlock.vfs.hostfs import HostFSProvider
    from matchlock.vfs.types import Caller

    provider = HostFSProvider(str(tmp_path))
    executor = VfsServer.executor()
    router = Router([Mount("/w", provider)], Interceptor(None), executor)
    executor.shutdown()  # from now on a submitted call fails
    try:
        await router._io(provider.mkdir, ("d",), 0o755, Caller(0, 0, 1))
        assert (tmp_path / "d").is_dir()
        with pytest.raises(RuntimeError, match="after shutdown"):
            await router._io(os.getpid)
    finally:
        router.close()
        provider.close()


async def _opendir_flags(guest: Peer, node: int) -> int:
    opened = wire.decode_result(wire.Op.OPENDIR, await guest.ok(wire.Opendir(node, 0)))
    assert isinstance(opened, wire.Opened)
    await guest.ok(wire.Releasedir(node, opened.fh))
    return opened.flags


async def test_the_guest_may_open_directories_itself_only_when_asked_and_nothing_intercepts() -> None:
    cached = wire.OPEN_CACHE_DIR | wire.OPEN_KEEP_CACHE
    async with _serving(wire.FEATURES_ALL) as (guest, root):
        assert await _opendir_flags(guest, root) == cached | wire.OPEN_GUEST_DIR
    async with _serving(wire.FEATURES_ALL & ~wire.FEATURE_GUEST_OPENDIR) as (guest, root):
        assert await _opendir_flags(guest, root) == cached
    # With interception (even events only) every listing must reach the host's READDIR, to fire its rules
    # and events: the guest neither opens the directory itself nor keeps the listing.
    async with _serving(wire.FEATURES_ALL, VFSInterceptionConfig(emit_events=True)) as (guest, root):
        assert await _opendir_flags(guest, root) == 0


async def test_opendir_read_opens_and_reads_in_one_and_its_handle_is_an_ordinary_one() -> None:
    async with _serving(wire.FEATURES_ALL) as (guest, root):
        await guest.ok(wire.Mkdir(root, 0o755, b"d"))
        got = wire.decode_result(wire.Op.OPENDIR_READ, await guest.ok(wire.OpendirRead(root, 0, 4096, 1)))
        assert isinstance(got, wire.DirOpened) and got.flags & wire.OPEN_GUEST_DIR
        assert [e.name for e in got.entries] == [b".", b"..", b"d"] and got.entries[2].entry is not None
        page = wire.decode_result(wire.Op.READDIR, await guest.ok(wire.Readdir(root, got.fh, 2, 4096, 0)))
        assert [e.name for e in page] == [b"d"]
        await guest.ok(wire.Releasedir(root, got.fh))
        assert (await guest.call(wire.Readdir(root, got.fh, 0, 4096, 0))).status == -errno.EBADF


async def test_opendir_read_obeys_a_block_rule_on_readdir() -> None:
    rules = (VFSHookRule(ops=("readdir",), path="/m", action="block"),)
    async with _serving(wire.FEATURES_ALL, VFSInterceptionConfig(rules=rules)) as (guest, root):
        assert (await guest.call(wire.OpendirRead(root, 0, 4096, 0))).status == -errno.EPERM


async def test_opendir_read_is_refused_to_a_guest_that_did_not_offer_the_feature() -> None:
    async with _serving(wire.FEATURES_ALL & ~wire.FEATURE_GUEST_OPENDIR) as (guest, root):
        assert (await guest.call(wire.OpendirRead(root, 0, 4096, 0))).status == -errno.ENOSYS


async def test_opendir_read_counts_against_the_handle_limit() -> None:
    async with _serving(wire.FEATURES_ALL, limits=Limits(max_handles=2)) as (guest, root):
        held = []
        for _ in range(2):
            got = wire.decode_result(wire.Op.OPENDIR_READ, await guest.ok(wire.OpendirRead(root, 0, 4096, 0)))
            assert isinstance(got, wire.DirOpened)
            held.append(got.fh)
        assert (await guest.call(wire.OpendirRead(root, 0, 4096, 0))).status == -errno.EMFILE
        assert (await guest.call(wire.Opendir(root, 0))).status == -errno.EMFILE
        await guest.ok(wire.Releasedir(root, held[0]))
        assert (await guest.call(wire.OpendirRead(root, 0, 4096, 0))).status == 0
