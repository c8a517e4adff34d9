"""The FUSE daemon's plumbing without a VM: socketpairs stand in for /dev/fuse and the VFS port."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading

import pytest

from matchlock.guest import fuse, fuse_daemon
from matchlock.wire import vfs

DIR_ATTR = vfs.Attr(ino=1, size=0, blocks=0, atime_ns=0, mtime_ns=0, ctime_ns=0, mode=stat.S_IFDIR | 0o755, nlink=2,
                    uid=0, gid=0)  # fmt: skip
FILE_ATTR = vfs.Attr(ino=2, size=0, blocks=0, atime_ns=0, mtime_ns=0, ctime_ns=0, mode=stat.S_IFREG | 0o600, nlink=1,
                     uid=0, gid=0)  # fmt: skip


class FakeHost:
    """The host end of the VFS port, driven step by step from the test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = vfs.RequestDecoder()
        self.queue: list[vfs.Request] = []

    def take(self, count: int) -> list[vfs.Request]:
        while len(self.queue) < count:
            data = self.sock.recv(1 << 20)
            assert data, "the daemon closed the port"
            self.queue += self.decoder.feed(data)
        taken, self.queue = self.queue[:count], self.queue[count:]
        return taken

    def reply(self, request: vfs.Request, result: vfs.Result = None, error: int = 0) -> None:
        frame = vfs.encode_error(request.id, error) if error else vfs.encode_reply(request.id, result)
        self.sock.sendall(frame)


@pytest.fixture
def port():
    guest, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.setblocking(False)  # as the daemon opens the port
    yield fuse_daemon.Channel(guest.fileno()), FakeHost(host)
    host.close()  # first, so a reply thread still reading sees EOF
    guest.close()


def _until_eof(channel: fuse_daemon.Channel) -> None:
    try:
        fuse_daemon.serve_replies(channel)
    except EOFError:
        pass


def _serve(channel: fuse_daemon.Channel) -> tuple[socket.socket, socket.socket, list[threading.Thread]]:
    """Serve one mount of host node 2 on a socketpair (the kernel's end first) and the port's replies."""
    kernel, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mount = fuse_daemon.Mount(vfs.Mount("/m", 2, False), daemon_end.fileno(), vfs.MAX_IO)
    threads = [
        threading.Thread(target=fuse_daemon.serve_mount, args=(channel, mount), daemon=True),
        threading.Thread(target=_until_eof, args=(channel,), daemon=True),
    ]
    for thread in threads:
        thread.start()
    return kernel, daemon_end, threads


def fuse_request(op: int, unique: int, nodeid: int, body: bytes) -> bytes:
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), op, unique, nodeid, 1000, 1000, 5, 0, 0) + body


def test_handshake_then_mount_each_mount_point(port, tmp_path, monkeypatch):
    channel, host = port
    mounted = []
    monkeypatch.setattr(fuse_daemon.syscalls, "mount", lambda *args: mounted.append(args))
    (tmp_path / "fuse").write_bytes(b"")
    monkeypatch.setattr(fuse_daemon, "FUSE_DEVICE", str(tmp_path / "fuse"))
    target, single = tmp_path / "new" / "work", tmp_path / "etc" / "config.toml"
    (tmp_path / "etc").mkdir()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fuse_daemon.handshake(channel)))
    thread.start()
    (hello,) = host.take(1)
    assert hello.args == vfs.Hello(vfs.VERSION, vfs.MAX_IO, vfs.FEATURES_ALL)
    mounts = (vfs.Mount(str(target), 2, False), vfs.Mount(str(single), 3, True, 10**9))
    host.reply(hello, vfs.HelloReply(vfs.VERSION, 1 << 18, mounts, features=vfs.FEATURE_KILLPRIV))
    (getattr_dir,) = host.take(1)
    assert getattr_dir.args == vfs.Getattr(2, 0)
    host.reply(getattr_dir, vfs.AttrReply(0, DIR_ATTR))
    (getattr_file,) = host.take(1)
    host.reply(getattr_file, vfs.AttrReply(0, FILE_ATTR))
    thread.join(10)
    ((max_io, roots),) = result
    assert max_io == 1 << 18
    assert [(info.path, mode) for info, mode in roots] == [(str(target), stat.S_IFDIR), (str(single), stat.S_IFREG)]
    assert channel.features == vfs.FEATURE_KILLPRIV  # only what the host serves
    made = [fuse_daemon.mount(info, mode, max_io, channel.features) for info, mode in roots]
    assert target.is_dir() and single.is_file()
    assert [m[1:4] for m in mounted] == [
        (str(target), "fuse.matchlock", fuse_daemon.syscalls.MS_NOSUID | fuse_daemon.syscalls.MS_NODEV),
        (str(single), "fuse.matchlock",
         fuse_daemon.syscalls.MS_NOSUID | fuse_daemon.syscalls.MS_NODEV | fuse_daemon.syscalls.MS_RDONLY),
    ]  # fmt: skip
    assert "rootmode=40000," in mounted[0][4] and "rootmode=100000," in mounted[1][4]
    assert "allow_other,default_permissions" in mounted[0][4]
    assert [m.translator.max_io for m in made] == [1 << 18, 1 << 18]
    assert made[1].translator.negative_valid_ns == 10**9
    assert made[0].translator.features == vfs.FEATURE_KILLPRIV
    for m in made:
        os.close(m.fd)


