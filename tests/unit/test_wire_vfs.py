"""The VFS channel codec: every request and reply round-trips, and a hostile guest is refused."""

from __future__ import annotations

import errno
import struct

import pytest

from matchlock.wire import vfs
from matchlock.wire.frames import LocalProtocolError, RemoteProtocolError

ATTR = vfs.Attr(ino=7, size=10, blocks=8, atime_ns=-1, mtime_ns=1_700_000_000_123_456_789, ctime_ns=3,
                mode=0o100644, nlink=1, uid=1000, gid=1000, rdev=0, blksize=4096)  # fmt: skip
ENTRY = vfs.Entry(node=42, generation=0, entry_valid_ns=1_000_000_000, attr_valid_ns=500, attr=ATTR)

REQUESTS = [
    vfs.Hello(version=1, max_io=1 << 20),
    vfs.Lookup(parent=2, name=b"file.txt"),
    vfs.Forget(items=((2, 1), (42, 3))),
    vfs.Getattr(node=42, fh=0),
    vfs.Setattr(
        node=42, valid=vfs.SET_SIZE | vfs.SET_MTIME, fh=9, size=1 << 40, atime_ns=0, mtime_ns=-5, mode=0, uid=0, gid=0
    ),  # fmt: skip
    vfs.Readlink(node=42),
    vfs.Symlink(parent=2, name=b"link", target=b"../a/b"),
    vfs.Mknod(parent=2, mode=0o010644, rdev=0, name=b"fifo"),
    vfs.Mkdir(parent=2, mode=0o755, name=b"dir"),
    vfs.Unlink(parent=2, name=b"f"),
    vfs.Rmdir(parent=2, name=b"d"),
    vfs.Rename(parent=2, newparent=3, flags=vfs.RENAME_NOREPLACE, name=b"a", newname=b"b"),
    vfs.Link(node=42, newparent=3, newname=b"hard"),
    vfs.Open(node=42, flags=0o1101),
    vfs.Create(parent=2, flags=0o102, mode=0o100600, name=b"new"),
    vfs.Read(node=42, fh=9, offset=1 << 33, size=vfs.MAX_IO),
    vfs.Write(node=42, fh=9, offset=5, flags=0o2001, data=b"\x00\xff" * 1000),
    vfs.Flush(node=42, fh=9),
    vfs.Release(node=42, fh=9),
    vfs.Fsync(node=42, fh=9, datasync=1),
    vfs.Opendir(node=2, flags=0),
    vfs.Readdir(node=2, fh=4, offset=17, size=65536, plus=1),
    vfs.Releasedir(node=2, fh=4),
    vfs.Statfs(node=2),
    vfs.OpendirRead(node=2, offset=0, size=4096, plus=1),
    vfs.LookupDir(parent=2, name=b"src"),
    vfs.Parked(token=7),
]


def test_every_op_has_a_request_record():
    assert {type(args)._op for args in REQUESTS} == set(vfs.OP_NAMES)


@pytest.mark.parametrize("args", REQUESTS, ids=lambda a: type(a).__name__)
def test_request_round_trip(args):
    request_id = 0 if isinstance(args, (vfs.Forget, vfs.Parked)) else 77  # id 0 only: no reply
    frame = vfs.encode_request(request_id, 1000, 100, 4321, args)
    assert frame[4:9] == (struct.pack(">I", request_id) + bytes([type(args)._op]))
    (request,) = vfs.RequestDecoder().feed(frame)
    assert request.args == args
    assert (request.op, request.uid, request.gid, request.pid) == (type(args)._op, 1000, 100, 4321)


def test_requests_split_at_every_byte_come_out_whole_and_in_order():
    ids = [0 if isinstance(args, vfs.Parked) else i + 1 for i, args in enumerate(REQUESTS)]
    stream = b"".join(vfs.encode_request(ids[i], 0, 0, i, args) for i, args in enumerate(REQUESTS))
    decoder = vfs.RequestDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    decoder.close()
    assert [r.args for r in out] == REQUESTS
    assert [r.pid for r in out] == list(range(len(REQUESTS)))


def test_write_data_is_raw_bytes_after_the_fixed_fields():
    frame = vfs.encode_request(1, 0, 0, 0, vfs.Write(node=2, fh=3, offset=4, flags=0, data=b"hello"))
    assert frame.endswith(struct.pack(">QQQI", 2, 3, 4, 0) + b"hello")


