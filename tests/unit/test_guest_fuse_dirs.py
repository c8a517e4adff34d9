"""Directories the guest opens itself (FEATURE_GUEST_OPENDIR): when, with which flags, and the host's handle."""

from __future__ import annotations

import errno
import stat

import pytest

from matchlock.guest import fuse
from matchlock.guest.fuse_dirs import LOCAL_FH
from matchlock.wire import vfs
from matchlock.wire.frames import RemoteProtocolError

ROOT = 100
DIR = 42
CACHED = vfs.OPEN_CACHE_DIR | vfs.OPEN_KEEP_CACHE
ATTR = vfs.Attr(ino=5, size=3, blocks=1, atime_ns=0, mtime_ns=0, ctime_ns=0, mode=stat.S_IFREG | 0o644, nlink=1,
                uid=0, gid=0)  # fmt: skip
ENTRIES = (
    vfs.DirEntry(1, 1, stat.S_IFDIR >> 12, b"."),
    vfs.DirEntry(2, 5, stat.S_IFREG >> 12, b"f", vfs.Entry(77, 0, 10**9, 10**9, ATTR)),
)


def request(op: int, body: bytes = b"", nodeid: int = DIR, unique: int = 9) -> bytes:
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), op, unique, nodeid, 0, 0, 1, 0, 0) + body


def opendir(tr: fuse.MountTranslator, nodeid: int = DIR) -> fuse.Action:
    return tr.handle(request(fuse.OPENDIR, fuse.OPEN_IN.pack(0o200000, 0), nodeid))


def readdir(tr: fuse.MountTranslator, fh: int, op: int = fuse.READDIRPLUS, offset: int = 0) -> fuse.Action:
    return tr.handle(request(op, fuse.READ_IN.pack(fh, offset, 4096, 0, 0, 0, 0)))


def releasedir(tr: fuse.MountTranslator, fh: int) -> fuse.Action:
    return tr.handle(request(fuse.RELEASEDIR, fuse.RELEASE_IN.pack(fh, 0, 0, 0)))


def reply(tr: fuse.MountTranslator, action: fuse.Action, result: vfs.Result):
    """The host's `result` for the forwarded `action`: (the kernel's reply body, the notice to send)."""
    assert action.pending is not None
    (frame,) = vfs.ReplyDecoder().feed(vfs.encode_reply(1, result))
    buffers, notice = tr.complete(action.pending, frame.status, frame.payload)
    data = b"".join(buffers)
    assert fuse.OUT_HEADER.unpack_from(data) == (len(data), 0, 9)
    return data[fuse.OUT_HEADER.size :], notice


def opened_by_host(tr: fuse.MountTranslator, host_fh: int = 8, flags: int = CACHED | vfs.OPEN_GUEST_DIR) -> bytes:
    action = opendir(tr)
    assert action.args == vfs.Opendir(DIR, 0)
    body, _ = reply(tr, action, vfs.Opened(host_fh, flags))
    return body


def local_fh(action: fuse.Action) -> int:
    """The handle of an OPENDIR answered in the guest (nothing sent to the host)."""
    assert action.reply is not None and action.args is None and action.pending is None and not action.notices
    fh, flags, _ = fuse.OPEN_OUT.unpack_from(action.reply, fuse.OUT_HEADER.size)
    assert fh & LOCAL_FH and flags == CACHED
    return fh


@pytest.fixture
def tr() -> fuse.MountTranslator:
    return fuse.MountTranslator(ROOT)


def test_after_the_host_allows_it_opendir_is_answered_here_with_the_hosts_flags(tr):
    # The kernel never sees the guest-only bit.
    assert fuse.OPEN_OUT.unpack(opened_by_host(tr)) == (8, CACHED, 0)
    first, second = local_fh(opendir(tr)), local_fh(opendir(tr))
    assert first != second
    # Released without a read: the host holds nothing for it, so nothing is sent.
    release = releasedir(tr, first)
    assert release.reply == fuse.OUT_HEADER.pack(16, 0, 9) and release.notices == () and release.args is None


def test_without_the_hosts_leave_every_opendir_goes_to_the_host(tr):
    assert fuse.OPEN_OUT.unpack(opened_by_host(tr, flags=CACHED)) == (8, CACHED, 0)
    assert opendir(tr).args == vfs.Opendir(DIR, 0)
    # Unwatched host_fs (no cache flags): the same.
    opened_by_host(tr, flags=0)
    assert opendir(tr).args == vfs.Opendir(DIR, 0)