def test_a_mount_point_of_the_wrong_kind_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RuntimeError, match="is a directory"):
        fuse_daemon._make_mount_point(str(tmp_path / "file"), True)


def test_requests_are_pipelined_and_replies_matched_out_of_order(port):
    channel, host = port
    kernel, daemon_end, threads = _serve(channel)
    read_in = fuse.READ_IN.pack(7, 0, 4096, 0, 0, 0, 0)
    kernel.send(fuse_request(fuse.READ, 11, 42, read_in))
    kernel.send(fuse_request(fuse.LOOKUP, 12, 1, b"x\0"))
    kernel.send(fuse_request(fuse.FORGET, 13, 42, fuse.FORGET_IN.pack(1)))
    kernel.send(fuse_request(22, 14, 42, b""))  # GETXATTR: answered in the guest at once
    assert fuse.OUT_HEADER.unpack(kernel.recv(4096)) == (16, -errno.ENOSYS, 14)
    read, lookup, forget = host.take(3)
    assert (read.args, read.uid, read.pid) == (vfs.Read(42, 7, 0, 4096), 1000, 5)
    assert lookup.args == vfs.Lookup(2, b"x") and forget.args == vfs.Forget(((42, 1),))
    # Both are in flight at once; the later one is answered first.
    host.reply(lookup, error=errno.ENOENT)
    host.reply(read, b"hello")
    assert fuse.OUT_HEADER.unpack(kernel.recv(4096)) == (16, -errno.ENOENT, 12)
    data = kernel.recv(4096)
    assert fuse.OUT_HEADER.unpack_from(data) == (21, 0, 11) and data[16:] == b"hello"
    assert channel.pending == {}
    kernel.close()
    threads[0].join(10)
    assert not threads[0].is_alive()
    host.sock.close()
    threads[1].join(10)
    assert not threads[1].is_alive()
    daemon_end.close()


def test_stats_when_the_host_asks_time_each_request(port, capfd, monkeypatch):
    channel, host = port
    channel.stats = fuse_daemon.Stats()
    monkeypatch.setattr(fuse_daemon.Stats, "INTERVAL_NS", 0)
    kernel, daemon_end, threads = _serve(channel)
    kernel.send(fuse_request(fuse.LOOKUP, 12, 1, b"x\0"))
    (lookup,) = host.take(1)
    host.reply(lookup, error=errno.ENOENT)
    assert fuse.OUT_HEADER.unpack(kernel.recv(4096)) == (16, -errno.ENOENT, 12)
    kernel.close()
    threads[0].join(10)
    host.sock.close()
    threads[1].join(10)
    daemon_end.close()
    err = capfd.readouterr().err
    assert "matchlock-vfs: stats at" in err and "1 requests in 1 port reads" in err, err