def test_unknown_op_decodes_with_no_args_so_the_host_can_answer_enosys():
    frame = struct.pack(">IIBIII", 3, 5, 200, 0, 0, 0) + b"abc"
    (request,) = vfs.RequestDecoder().feed(frame)
    assert (request.id, request.op, request.args) == (5, 200, None)


def _raw(op: int, payload: bytes, request_id: int = 1) -> bytes:
    return struct.pack(">IIBIII", len(payload), request_id, op, 0, 0, 0) + payload


def _name(name: bytes) -> bytes:
    return struct.pack(">H", len(name)) + name


HOSTILE = {
    "oversized length": struct.pack(">IIBIII", vfs.MAX_PAYLOAD + 1, 1, vfs.Op.LOOKUP, 0, 0, 0),
    "slash in name": _raw(vfs.Op.LOOKUP, struct.pack(">Q", 2) + _name(b"a/b")),
    "NUL in name": _raw(vfs.Op.LOOKUP, struct.pack(">Q", 2) + _name(b"a\x00")),
    "dot-dot name": _raw(vfs.Op.UNLINK, struct.pack(">Q", 2) + _name(b"..")),
    "dot name": _raw(vfs.Op.MKDIR, struct.pack(">QI", 2, 0o755) + _name(b".")),
    "empty name": _raw(vfs.Op.LOOKUP, struct.pack(">Q", 2) + _name(b"")),
    "256-byte name": _raw(vfs.Op.LOOKUP, struct.pack(">Q", 2) + _name(b"x" * 256)),
    "name past the frame": _raw(vfs.Op.LOOKUP, struct.pack(">QH", 2, 10) + b"abc"),
    "short fixed fields": _raw(vfs.Op.READ, b"\x00" * 10),
    "stray bytes": _raw(vfs.Op.GETATTR, struct.pack(">QQ", 2, 0) + b"x"),
    "node 0": _raw(vfs.Op.GETATTR, struct.pack(">QQ", 0, 0)),
    "read above MAX_IO": _raw(vfs.Op.READ, struct.pack(">QQQI", 2, 1, 0, vfs.MAX_IO + 1)),
    "readdir above MAX_IO": _raw(vfs.Op.READDIR, struct.pack(">QQQIB", 2, 1, 0, vfs.MAX_IO + 1, 0)),
    "readdir plus 2": _raw(vfs.Op.READDIR, struct.pack(">QQQIB", 2, 1, 0, 100, 2)),
    "opendir_read above MAX_IO": _raw(vfs.Op.OPENDIR_READ, struct.pack(">QQIB", 2, 0, vfs.MAX_IO + 1, 0)),
    "opendir_read plus 2": _raw(vfs.Op.OPENDIR_READ, struct.pack(">QQIB", 2, 0, 100, 2)),
    "opendir_read of node 0": _raw(vfs.Op.OPENDIR_READ, struct.pack(">QQIB", 0, 0, 100, 0)),
    "write above MAX_IO": _raw(vfs.Op.WRITE, struct.pack(">QQQI", 2, 1, 0, 0) + b"x" * (vfs.MAX_IO + 1)),
    "forget count past the frame": _raw(vfs.Op.FORGET, struct.pack(">I", 3) + struct.pack(">QQ", 5, 1), 0),
    "forget count 0": _raw(vfs.Op.FORGET, struct.pack(">I", 0), 0),
    "forget of too many": _raw(vfs.Op.FORGET, struct.pack(">I", vfs.MAX_FORGETS + 1), 0),
    "forget of the root alias": _raw(vfs.Op.FORGET, struct.pack(">IQQ", 1, 1, 1), 0),
    "id 0 on lookup": _raw(vfs.Op.LOOKUP, struct.pack(">Q", 2) + _name(b"a"), 0),
    "setattr unknown bits": _raw(vfs.Op.SETATTR, struct.pack(">QIQQqqIII", 2, 1 << 20, 0, 0, 0, 0, 0, 0, 0)),
    "open with O_DIRECTORY": _raw(vfs.Op.OPEN, struct.pack(">QI", 2, 0o200000)),
    "rename whiteout": _raw(vfs.Op.RENAME, struct.pack(">QQI", 2, 2, 4) + _name(b"a") + _name(b"b")),
    "symlink target with NUL": _raw(vfs.Op.SYMLINK, struct.pack(">Q", 2) + _name(b"l") + _name(b"a\x00b")),
    "symlink target too long": _raw(
        vfs.Op.SYMLINK, struct.pack(">Q", 2) + _name(b"l") + struct.pack(">H", 4096) + b"a" * 4096
    ),
    "hello not JSON": _raw(vfs.Op.HELLO, b"{"),
    "hello max_io too big": _raw(vfs.Op.HELLO, b'{"version": 1, "max_io": 1073741824}'),
    "hello not an object": _raw(vfs.Op.HELLO, b"[1]"),
}