def test_a_read_that_misses_the_kernels_cache_opens_the_hosts_handle_in_the_same_round_trip(tr):
    opened_by_host(tr)
    fh = local_fh(opendir(tr))
    first = readdir(tr, fh)
    assert first.args == vfs.OpendirRead(DIR, 0, 4096, 1)
    body, notice = reply(tr, first, vfs.DirOpened(31, CACHED | vfs.OPEN_GUEST_DIR, ENTRIES))
    assert notice is None  # every entry fitted: no lookup to give back
    # READDIRPLUS: each dirent after its entry ('.' has none), 'f' with the host's node.
    assert fuse.DIRENT.unpack_from(body, fuse.ENTRY_SIZE) == (1, 1, 1, stat.S_IFDIR >> 12)
    assert fuse.ENTRY_OUT.unpack_from(body, vfs.dirent_size(1, True))[0] == 77
    # Later reads use the host's handle; the release gives it back.
    assert readdir(tr, fh, fuse.READDIR, offset=2).args == vfs.Readdir(DIR, 31, 2, 4096, 0)
    assert releasedir(tr, fh).notices == (vfs.Releasedir(DIR, 31),)
    assert fuse.OUT_HEADER.unpack(readdir(tr, fh).reply) == (16, -errno.EBADF, 9)


def test_a_handle_released_while_its_host_open_is_in_flight_is_given_back_when_it_arrives(tr):
    opened_by_host(tr)
    fh = local_fh(opendir(tr))
    read = readdir(tr, fh)  # interrupted: the kernel closes the directory before the reply
    assert releasedir(tr, fh).notices == ()
    _, notice = reply(tr, read, vfs.DirOpened(31, CACHED | vfs.OPEN_GUEST_DIR, ENTRIES))
    assert notice == vfs.Releasedir(DIR, 31)


def test_a_second_host_handle_for_one_of_ours_is_given_back(tr):
    opened_by_host(tr)
    fh = local_fh(opendir(tr))
    first, again = readdir(tr, fh), readdir(tr, fh)  # the first interrupted, the read retried
    assert again.args == vfs.OpendirRead(DIR, 0, 4096, 1)
    reply(tr, first, vfs.DirOpened(31, CACHED | vfs.OPEN_GUEST_DIR, ()))
    _, notice = reply(tr, again, vfs.DirOpened(32, CACHED | vfs.OPEN_GUEST_DIR, ()))
    assert notice == vfs.Releasedir(DIR, 32)
    assert releasedir(tr, fh).notices == (vfs.Releasedir(DIR, 31),)


@pytest.mark.parametrize("how", ["inval_inode", "forget", "host_withdraws", "host_refuses_the_read"])
def test_the_leave_ends_with_a_change_notice_a_forget_or_the_host_saying_so(tr, how):
    opened_by_host(tr)
    if how == "inval_inode":
        tr.drop_node(DIR)
    elif how == "forget":
        assert tr.handle(request(fuse.FORGET, fuse.FORGET_IN.pack(1))).notices == (vfs.Forget(((DIR, 1),)),)
    elif how == "host_withdraws":  # e.g. the watch stopped between the open here and the first read
        read = readdir(tr, local_fh(opendir(tr)))
        reply(tr, read, vfs.DirOpened(31, 0, ()))
    else:  # e.g. the directory is gone on the host: the next open asks the host, which says so
        read = readdir(tr, local_fh(opendir(tr)))
        assert read.pending is not None
        buffers, notice = tr.complete(read.pending, -errno.ENOENT, b"")
        assert fuse.OUT_HEADER.unpack(b"".join(buffers)) == (16, -errno.ENOENT, 9) and notice is None
    assert opendir(tr).args == vfs.Opendir(DIR, 0)


def test_the_root_is_opened_here_by_its_host_node(tr):
    action = opendir(tr, fuse.ROOT_ID)
    assert action.args == vfs.Opendir(ROOT, 0)
    reply(tr, action, vfs.Opened(8, CACHED | vfs.OPEN_GUEST_DIR))
    fh = local_fh(opendir(tr, fuse.ROOT_ID))
    assert readdir(tr, fh).args == vfs.OpendirRead(ROOT, 0, 4096, 1)
    tr.drop_node(ROOT)  # notices name the root by its host node
    assert opendir(tr, fuse.ROOT_ID).args == vfs.Opendir(ROOT, 0)


def test_a_host_handle_with_the_guests_own_bit_is_refused(tr):
    action = opendir(tr)
    with pytest.raises(RemoteProtocolError, match="guest's own bit"):
        reply(tr, action, vfs.Opened(LOCAL_FH | 3, CACHED | vfs.OPEN_GUEST_DIR))


def test_an_unknown_handle_of_ours_is_ebadf_and_its_release_sends_nothing(tr):
    assert fuse.OUT_HEADER.unpack(readdir(tr, LOCAL_FH | 5).reply) == (16, -errno.EBADF, 9)
    assert releasedir(tr, LOCAL_FH | 5).notices == ()
    # A host handle passes through as before.
    assert readdir(tr, 8).args == vfs.Readdir(DIR, 8, 0, 4096, 1)
    assert releasedir(tr, 8).notices == (vfs.Releasedir(DIR, 8),)
