"""The FUSE daemon's own answers: entries and attributes from its cache, KILLPRIV_V2 translation."""

from __future__ import annotations

import errno
import stat

from matchlock.guest import fuse
from matchlock.wire import vfs

ROOT = 100
DIR = vfs.Attr(ino=7, size=4096, blocks=8, atime_ns=1, mtime_ns=2, ctime_ns=3, mode=stat.S_IFDIR | 0o755, nlink=3,
               uid=0, gid=0)  # fmt: skip
FILE = vfs.Attr(ino=8, size=5, blocks=1, atime_ns=1, mtime_ns=2, ctime_ns=3, mode=stat.S_IFREG | 0o644, nlink=1,
                uid=0, gid=0)  # fmt: skip
SECOND = 1_000_000_000


def request(op: int, body: bytes = b"", nodeid: int = fuse.ROOT_ID, unique: int = 9) -> bytes:
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), op, unique, nodeid, 0, 0, 77, 0, 0) + body


class Clock:
    def __init__(self) -> None:
        self.now = 10 * SECOND

    def __call__(self) -> int:
        return self.now


def translator(clock: Clock, features: int = vfs.FEATURES_ALL & ~vfs.FEATURE_LOOKUP_DIR) -> fuse.MountTranslator:
    # LOOKUP_DIR (a directory's listing for a LOOKUP): tests/unit/test_fuse_prefetch.py
    return fuse.MountTranslator(ROOT, negative_valid_ns=SECOND, clock=clock, features=features)


def reply_to(tr: fuse.MountTranslator, action: fuse.Action, result: vfs.Result, parent: vfs.AttrReply | None = None):
    """Complete `action` with the host's `result`; returns the FUSE reply body."""
    assert action.pending is not None and action.reply is None
    (reply,) = vfs.ReplyDecoder().feed(vfs.encode_reply(5, result, parent))
    buffers, _ = tr.complete(action.pending, reply.status, reply.payload)
    data = b"".join(buffers)
    assert fuse.OUT_HEADER.unpack_from(data)[1] == 0
    return data[fuse.OUT_HEADER.size :]


def answered_here(action: fuse.Action) -> bytes:
    assert action.pending is None and action.reply is not None, "forwarded to the host"
    return action.reply[fuse.OUT_HEADER.size :]


def getattr_request(nodeid: int = fuse.ROOT_ID) -> bytes:
    return request(fuse.GETATTR, fuse.GETATTR_IN.pack(0, 0, 0), nodeid=nodeid)


def cache_file_attr(tr: fuse.MountTranslator, node: int) -> None:
    """A GETATTR of `node` goes to the host, and the next one is answered here."""
    reply_to(tr, tr.handle(getattr_request(node)), vfs.AttrReply(SECOND, FILE))
    answered_here(tr.handle(getattr_request(node)))


def mkdir(tr: fuse.MountTranslator, parent_valid: int = SECOND) -> None:
    """`mkdir /d` (node 50): the reply carries the root's new attributes."""
    action = tr.handle(request(fuse.MKDIR, fuse.MKDIR_IN.pack(0o755, 0) + b"d\0"))
    reply_to(tr, action, vfs.Entry(50, 0, SECOND, SECOND, DIR), vfs.AttrReply(parent_valid, DIR))