@pytest.mark.parametrize("frame", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_requests_are_refused(frame):
    with pytest.raises(RemoteProtocolError):
        vfs.RequestDecoder().feed(frame)


def test_oversized_length_is_refused_before_its_payload_arrives():
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        vfs.RequestDecoder().feed(struct.pack(">IIBIII", 0xFFFFFFFF, 1, vfs.Op.WRITE, 0, 0, 0))


def test_partial_frame_at_close_is_an_error():
    decoder = vfs.RequestDecoder()
    decoder.feed(vfs.encode_request(1, 0, 0, 0, vfs.Statfs(node=2))[:-1])
    with pytest.raises(RemoteProtocolError, match="mid-frame"):
        decoder.close()


@pytest.mark.parametrize(
    "args",
    [
        vfs.Lookup(parent=2, name=b"a/b"),
        vfs.Symlink(parent=2, name=b"l", target=b""),
        vfs.Write(node=2, fh=1, offset=0, flags=0, data=b"x" * (vfs.MAX_IO + 1)),
        vfs.Forget(items=()),
    ],
)
def test_encoding_a_bad_request_is_a_local_error(args):
    with pytest.raises(LocalProtocolError):
        vfs.encode_request(1, 0, 0, 0, args)


DIRENTS = (
    vfs.DirEntry(offset=1, ino=2, type=4, name=b"."),
    vfs.DirEntry(offset=2, ino=1, type=4, name=b".."),
    vfs.DirEntry(offset=3, ino=7, type=8, name=b"file.txt", entry=ENTRY),
)
REPLIES = [
    (vfs.Op.LOOKUP, ENTRY),
    (vfs.Op.MKDIR, ENTRY),
    (vfs.Op.GETATTR, vfs.AttrReply(attr_valid_ns=1, attr=ATTR)),
    (vfs.Op.SETATTR, vfs.AttrReply(attr_valid_ns=0, attr=ATTR)),
    (vfs.Op.READLINK, b"../target"),
    (vfs.Op.READ, b"\x00data\xff"),
    (vfs.Op.READ, b""),
    (vfs.Op.UNLINK, None),
    (vfs.Op.RELEASE, None),
    (vfs.Op.OPEN, vfs.Opened(fh=9, flags=vfs.OPEN_KEEP_CACHE)),
    (vfs.Op.OPENDIR, vfs.Opened(fh=4)),
    (vfs.Op.CREATE, vfs.Created(entry=ENTRY, fh=11, flags=0)),
    (vfs.Op.WRITE, vfs.Written(size=4096)),
    (
        vfs.Op.STATFS,
        vfs.StatfsReply(blocks=100, bfree=50, bavail=40, files=10, ffree=5, bsize=4096, namelen=255, frsize=4096),
    ),  # fmt: skip
    (vfs.Op.READDIR, DIRENTS),
    (vfs.Op.READDIR, ()),
    (vfs.Op.OPENDIR_READ, vfs.DirOpened(fh=4, flags=vfs.OPEN_CACHE_DIR | vfs.OPEN_GUEST_DIR, entries=DIRENTS)),
    (
        vfs.Op.HELLO,
        vfs.HelloReply(
            version=1, max_io=1 << 20, mounts=(vfs.Mount("/workspace", 2, False), vfs.Mount("/ro", 3, True, 10**9))
        ),
    ),
    (vfs.Op.HELLO, vfs.HelloReply(version=1, max_io=1 << 20, mounts=(), stats=True)),
]


@pytest.mark.parametrize("op, result", REPLIES, ids=lambda v: vfs.OP_NAMES.get(v, "") if isinstance(v, int) else "")
def test_reply_round_trip(op, result):
    (reply,) = vfs.ReplyDecoder().feed(vfs.encode_reply(99, result))
    assert (reply.id, reply.status) == (99, 0)
    assert vfs.decode_result(op, reply.payload) == result


def test_replies_split_at_every_byte_and_errors_carry_negative_errno():
    stream = vfs.encode_reply(3, ENTRY) + vfs.encode_error(1, errno.ENOENT) + vfs.encode_reply(2, None)
    decoder = vfs.ReplyDecoder()
    out = []
    boundaries = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
        if not decoder.pending:
            boundaries.append(i + 1)
    assert [(r.id, r.status) for r in out] == [(3, 0), (1, -errno.ENOENT), (2, 0)]
    # `pending` is 0 exactly at frame ends: the guest stops reading there.
    first = len(vfs.encode_reply(3, ENTRY))
    assert boundaries == [first, first + vfs.REPLY_HEADER.size, len(stream)]


def test_whole_replies_and_a_partial_one_in_one_read_keep_only_the_partial():
    third = vfs.encode_reply(3, b"x" * 100)
    decoder = vfs.ReplyDecoder()
    got = decoder.feed(vfs.encode_reply(1, None) + vfs.encode_reply(2, ENTRY) + third[:50])
    assert [r.id for r in got] == [1, 2] and decoder.pending == 50
    (last,) = decoder.feed(third[50:])
    assert (last.id, last.payload, decoder.pending) == (3, b"x" * 100, 0)


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">IIi", vfs.MAX_PAYLOAD + 1, 1, 0),
        struct.pack(">IIi", 4, 1, -2) + b"abcd",
        struct.pack(">IIi", 0, 1, 5),
    ],
)
def test_bad_reply_frames_are_refused(frame):
    with pytest.raises(RemoteProtocolError):
        vfs.ReplyDecoder().feed(frame)


