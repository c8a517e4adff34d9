"""The reply thread never writes a kernel notice that could wait for a request it has yet to answer."""

from __future__ import annotations

import socket
import stat
import threading

from matchlock.guest import fuse, fuse_daemon
from matchlock.wire import vfs

FILE_ATTR = vfs.Attr(ino=50, size=0, blocks=0, atime_ns=0, mtime_ns=0, ctime_ns=0, mode=stat.S_IFREG | 0o644,
                     nlink=2, uid=0, gid=0)  # fmt: skip
BOUND = 10.0  # seconds: only a deadlock takes this long


class PageLockedMount:
    """A mount whose INVAL_INODE waits, as the kernel's does for a page a READ in flight holds locked,
    until the reply to that READ (unique 8) has been written."""

    def __init__(self) -> None:
        self.translator = fuse.MountTranslator(2)
        self.read_answered = threading.Event()
        self.notified = threading.Event()

    def write(self, buffers: list[bytes]) -> None:
        if fuse.OUT_HEADER.unpack_from(b"".join(buffers))[2] == 8:
            self.read_answered.set()

    def notify_kernel(self, notice: bytes) -> None:
        self.read_answered.wait(BOUND)
        self.notified.set()


def _request(op: int, unique: int, nodeid: int, body: bytes) -> bytes:
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), op, unique, nodeid, 0, 0, 5, 0, 0) + body


def _until_eof(channel: fuse_daemon.Channel, notices: fuse_daemon.Notices) -> None:
    try:
        fuse_daemon.serve_replies(channel, notices)
    except EOFError:
        pass


def test_the_link_notice_is_written_off_the_reply_thread():
    guest, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.setblocking(False)
    channel = fuse_daemon.Channel(guest.fileno())
    mount = PageLockedMount()
    notices = fuse_daemon.Notices()
    link = mount.translator.handle(_request(fuse.LINK, 7, 2, fuse.LINK_IN.pack(50) + b"hard\0"))
    read = mount.translator.handle(_request(fuse.READ, 8, 50, fuse.READ_IN.pack(3, 0, 4096, 0, 0, 0, 0)))
    assert link.pending is not None and read.pending is not None
    channel.pending[1], channel.pending[2] = (mount, link.pending), (mount, read.pending)
    threading.Thread(target=notices.serve, daemon=True).start()
    replies = threading.Thread(target=_until_eof, args=(channel, notices), daemon=True)
    replies.start()
    try:
        host.sendall(vfs.encode_reply(1, vfs.Entry(51, 0, 0, 0, FILE_ATTR)) + vfs.encode_reply(2, b"data"))
        # The LINK's reply asks to drop the source's pages; the READ's reply behind it must still go out.
        assert mount.read_answered.wait(BOUND), "the reply thread waited on its own notice: deadlock"
        assert mount.notified.wait(BOUND)
    finally:
        mount.read_answered.set()
        host.close()  # first: the reply thread sees EOF and ends
        replies.join(BOUND)
        guest.close()
