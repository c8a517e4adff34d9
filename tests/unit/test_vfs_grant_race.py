"""A host notice that overtakes a reply granting the guest leave to open a directory itself.

The host decides an OPENDIR_READ's leave before it reads the entries' attributes; a watch that stops
meanwhile (or any change to the directory) sends its notices ahead of that reply. The guest must not
keep a leave the notice already ended, whichever thread applies the notice first.
"""

from __future__ import annotations

import socket
import threading

import pytest
from test_guest_fuse_dirs import CACHED, DIR, ENTRIES, ROOT, local_fh, opendir, opened_by_host, readdir, reply

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