def test_after_mkdir_the_parents_getattr_and_the_names_revalidation_are_answered_here():
    clock = Clock()
    tr = translator(clock)
    mkdir(tr)
    clock.now += SECOND // 2
    body = answered_here(tr.handle(getattr_request()))
    valid, nsec, _ = fuse.ATTR_OUT.unpack_from(body)
    assert (valid, nsec) == (0, SECOND // 2)  # only what is left of the host's validity
    assert fuse.ATTR.unpack_from(body, fuse.ATTR_OUT.size)[9] == stat.S_IFDIR | 0o755
    # `mkdir -p /d` again: the kernel revalidates /d with a LOOKUP (LOOKUP_EXCL) and gets it from here.
    body = answered_here(tr.handle(request(fuse.LOOKUP, b"d\0")))
    assert fuse.ENTRY_OUT.unpack_from(body)[0] == 50
    # That lookup is the kernel's, not the host's: a FORGET of 2 lookups gives the host back its 1.
    action = tr.handle(request(fuse.FORGET, fuse.FORGET_IN.pack(2), nodeid=50))
    assert action.notices == (vfs.Forget(((50, 1),)),)
    # And the node is no longer handed out from here once the kernel let it go.
    assert tr.handle(request(fuse.LOOKUP, b"d\0")).pending is not None


def test_cached_answers_expire_with_the_hosts_validity():
    clock = Clock()
    tr = translator(clock)
    mkdir(tr)
    clock.now += SECOND
    assert tr.handle(getattr_request()).pending is not None
    assert tr.handle(request(fuse.LOOKUP, b"d\0")).pending is not None


def test_a_change_in_flight_keeps_an_older_reply_out_of_the_cache():
    clock = Clock()
    tr = translator(clock)
    lookup = tr.handle(request(fuse.LOOKUP, b"f\0"))
    write = tr.handle(request(fuse.WRITE, fuse.WRITE_IN.pack(1, 0, 1, 0, 0, 0o1, 0) + b"x", nodeid=60))
    reply_to(tr, lookup, vfs.Entry(60, 0, SECOND, SECOND, FILE))  # taken before the write landed, maybe
    assert tr.handle(getattr_request(60)).pending is not None
    reply_to(tr, write, vfs.Written(1))
    assert tr.handle(getattr_request(60)).pending is not None
    # A GETATTR asked after the write is fresh again.
    cache_file_attr(tr, 60)


def test_two_changes_in_one_directory_at_once_leave_its_attributes_to_the_host():
    clock = Clock()
    tr = translator(clock)
    first = tr.handle(request(fuse.CREATE, fuse.CREATE_IN.pack(0o101, 0o644, 0, 0) + b"a\0"))
    second = tr.handle(request(fuse.CREATE, fuse.CREATE_IN.pack(0o101, 0o644, 0, 0) + b"b\0"))
    reply_to(tr, second, vfs.Created(vfs.Entry(61, 0, SECOND, SECOND, FILE), 1), vfs.AttrReply(SECOND, DIR))
    reply_to(tr, first, vfs.Created(vfs.Entry(62, 0, SECOND, SECOND, FILE), 2), vfs.AttrReply(SECOND, DIR))
    assert tr.handle(getattr_request()).pending is not None


def test_hard_linked_files_and_removed_names_are_never_answered_here():
    clock = Clock()
    tr = translator(clock)
    linked = vfs.Attr(**{**{k: getattr(FILE, k) for k in FILE.__slots__}, "nlink": 2})
    lookup = tr.handle(request(fuse.LOOKUP, b"h\0"))
    reply_to(tr, lookup, vfs.Entry(63, 0, SECOND, 0, linked))  # the host gives linked files no attr validity
    assert tr.handle(request(fuse.LOOKUP, b"h\0")).pending is not None
    mkdir(tr)
    answered_here(tr.handle(request(fuse.LOOKUP, b"d\0")))
    rmdir = tr.handle(request(fuse.RMDIR, b"d\0"))
    reply_to(tr, rmdir, None)
    assert tr.handle(request(fuse.LOOKUP, b"d\0")).pending is not None
    assert tr.handle(getattr_request()).pending is not None


def test_unlinking_a_name_the_cache_does_not_know_forgets_every_attribute():
    clock = Clock()
    tr = translator(clock)
    cache_file_attr(tr, 64)  # node 64, name unknown (say, an open file)
    tr.handle(request(fuse.UNLINK, b"x\0"))  # maybe node 64: its nlink changes
    assert tr.handle(getattr_request(64)).pending is not None


def test_a_host_change_notice_drops_the_cached_name():
    clock = Clock()
    tr = translator(clock)
    mkdir(tr)
    tr.drop_absent(ROOT, b"d")  # what the daemon calls for an INVAL_ENTRY notice
    assert tr.handle(request(fuse.LOOKUP, b"d\0")).pending is not None


def test_an_expired_enoent_the_reply_thread_drops_meanwhile_is_no_error():
    clock = Clock()
    tr = translator(clock)
    lookup = tr.handle(request(fuse.LOOKUP, b"gone\0"))
    assert lookup.pending is not None
    tr.complete(lookup.pending, -errno.ENOENT, b"")  # remembered for a second
    clock.now += SECOND

    class Racing(dict):
        def get(self, key, default=None):  # a notice for the name lands between the read and the drop
            found = super().get(key, default)
            tr.drop_absent(ROOT, b"gone")
            return found

    tr._absent = Racing(tr._absent)
    assert tr.handle(request(fuse.LOOKUP, b"gone\0")).pending is not None


def test_an_enoent_asked_before_a_notice_for_its_directory_is_not_cached():
    tr = translator(Clock())
    lookup = tr.handle(request(fuse.LOOKUP, b"new\0"))
    assert lookup.pending is not None
    tr.drop_absent(ROOT, b"new")  # the reply thread applies the notice ahead of the reply behind it
    buffers, _ = tr.complete(lookup.pending, -errno.ENOENT, b"")
    assert b"".join(buffers) == fuse.error(9, errno.ENOENT)  # no negative entry for the kernel to keep
    assert tr.handle(request(fuse.LOOKUP, b"new\0")).pending is not None
    # Unchanged, the same ENOENT is remembered.
    again = tr.handle(request(fuse.LOOKUP, b"new\0"))
    assert again.pending is not None
    tr.complete(again.pending, -errno.ENOENT, b"")
    assert tr.handle(request(fuse.LOOKUP, b"new\0")).pending is None


def test_killpriv_v2_only_when_the_host_drops_set_id_bits_itself():
    offered = fuse.ASYNC_READ | fuse.HANDLE_KILLPRIV_V2
    init = fuse.INIT_IN.pack(7, 38, 0, offered) + bytes(48)
    for features, expected in ((vfs.FEATURES_ALL, offered), (vfs.FEATURE_PARENT_ATTR, fuse.ASYNC_READ)):
        reply = fuse.MountTranslator(ROOT, features=features).handle(request(fuse.INIT, init)).reply
        assert reply is not None
        assert fuse.INIT_OUT.unpack_from(reply, 16)[3] == expected


def test_the_kernels_kill_suidgid_flags_reach_the_host():
    tr = translator(Clock())
    write = tr.handle(request(fuse.WRITE, fuse.WRITE_IN.pack(1, 0, 1, fuse.WRITE_KILL_SUIDGID, 0, 0o1, 0) + b"x", 60))
    assert write.wire is not None and isinstance(write.wire[1], tuple)
    written = vfs.decode_args(vfs.Op.WRITE, b"".join(write.wire[1]))
    assert isinstance(written, vfs.Write) and written.flags == 0o1 | vfs.KILL_SUIDGID
    opened = tr.handle(request(fuse.OPEN, fuse.OPEN_IN.pack(0o1001, fuse.OPEN_KILL_SUIDGID), 60))
    assert isinstance(opened.args, vfs.Open) and opened.args.flags == 0o1001 | vfs.KILL_SUIDGID
    created = tr.handle(request(fuse.CREATE, fuse.CREATE_IN.pack(0o1101, 0o644, 0, fuse.OPEN_KILL_SUIDGID) + b"n\0"))
    assert created.wire is not None and isinstance(created.wire[1], bytes)
    made = vfs.decode_args(vfs.Op.CREATE, created.wire[1])
    assert isinstance(made, vfs.Create) and made.flags == 0o1101 | vfs.KILL_SUIDGID
    setattr_ = tr.handle(
        request(fuse.SETATTR, fuse.SETATTR_IN.pack(vfs.SET_SIZE | vfs.SET_KILL_SUIDGID, *[0] * 15), 60)
    )
    assert setattr_.wire is not None and isinstance(setattr_.wire[1], bytes)
    changed = vfs.decode_args(vfs.Op.SETATTR, setattr_.wire[1])
    assert isinstance(changed, vfs.Setattr) and changed.valid == vfs.SET_SIZE | vfs.SET_KILL_SUIDGID


def test_a_time_before_1970_reaches_the_host_and_one_past_its_range_is_einval():
    tr = translator(Clock())
    before = tr.handle(request(fuse.SETATTR, fuse._SETATTR_IN_SIGNED.pack(vfs.SET_MTIME, *[0] * 5, -10, 0, 0, 5,
                                                                           *[0] * 6), 60))  # fmt: skip
    assert before.wire is not None and isinstance(before.wire[1], bytes)
    changed = vfs.decode_args(vfs.Op.SETATTR, before.wire[1])
    assert isinstance(changed, vfs.Setattr) and changed.mtime_ns == -10 * 1_000_000_000 + 5
    too_far = tr.handle(request(fuse.SETATTR, fuse._SETATTR_IN_SIGNED.pack(vfs.SET_MTIME, *[0] * 5, 1 << 62, 0, 0, 0,
                                                                            *[0] * 6), 60))  # fmt: skip
    assert too_far.reply is not None and fuse.OUT_HEADER.unpack_from(too_far.reply)[1] == -errno.EINVAL


def test_an_error_reply_still_ends_the_change():
    clock = Clock()
    tr = translator(clock)
    setattr_ = tr.handle(request(fuse.SETATTR, fuse.SETATTR_IN.pack(vfs.SET_MODE, *[0] * 15), 60))
    assert setattr_.pending is not None
    tr.complete(setattr_.pending, -errno.EPERM, b"")
    cache_file_attr(tr, 60)


def test_a_directory_made_here_answers_enoent_for_names_never_made_in_it():
    clock = Clock()
    tr = translator(clock)
    mkdir(tr)  # node 50, empty
    body = answered_here(tr.handle(request(fuse.LOOKUP, b"new\0", nodeid=50)))
    assert fuse.ENTRY_OUT.unpack_from(body)[0] == 0  # a negative entry
    # A name that a request may have made goes to the host, whatever that request's outcome.
    made = tr.handle(request(fuse.CREATE, fuse.CREATE_IN.pack(0o101, 0o644, 0, 0) + b"new\0", nodeid=50))
    assert made.pending is not None
    tr.complete(made.pending, -errno.EPERM, b"")
    assert tr.handle(request(fuse.LOOKUP, b"new\0", nodeid=50)).pending is not None
    renamed = tr.handle(request(fuse.RENAME, fuse.RENAME_IN.pack(50) + b"x\0moved\0"))
    assert isinstance(renamed.args, vfs.Rename)
    assert tr.handle(request(fuse.LOOKUP, b"moved\0", nodeid=50)).pending is not None
    # Only for as long as an ENOENT may be cached on this mount, and never on one that caches none.
    clock.now += SECOND
    assert tr.handle(request(fuse.LOOKUP, b"other\0", nodeid=50)).pending is not None
    plain = fuse.MountTranslator(ROOT, clock=clock, features=vfs.FEATURES_ALL)
    mkdir(plain)
    assert plain.handle(request(fuse.LOOKUP, b"new\0", nodeid=50)).pending is not None


def test_release_notices_packed_directly_decode_as_the_codecs():
    import socket

    from matchlock.guest import fuse_daemon

    ours, host = socket.socketpair()
    try:
        channel = fuse_daemon.Channel(ours.fileno())
        channel.notify(vfs.Release(5, 7))
        channel.notify(vfs.Releasedir(6, 8))
        requests = vfs.RequestDecoder().feed(host.recv(4096))
        assert [(r.id, r.args) for r in requests] == [(0, vfs.Release(5, 7)), (0, vfs.Releasedir(6, 8))]
    finally:
        ours.close()
        host.close()
