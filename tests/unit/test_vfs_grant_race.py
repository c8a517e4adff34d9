"""A host notice that overtakes a reply granting the guest leave to open a directory itself.

The host decides an OPENDIR_READ's leave before it reads the entries' attributes; a watch that stops
meanwhile (or any change to the directory) sends its notices ahead of that reply. The guest must not
keep a leave the notice already ended, whichever thread applies the notice first.
"""

from __future__ import annotations

import errno
import socket
import threading

import pytest
from test_guest_fuse_dirs import (
    CACHED,
    DIR,
    ENTRIES,
    ROOT,
    local_fh,
    opendir,
    opened_by_host,
    readdir,
    reply,
    request,
)

from matchlock.guest import fuse, fuse_daemon, fuse_dirs
from matchlock.wire import vfs

GRANT = CACHED | vfs.OPEN_GUEST_DIR


def notice(node: int) -> bytes:
    return vfs.encode_notice(vfs.INVAL_INODE, node)[vfs.REPLY_HEADER.size :]


@pytest.fixture
def daemon():
    """A mount whose notices are served by the daemon's own thread; yields (translator, notices, kernel end)."""
    kernel, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mount = fuse_daemon.Mount(vfs.Mount("/m", ROOT, False, 10**9), daemon_end.fileno(), vfs.MAX_IO)
    mount.initialized.set()
    notices = fuse_daemon.Notices()
    notices.mounts.append(mount)
    threading.Thread(target=notices.serve, daemon=True).start()
    kernel.settimeout(10)
    yield mount.translator, notices, kernel
    kernel.close()
    daemon_end.close()


def test_a_leave_granted_by_a_reply_the_notice_overtook_is_not_kept(daemon):
    tr, notices, kernel = daemon
    opened_by_host(tr)
    read = readdir(tr, local_fh(opendir(tr)))
    assert read.args == vfs.OpendirRead(DIR, 0, 4096, 1)
    # The watch stops while the host reads the attributes: its notice is on the port before the reply,
    # and the notices' thread has applied it (the kernel got it) before the reply thread reads the reply.
    notices.put(notice(DIR))
    assert kernel.recv(4096) == fuse.inval_inode_notice(DIR)
    body, _ = reply(tr, read, vfs.DirOpened(31, GRANT, ENTRIES))
    assert body  # the listing itself is the kernel's to check (it compares the directory's mtime)
    assert opendir(tr).args == vfs.Opendir(DIR, 0)  # asked again: the host decides anew


def test_a_notice_before_the_open_leaves_the_later_reads_leave(daemon):
    tr, notices, kernel = daemon
    opened_by_host(tr)
    notices.put(notice(DIR))
    kernel.recv(4096)
    opened_by_host(tr)  # the next open asks the host, which grants again
    read = readdir(tr, local_fh(opendir(tr)))
    reply(tr, read, vfs.DirOpened(31, GRANT, ENTRIES))
    local_fh(opendir(tr))


def test_a_notice_for_another_node_leaves_the_leave(daemon):
    tr, notices, kernel = daemon
    opened_by_host(tr)
    read = readdir(tr, local_fh(opendir(tr)))
    notices.put(notice(DIR + 1))
    kernel.recv(4096)
    reply(tr, read, vfs.DirOpened(31, GRANT, ENTRIES))
    local_fh(opendir(tr))


def test_an_open_older_than_the_forgotten_notices_is_refused_its_leave(monkeypatch):
    monkeypatch.setattr(fuse_dirs, "MAX_NODES", 2)
    tr = fuse.MountTranslator(ROOT)
    opened_by_host(tr)
    read = readdir(tr, local_fh(opendir(tr)))
    tr.dirs.learned(DIR + 1, 5, GRANT)
    tr.dirs.noticed(DIR)
    tr.dirs.learned(DIR + 2, 6, GRANT)
    tr.dirs.noticed(DIR + 1)
    tr.dirs.noticed(DIR + 2)  # the third directory noted forgets which the first was
    opened_by_host(tr)
    reply(tr, read, vfs.DirOpened(31, GRANT, ENTRIES))
    assert opendir(tr).args == vfs.Opendir(DIR, 0)


def test_a_listing_the_notice_overtook_is_not_kept_before_the_notices_thread_runs():
    # The reply thread applies a notice as it reads it: the listing behind it (decided before the
    # directory changed) is neither kept nor a leave to open the directory, whatever the notices'
    # thread (not started here) has done by then.
    kernel, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with kernel, daemon_end:
        info = vfs.Mount("/m", ROOT, False, 10**9)
        mount = fuse_daemon.Mount(info, daemon_end.fileno(), vfs.MAX_IO, vfs.FEATURES_ALL)
        notices = fuse_daemon.Notices()
        notices.mounts.append(mount)
        tr = mount.translator
        first = tr.handle(request(fuse.LOOKUP, b"a\0", fuse.ROOT_ID))
        assert first.wire is not None and first.wire[0] == vfs.Op.LOOKUP_DIR
        notices.put(notice(ROOT))
        attr = ENTRIES[1].entry.attr
        listed = tuple(
            vfs.DirEntry(3 + i, 8, 8, name, vfs.Entry(200 + i, 0, 10**12, 10**12, attr))
            for i, name in enumerate((b"a", b"b"))
        )
        _, given = reply(tr, first, vfs.Listed(None, listed))
        assert given == vfs.Forget(((201, 1),))  # "b" goes back to the host at once
        assert tr.dirs.open(ROOT) is None
        assert tr.handle(request(fuse.LOOKUP, b"b\0", fuse.ROOT_ID)).pending is not None  # not from the listing


def test_a_refused_read_leaves_later_notices_refusing_the_other_reads_leave():
    tr = fuse.MountTranslator(ROOT)
    opened_by_host(tr)
    first = readdir(tr, local_fh(opendir(tr)))
    second = readdir(tr, local_fh(opendir(tr)))
    assert second.pending is not None
    tr.complete(second.pending, -errno.ENOENT, b"")  # the leave ends: the next open asks the host
    tr.drop_node(DIR)  # a notice after both opens, before the first read's reply
    reply(tr, first, vfs.DirOpened(31, GRANT, ENTRIES))
    assert opendir(tr).args == vfs.Opendir(DIR, 0)
