"""SETATTRs whose outcome the guest knows (tar's fchown and fchmod to what the file has, its futimens to
given times), answered in the guest and sent to the host as notices (FEATURE_SETATTR_NOTICE): when the translator may, what the daemon sends, what the host does."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import threading

import pytest
from vfs_peer import Peer, serving

from matchlock.api.vfs import VFSInterceptionConfig
from matchlock.guest import fuse, fuse_daemon
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.overlay import OverlayProvider
from matchlock.vfs.router import Mount
from matchlock.vfs.server import MAX_CHECK_LOGS
from matchlock.wire import vfs
from matchlock.wire.frames import RemoteProtocolError

ROOT = 100
SECOND = 1_000_000_000
WALL = 1_700_000_000 * SECOND + 5  # the guest's wall clock: the ctime of a SETATTR answered there
FILE = vfs.Attr(ino=8, size=5, blocks=1, atime_ns=1, mtime_ns=2, ctime_ns=3, mode=stat.S_IFREG | 0o644, nlink=1,
                uid=0, gid=0)  # fmt: skip
OWNER = vfs.SET_UID | vfs.SET_GID


def file_with_mode(mode: int) -> vfs.Attr:
    return vfs.Attr(**{**{k: getattr(FILE, k) for k in FILE.__slots__}, "mode": mode})


class Clock:
    def __init__(self) -> None:
        self.now = 10 * SECOND

    def __call__(self) -> int:
        return self.now


def request(op: int, body: bytes = b"", nodeid: int = fuse.ROOT_ID) -> bytes:
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), op, 9, nodeid, 1000, 1001, 77, 0, 0) + body


def setattr_request(
    nodeid: int, valid: int, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0, times: tuple = (0, 0, 0, 0)
) -> bytes:
    """`times`: atime and mtime seconds, then their nanoseconds (the kernel's order)."""
    atime, mtime, atimens, mtimens = times
    body = fuse._SETATTR_IN_SIGNED.pack(
        valid, 0, 4, size, 0, atime, mtime, 0, atimens, mtimens, 0, mode, 0, uid, gid, 0
    )
    return request(fuse.SETATTR, body, nodeid)


def translator(clock: Clock, features: int = vfs.FEATURES_ALL & ~vfs.FEATURE_LOOKUP_DIR) -> fuse.MountTranslator:
    return fuse.MountTranslator(ROOT, negative_valid_ns=SECOND, clock=clock, features=features)


def complete(tr: fuse.MountTranslator, action: fuse.Action, result: vfs.Result) -> bytes:
    assert action.pending is not None and action.reply is None
    (reply,) = vfs.ReplyDecoder().feed(vfs.encode_reply(5, result))
    return b"".join(tr.complete(action.pending, reply.status, reply.payload)[0])


def created(tr: fuse.MountTranslator, attr: vfs.Attr = FILE, node: int = 61) -> None:
    """`open(O_CREAT)` of a new file `node`: its attributes come with the reply, for the cache."""
    action = tr.handle(request(fuse.CREATE, fuse.CREATE_IN.pack(0o101, 0o644, 0, 0) + b"f\0"))
    complete(tr, action, vfs.Created(vfs.Entry(node, 0, SECOND, SECOND, attr), 1))


def answered_here(action: fuse.Action) -> tuple[int, ...]:
    """The attributes a SETATTR answered in the guest gave the kernel; its notice is a SETATTR for the host."""
    assert action.pending is None and action.reply is not None and action.wire is not None
    assert action.wire[0] == vfs.Op.SETATTR and (action.uid, action.gid, action.pid) == (1000, 1001, 77)
    return fuse.ATTR.unpack_from(action.reply, fuse.OUT_HEADER.size + fuse.ATTR_OUT.size)


def test_tars_chown_and_chmod_to_what_the_file_has_are_answered_here_with_a_new_ctime(monkeypatch):
    monkeypatch.setattr(fuse.time, "time_ns", lambda: WALL)
    clock = Clock()
    tr = translator(clock)
    created(tr)
    # As the kernel sends a chown of a non-directory with FUSE_HANDLE_KILLPRIV_V2: set-id bits to kill.
    action = tr.handle(setattr_request(61, OWNER | vfs.SET_KILL_SUIDGID | fuse.FATTR_FH, uid=0, gid=0))
    attr = answered_here(action)
    assert (attr[5], attr[8]) == divmod(WALL, SECOND)  # ctime, ctimensec
    assert attr[9] == stat.S_IFREG | 0o644 and attr[2] == 1  # the rest as the host left it
    sent = vfs.decode_args(vfs.Op.SETATTR, action.wire[1])
    assert (sent.node, sent.valid, sent.fh, sent.uid, sent.gid) == (61, OWNER | vfs.SET_KILL_SUIDGID, 4, 0, 0)
    # The cache holds the new ctime, and the chmod after the chown is answered here too.
    answered_here(tr.handle(setattr_request(61, vfs.SET_MODE, mode=stat.S_IFREG | 0o644)))
    hit = tr.handle(request(fuse.GETATTR, fuse.GETATTR_IN.pack(0, 0, 0), nodeid=61))
    assert hit.pending is None and fuse.ATTR.unpack_from(hit.reply, fuse.OUT_HEADER.size + fuse.ATTR_OUT.size)[5] == (
        WALL // SECOND
    )


def test_times_set_to_given_values_are_answered_here_with_them_and_a_new_ctime(monkeypatch):
    monkeypatch.setattr(fuse.time, "time_ns", lambda: WALL)
    tr = translator(Clock())
    created(tr)
    # GNU tar's futimens of each file it extracts: the archive's times, with nanoseconds.
    action = tr.handle(
        setattr_request(61, vfs.SET_ATIME | vfs.SET_MTIME | fuse.FATTR_FH, times=(1_600_000_000, 1_500_000_000, 7, 9))
    )
    attr = answered_here(action)
    assert (attr[3], attr[6], attr[4], attr[7]) == (1_600_000_000, 7, 1_500_000_000, 9)  # atime, mtime
    assert (attr[5], attr[8]) == divmod(WALL, SECOND) and attr[1] == FILE.size
    sent = vfs.decode_args(vfs.Op.SETATTR, action.wire[1])
    assert (sent.valid, sent.atime_ns, sent.mtime_ns) == (
        vfs.SET_ATIME | vfs.SET_MTIME,
        1_600_000_000 * SECOND + 7,
        1_500_000_000 * SECOND + 9,
    )
    # Only the mtime (UTIME_OMIT for atime): the atime stays; a time before 1970 is kept as it is.
    attr = answered_here(tr.handle(setattr_request(61, vfs.SET_MTIME, times=(5, -1, 0, 500_000_000))))
    assert (attr[3], attr[6]) == (1_600_000_000, 7) and attr[4] * SECOND + attr[7] == -SECOND // 2


def test_a_guest_clock_behind_the_hosts_ctime_never_moves_the_ctime_back(monkeypatch):
    host_ctime = WALL + 300_000_000  # the host stamped it after the guest's "now": its clock is ahead
    monkeypatch.setattr(fuse.time, "time_ns", lambda: WALL)
    tr = translator(Clock())
    created(tr, vfs.Attr(**{**{k: getattr(FILE, k) for k in FILE.__slots__}, "ctime_ns": host_ctime}))
    attr = answered_here(tr.handle(setattr_request(61, vfs.SET_MODE, mode=stat.S_IFREG | 0o644)))
    assert attr[5] * SECOND + attr[8] == host_ctime + 1


@pytest.mark.parametrize(
    "attr, valid, mode, uid, gid",
    [
        (FILE, vfs.SET_MODE, 0o600, 0, 0),  # a real chmod
        (FILE, vfs.SET_UID, 0, 1000, 0),  # a real chown
        (FILE, vfs.SET_GID, 0, 0, 5),
        (FILE, vfs.SET_MODE | vfs.SET_SIZE, 0o644, 0, 0),  # a truncate
        (FILE, OWNER | vfs.SET_MTIME_NOW, 0, 0, 0),  # "now" is the host's clock
        (FILE, vfs.SET_ATIME | vfs.SET_MTIME | vfs.SET_MODE, 0o600, 0, 0),  # times with a real chmod
        (file_with_mode(stat.S_IFREG | 0o4755), OWNER | vfs.SET_KILL_SUIDGID, 0, 0, 0),  # the host drops it
        (file_with_mode(stat.S_IFDIR | 0o755), vfs.SET_MODE, 0o755, 0, 0),  # maybe synthesized
    ],
)
def test_a_setattr_that_changes_what_the_guest_sees_goes_to_the_host(attr, valid, mode, uid, gid):
    tr = translator(Clock())
    created(tr, attr)
    assert tr.handle(setattr_request(61, valid, mode, uid, gid)).pending is not None


def test_only_fresh_attributes_with_no_change_in_flight_and_only_with_the_feature():
    clock = Clock()
    tr = translator(clock)
    created(tr)
    write = tr.handle(request(fuse.WRITE, fuse.WRITE_IN.pack(1, 0, 1, 0, 0, 0o1, 0) + b"x", nodeid=61))
    assert tr.handle(setattr_request(61, OWNER)).pending is not None  # the write drops them
    complete(tr, write, vfs.Written(1))
    created(tr, node=62)
    clock.now += SECOND  # the host's validity is over
    assert tr.handle(setattr_request(62, OWNER)).pending is not None
    plain = translator(clock, vfs.FEATURES_ALL & ~vfs.FEATURE_SETATTR_NOTICE & ~vfs.FEATURE_LOOKUP_DIR)
    created(plain)
    assert plain.handle(setattr_request(61, OWNER)).pending is not None


def test_after_a_write_that_returned_the_files_attributes_its_chown_is_answered_here():
    """busybox tar: CREATE, WRITE, close, then lchown and chmod by path (FEATURE_WRITE_ATTR)."""
    tr = translator(Clock())
    created(tr)
    write = tr.handle(request(fuse.WRITE, fuse.WRITE_IN.pack(1, 0, 1, 0, 0, 0o1, 0) + b"x", nodeid=61))
    grown = vfs.AttrReply(SECOND, vfs.Attr(**{**{k: getattr(FILE, k) for k in FILE.__slots__}, "size": 6}))
    (reply,) = vfs.ReplyDecoder().feed(vfs.encode_reply(5, vfs.Written(1), grown))
    buffers, _ = tr.complete(write.pending, reply.status, reply.payload)
    assert b"".join(buffers)[fuse.OUT_HEADER.size :] == fuse.WRITE_OUT.pack(1, 0)
    answered_here(tr.handle(setattr_request(61, OWNER | vfs.SET_KILL_SUIDGID)))
    # Without the attributes (an older host), the write leaves none cached.
    write = tr.handle(request(fuse.WRITE, fuse.WRITE_IN.pack(1, 0, 1, 0, 0, 0o1, 0) + b"x", nodeid=61))
    complete(tr, write, vfs.Written(1))
    assert tr.handle(setattr_request(61, OWNER | vfs.SET_KILL_SUIDGID)).pending is not None


@pytest.fixture
def port():
    guest, host = socket.socketpair()
    guest.setblocking(False)  # as the daemon opens the port
    host.settimeout(5)
    yield fuse_daemon.Channel(guest.fileno()), host
    host.close()
    guest.close()


def _mount_with_cached_file(fd: int = -1) -> fuse_daemon.Mount:
    mount = fuse_daemon.Mount(vfs.Mount("/m", ROOT, False), fd, vfs.MAX_IO, vfs.FEATURES_ALL)
    cache = mount.translator.cache
    cache.store_attr(61, fuse.ATTR_OUT.pack(1, 0, 0) + fuse.pack_attr(FILE), cache.stamp())
    return mount


def test_the_notice_goes_as_the_callers_after_the_reply_and_before_any_later_frame(port, monkeypatch):
    channel, host = port
    mount = _mount_with_cached_file()
    replies: list[list[bytes]] = []
    monkeypatch.setattr(mount, "write", replies.append)
    channel.forward(mount, mount.translator.handle(setattr_request(61, OWNER)), 0)
    assert len(replies) == 1 and not channel.pending  # answered; no reply is waited for
    # The notice waits for the next frame, and goes before it in the same write.
    channel.notify(vfs.Forget(((61, 1),)))
    data = host.recv(1 << 16)
    notice, forget = vfs.RequestDecoder().feed(data)
    assert (notice.id, notice.op, notice.uid, notice.gid, notice.pid) == (0, vfs.Op.SETATTR, 1000, 1001, 77)
    assert forget.op == vfs.Op.FORGET


def test_a_mount_thread_sends_what_waits_before_it_waits_for_the_kernel(port):
    channel, host = port
    kernel, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.settimeout(5)
    mount = _mount_with_cached_file(daemon_end.fileno())
    thread = threading.Thread(target=fuse_daemon.serve_mount, args=(channel, mount), daemon=True)
    thread.start()
    kernel.send(setattr_request(61, OWNER))
    assert fuse.OUT_HEADER.unpack_from(kernel.recv(4096))[1] == 0  # answered here
    (notice,) = vfs.RequestDecoder().feed(host.recv(1 << 16))  # then sent, with nothing behind it
    assert (notice.id, notice.op) == (0, vfs.Op.SETATTR)
    kernel.close()  # the mount thread reads the end and returns
    thread.join(5)
    daemon_end.close()


# ---- the host ----------------------------------------------------------------------------------------


async def _file(guest: Peer, root: int, name: bytes = b"f") -> tuple[int, vfs.Attr]:
    body, _ = vfs.split_parent(vfs.Op.CREATE, await guest.ok(vfs.Create(root, os.O_RDWR, 0o644, name)))
    made = vfs.decode_result(vfs.Op.CREATE, body)
    assert isinstance(made, vfs.Created)
    return made.entry.node, made.entry.attr


async def _attr(guest: Peer, node: int) -> vfs.Attr:
    got = vfs.decode_result(vfs.Op.GETATTR, await guest.ok(vfs.Getattr(node, 0)))
    assert isinstance(got, vfs.AttrReply)
    return got.attr


async def test_the_host_makes_the_change_in_order_and_sends_no_reply() -> None:
    async with serving([Mount("/m", MemoryProvider())]) as (guest, server, hello):
        assert hello.features & vfs.FEATURE_SETATTR_NOTICE
        node, attr = await _file(guest, hello.mounts[0].root)
        await asyncio.sleep(0.001)  # so the ctime can move
        await guest.send(0, vfs.Setattr(node, vfs.SET_MODE, 0, 0, 0, 0, 0o644, 0, 0))
        # A real chmod right behind it on the port runs after it, whatever each takes.
        await guest.ok(vfs.Setattr(node, vfs.SET_MODE, 0, 0, 0, 0, 0o600, 0, 0))
        now = await _attr(guest, node)
        assert now.ctime_ns > attr.ctime_ns and stat.S_IMODE(now.mode) == 0o600
        assert 0 not in guest.replies and server.op_counts["SETATTR_NOTICE"] == 1 and not server.broken


async def test_a_write_reply_carries_the_files_new_attributes_only_when_asked() -> None:
    for features, suffix in ((vfs.FEATURES_ALL, True), (vfs.FEATURES_ALL & ~vfs.FEATURE_WRITE_ATTR, False)):
        async with serving([Mount("/m", MemoryProvider())], features) as (guest, _, hello):
            body, _ = vfs.split_parent(vfs.Op.CREATE, await guest.ok(vfs.Create(hello.mounts[0].root, 2, 0o644, b"f")))
            made = vfs.decode_result(vfs.Op.CREATE, body)
            assert isinstance(made, vfs.Created)
            payload = await guest.ok(vfs.Write(made.entry.node, made.fh, 0, 2, b"hello"))
            assert len(payload) == (4 + vfs.PARENT_STRUCT.size if suffix else 4)
            if suffix:
                valid, *fields = vfs.PARENT_STRUCT.unpack_from(payload, 4)
                assert valid > 0 and fields[1] == 5  # size


async def test_a_failure_or_another_outcome_drops_the_guests_attributes(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, "matchlock.vfs")
    async with serving([Mount("/m", HostFSProvider(str(tmp_path)))]) as (guest, server, hello):
        node, _ = await _file(guest, hello.mounts[0].root)
        await guest.send(0, vfs.Setattr(999, OWNER, 0, 0, 0, 0, 0, 0, 0))  # a node the host never gave
        assert vfs.decode_notice((await guest.reply(0)).payload) == (vfs.INVAL_INODE, 999, b"")
        # host_fs keeps no set-id bit: the mode came out otherwise than asked.
        await guest.send(0, vfs.Setattr(node, vfs.SET_MODE, 0, 0, 0, 0, 0o4644, 0, 0))
        assert vfs.decode_notice((await guest.reply(0)).payload) == (vfs.INVAL_INODE, node, b"")
        assert "mode 644, not 4644" in caplog.text and not server.broken
        # A guest sending failing ones by the thousand gets each notice, and the host's log a bounded few.
        for _ in range(30):
            await guest.send(0, vfs.Setattr(999, OWNER, 0, 0, 0, 0, 0, 0, 0))
            assert vfs.decode_notice((await guest.reply(0)).payload)[1] == 999
        assert server.check_failures == 32 and caplog.text.count("came out otherwise") == MAX_CHECK_LOGS


class WholeSecondsProvider(MemoryProvider):
    """A host filesystem with coarse timestamps (FAT keeps 2 s, some network filesystems 1 s)."""

    def setattr(self, path, changes, handle):
        attr = super().setattr(path, changes, handle)
        attr.mtime_ns -= attr.mtime_ns % SECOND
        return attr


async def test_times_kept_otherwise_than_asked_drop_the_guests_attributes(caplog) -> None:
    caplog.set_level(logging.WARNING, "matchlock.vfs")
    async with serving([Mount("/m", WholeSecondsProvider())]) as (guest, server, hello):
        node, _ = await _file(guest, hello.mounts[0].root)
        await guest.send(0, vfs.Setattr(node, vfs.SET_MTIME, 0, 0, 0, 5 * SECOND, 0, 0, 0))  # kept as asked
        await guest.send(0, vfs.Setattr(node, vfs.SET_MTIME, 0, 0, 0, 7 * SECOND + 5, 0, 0, 0))
        assert vfs.decode_notice((await guest.reply(0)).payload) == (vfs.INVAL_INODE, node, b"")
        assert f"mtime {7 * SECOND} ns, not {7 * SECOND + 5}" in caplog.text
        assert server.check_failures == 1 and not server.broken


async def test_a_notice_setattr_is_refused_unless_the_host_granted_it() -> None:
    async with serving([Mount("/m", MemoryProvider())], vfs.FEATURES_ALL & ~vfs.FEATURE_SETATTR_NOTICE) as (
        guest,
        server,
        hello,
    ):
        await guest.send(0, vfs.Setattr(hello.mounts[0].root, vfs.SET_MODE, 0, 0, 0, 0, 0o755, 0, 0))
        async with asyncio.timeout(5):
            while not server.broken:
                await asyncio.sleep(0.01)
        assert "FEATURE_SETATTR_NOTICE" in server.broken


@pytest.mark.parametrize(
    "mounts, interception, granted",
    [
        ([Mount("/m", MemoryProvider()), Mount("/m/n", MemoryProvider())], None, True),
        ([Mount("/m", MemoryProvider()), Mount("/m/ro", MemoryProvider(), readonly=True)], None, False),
        ([Mount("/m", MemoryProvider(), readonly=True), Mount("/m/rw", MemoryProvider())], None, False),
        (
            [Mount("/m", MemoryProvider()), Mount("/r", MemoryProvider(), readonly=True)],
            None,
            True,
        ),  # the kernel's EROFS
        ([Mount("/m", MemoryProvider())], VFSInterceptionConfig(emit_events=True), False),  # rules see every SETATTR
    ],
)
async def test_granted_only_where_the_guest_kernel_knows_every_refusal(mounts, interception, granted) -> None:
    async with serving(mounts, interception=interception) as (_, _, hello):
        assert bool(hello.features & vfs.FEATURE_SETATTR_NOTICE) == granted


async def test_not_granted_with_a_host_side_overlay(tmp_path) -> None:
    (tmp_path / "lower").mkdir()
    overlay = OverlayProvider(str(tmp_path / "lower"), str(tmp_path / "private" / "upper"))
    async with serving([Mount("/m", MemoryProvider()), Mount("/o", overlay)]) as (_, _, hello):
        assert not hello.features & vfs.FEATURE_SETATTR_NOTICE  # its copy-ups would stall the read loop


def test_the_wire_takes_a_setattr_with_id_0():
    frame = vfs.encode_request(0, 1, 2, 3, vfs.Setattr(5, vfs.SET_MODE, 0, 0, 0, 0, 0o644, 0, 0))
    (got,) = vfs.RequestDecoder().feed(frame)
    assert got.id == 0 and got.args == vfs.Setattr(5, vfs.SET_MODE, 0, 0, 0, 0, 0o644, 0, 0)
    with pytest.raises(RemoteProtocolError, match="id 0"):
        vfs.RequestDecoder().feed(vfs.encode_request(0, 1, 2, 3, vfs.Getattr(5, 0)))