@pytest.mark.parametrize(
    "op, payload",
    [
        (vfs.Op.LOOKUP, b"\x00" * 10),
        (vfs.Op.LOOKUP, vfs.encode_reply(1, ENTRY)[12:] + b"x"),
        (vfs.Op.UNLINK, b"x"),
        (vfs.Op.READDIR, struct.pack(">I", 1) + struct.pack(">QQBHB", 1, 1, 8, 3, 0) + b"a/b"),
        (vfs.Op.READDIR, struct.pack(">I", 2)),
        (vfs.Op.OPENDIR_READ, struct.pack(">QI", 4, 0)),  # no entry count
        (vfs.Op.HELLO, b'{"version": 1, "max_io": 4096, "mounts": [{"path": "rel", "root": 2, "readonly": false}]}'),
        (vfs.Op.HELLO, b'{"version": 1, "max_io": 4096, "mounts": [{"path": "/w/../run", "root": 2}]}'),
        (vfs.Op.HELLO, b'{"version": 1, "max_io": 4096, "mounts": [{"path": "/a", "root": 1, "readonly": false}]}'),
        (vfs.Op.READLINK, b""),
        (vfs.Op.FORGET, b""),
    ],
)
def test_malformed_reply_payloads_are_refused(op, payload):
    with pytest.raises(RemoteProtocolError, match="malformed"):
        vfs.decode_result(op, payload)


def test_host_cannot_encode_reserved_node_ids_or_bad_errno():
    with pytest.raises(LocalProtocolError):
        vfs.encode_reply(1, vfs.Entry(node=1, generation=0, entry_valid_ns=0, attr_valid_ns=0, attr=ATTR))
    with pytest.raises(LocalProtocolError):
        vfs.encode_error(1, 0)
    with pytest.raises(LocalProtocolError):
        vfs.encode_reply(1, (vfs.DirEntry(offset=1, ino=1, type=8, name=b"a/b"),))


def test_dirent_size_matches_fuse_alignment():
    # fuse_dirent is 24 bytes + name, padded to 8; direntplus adds a 128-byte fuse_entry_out.
    assert vfs.dirent_size(1, False) == 32
    assert vfs.dirent_size(8, False) == 32
    assert vfs.dirent_size(9, False) == 40
    assert vfs.dirent_size(1, True) == 160
