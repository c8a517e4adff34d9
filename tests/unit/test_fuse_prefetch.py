"""LOOKUPs answered from one listing per directory (FEATURE_LOOKUP_DIR): the guest's translator and cache."""

from __future__ import annotations

import errno
import stat

import pytest

from matchlock.guest import fuse
from matchlock.guest.fuse_cache import MAX_HELD
from matchlock.wire import vfs
from matchlock.wire.frames import RemoteProtocolError

ROOT = 100
SECOND = 1_000_000_000
LONG = 600 * SECOND
FILE = vfs.Attr(ino=8, size=5, blocks=1, atime_ns=1, mtime_ns=2, ctime_ns=3, mode=stat.S_IFREG | 0o644, nlink=1,
                uid=0, gid=0)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 10 * SECOND

    def __call__(self) -> int:
        return self.now


def translator(clock: Clock, features: int = vfs.FEATURES_ALL) -> fuse.MountTranslator:
    return fuse.MountTranslator(ROOT, negative_valid_ns=SECOND, clock=clock, features=features)


def lookup(name: bytes, nodeid: int = fuse.ROOT_ID, unique: int = 9) -> bytes:
    body = name + b"\0"
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), fuse.LOOKUP, unique, nodeid, 0, 0, 77, 0, 0) + body


def forget(node: int, count: int) -> bytes:
    body = fuse.FORGET_IN.pack(count)
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), fuse.FORGET, 0, node, 0, 0, 0, 0, 0) + body


def listing(*names: bytes, first: int = 200, valid: int = LONG) -> vfs.Listed:
    """The host's listing: `names` as nodes first, first + 1, ..."""
    entries = tuple(
        vfs.DirEntry(i + 3, 8, stat.S_IFREG >> 12, name, vfs.Entry(first + i, 0, valid, valid, FILE))
        for i, name in enumerate(names)
    )
    return vfs.Listed(None, entries)


def reply(tr: fuse.MountTranslator, action: fuse.Action, result: vfs.Result | int):
    """Complete `action` with the host's `result` (an int: that errno): (errno or 0, body, forget)."""
    assert action.pending is not None and action.reply is None
    frame = vfs.encode_error(5, result) if isinstance(result, int) else vfs.encode_reply(5, result)
    (got,) = vfs.ReplyDecoder().feed(frame)
    buffers, given = tr.complete(action.pending, got.status, got.payload)
    data = b"".join(buffers)
    return -fuse.OUT_HEADER.unpack_from(data)[1], data[fuse.OUT_HEADER.size :], given


def answered(action: fuse.Action) -> tuple[int, int]:
    """(node, entry validity in s) of a LOOKUP answered here (node 0: ENOENT)."""
    assert action.pending is None and action.reply is not None, "forwarded to the host"
    node, _, entry_s, _, _, _ = fuse.ENTRY_OUT.unpack_from(action.reply, fuse.OUT_HEADER.size)
    return node, entry_s


def test_a_miss_asks_for_the_listing_and_every_other_name_is_then_answered_here():
    clock = Clock()
    tr = translator(clock)
    first = tr.handle(lookup(b"a"))
    assert first.wire is not None and first.wire[0] == vfs.Op.LOOKUP_DIR
    # Another miss there while the listing is on its way: a plain LOOKUP.
    other = tr.handle(lookup(b"b", unique=10))
    assert other.wire is not None and other.wire[0] == vfs.Op.LOOKUP
    status, body, given = reply(tr, first, listing(b"a", b"b", b"c"))
    assert status == 0 and fuse.ENTRY_OUT.unpack_from(body)[0] == 200 and given is None
    assert answered(tr.handle(lookup(b"c"))) == (202, 600)
    assert answered(tr.handle(lookup(b"nope"))) == (0, 1)  # ENOENT for the mount's negative lifetime
    clock.now += 2 * SECOND  # past it: the directory is listed again at the next miss
    late = tr.handle(lookup(b"nope"))
    assert late.wire is not None and late.wire[0] == vfs.Op.LOOKUP_DIR


def test_lookup_counts_stay_exact_for_the_host():
    tr = translator(Clock())
    reply(tr, tr.handle(lookup(b"a")), listing(b"a", b"b", b"c"))
    # "a" went to the kernel with the reply: a FORGET of it is the host's, one for one.
    assert tr.handle(forget(200, 1)).notices == (vfs.Forget(((200, 1),)),)
    # "b": the kernel takes over the lookup the listing held, then one more answered here.
    answered(tr.handle(lookup(b"b")))
    answered(tr.handle(lookup(b"b")))
    assert tr.handle(forget(201, 2)).notices == (vfs.Forget(((201, 1),)),)
    # "c" the kernel never took: a host notice about it drops it, and it goes back with the next LOOKUP.
    tr.drop_absent(ROOT, b"c")
    later = tr.handle(lookup(b"x", nodeid=55))
    assert later.notices == (vfs.Forget(((202, 1),)),)
    assert tr.handle(lookup(b"y", nodeid=55)).notices == ()  # given back once


def test_a_forget_of_a_node_also_gives_back_what_a_later_listing_held():
    tr = translator(Clock())
    reply(tr, tr.handle(lookup(b"a")), listing(b"a"))
    tr.drop_node(ROOT)  # the directory changed: listed again at the next miss
    reply(tr, tr.handle(lookup(b"z")), listing(b"a", b"z", first=200))  # "a" again: the host counts it twice
    assert tr.handle(forget(200, 1)).notices == (vfs.Forget(((200, 2),)),)


def test_entries_listed_in_a_directory_go_back_when_it_leaves_the_cache():
    tr = translator(Clock())
    reply(tr, tr.handle(lookup(b"sub")), listing(b"sub"))
    reply(tr, tr.handle(lookup(b"a", nodeid=200)), listing(b"a", b"b", b"c", first=300))
    answered(tr.handle(lookup(b"b", nodeid=200)))  # the kernel took "b": its lookup is its own now
    assert tr.handle(forget(200, 1)).notices == (vfs.Forget(((200, 1),)),)  # the kernel forgot "sub"
    assert tr.cache.take_forget() == vfs.Forget(((302, 1),))  # "c": nobody can reach it now ("a" was answered)
    assert tr.handle(lookup(b"c", nodeid=200)).pending is not None  # asked again: listed again


def test_an_emptied_cache_gives_every_held_lookup_back():
    tr = translator(Clock())
    reply(tr, tr.handle(lookup(b"a")), listing(b"a", b"b", b"c"))
    tr.cache.drop_all()
    assert tr.cache.take_forget() == vfs.Forget(((201, 1), (202, 1)))
    assert tr.cache.take_forget() is None


def test_past_the_cap_held_entries_go_back_all_at_once():
    tr = translator(Clock())
    tr.cache._held = dict.fromkeys(range(1000, 1000 + MAX_HELD), 1)
    tr.cache._held_in = {77: list(range(1000, 1000 + MAX_HELD))}  # a directory's listing held them
    reply(tr, tr.handle(lookup(b"a")), listing(b"a", b"b"))
    given = tr.cache.take_forget()
    assert given is not None and len(given.items) == vfs.MAX_FORGETS  # the rest with later LOOKUPs
    assert tr.cache._held == {201: 1}
    assert tr.cache._held_in == {ROOT: [201]}  # no record of the nodes given back is kept


def test_a_host_notice_during_the_listing_keeps_it_out_of_the_cache():
    tr = translator(Clock())
    action = tr.handle(lookup(b"a"))
    tr.drop_absent(ROOT, b"new")  # the host made "new" while it listed
    status, body, given = reply(tr, action, listing(b"a", b"b"))
    node, _, entry_s, attr_s, entry_ns, attr_ns = fuse.ENTRY_OUT.unpack_from(body)
    assert status == 0 and node == 200 and (entry_s, attr_s, entry_ns, attr_ns) == (0, 0, 0, 0)  # not cached
    assert given == vfs.Forget(((201, 1),))
    again = tr.handle(lookup(b"new"))
    assert again.pending is not None  # not answered ENOENT from a stale listing


def test_a_guest_change_in_the_directory_during_the_listing_keeps_it_out_of_the_cache():
    tr = translator(Clock())
    action = tr.handle(lookup(b"a"))
    body = fuse.CREATE_IN.pack(0o101, 0o644, 0, 0) + b"mine\0"
    header = fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), fuse.CREATE, 11, fuse.ROOT_ID, 0, 0, 77, 0, 0)
    create = tr.handle(header + body)
    status, body, given = reply(tr, action, listing(b"b"))
    assert (status, given) == (errno.ENOENT, vfs.Forget(((200, 1),)))  # an ENOENT the kernel does not cache
    tr.complete(create.pending, -errno.EEXIST, b"")
    assert tr.handle(lookup(b"b")).pending is not None


def test_no_listing_from_the_host_is_a_lookups_answer_and_plain_lookups_follow():
    clock = Clock()
    tr = translator(clock)
    status, body, given = reply(tr, tr.handle(lookup(b"a")), vfs.Listed(vfs.Entry(300, 0, SECOND, SECOND, FILE), ()))
    assert status == 0 and fuse.ENTRY_OUT.unpack_from(body)[0] == 300 and given is None
    assert tr.handle(lookup(b"b")).wire[0] == vfs.Op.LOOKUP  # type: ignore[index]
    status, _, _ = reply(tr, tr.handle(lookup(b"c")), errno.ENOENT)
    assert status == 0  # a negative entry, as for LOOKUP
    clock.now += 2 * SECOND
    assert tr.handle(lookup(b"d")).wire[0] == vfs.Op.LOOKUP_DIR  # type: ignore[index]


def test_without_the_feature_or_negative_caching_every_lookup_is_plain():
    for tr in (
        translator(Clock(), vfs.FEATURES_ALL & ~vfs.FEATURE_LOOKUP_DIR),
        fuse.MountTranslator(ROOT, clock=Clock(), features=vfs.FEATURES_ALL),
    ):
        assert tr.handle(lookup(b"a")).wire[0] == vfs.Op.LOOKUP  # type: ignore[index]


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x02", b"\x00" + bytes(10), b"\x01" + bytes(3), b"\x01\x00\x00\x00\x01" + bytes(5)],
    ids=["empty", "unknown kind", "short entry", "short count", "entry past the end"],
)
def test_a_malformed_listing_is_refused(payload):
    with pytest.raises(RemoteProtocolError, match="malformed LOOKUP_DIR reply"):
        vfs.decode_result(vfs.Op.LOOKUP_DIR, payload)
    tr = translator(Clock())  # the daemon's own decoding refuses the same
    action = tr.handle(lookup(b"a"))
    assert action.pending is not None
    with pytest.raises(RemoteProtocolError, match="malformed LOOKUP_DIR reply"):
        tr.complete(action.pending, 0, payload)


def test_a_listing_with_dot_entries_is_refused():
    dots = vfs.encode_reply(5, vfs.Listed(None, (vfs.DirEntry(1, 1, 4, b".."),)))
    (got,) = vfs.ReplyDecoder().feed(dots)
    with pytest.raises(RemoteProtocolError, match="no '.' or '..'"):
        vfs.decode_result(vfs.Op.LOOKUP_DIR, got.payload)
    tr = translator(Clock())
    action = tr.handle(lookup(b"a"))
    assert action.pending is not None
    with pytest.raises(RemoteProtocolError, match="malformed LOOKUP_DIR reply"):
        tr.complete(action.pending, 0, got.payload)


def test_a_listing_grants_opening_the_directory_here():
    tr = translator(Clock())
    assert tr.dirs.open(ROOT) is None
    reply(tr, tr.handle(lookup(b"a")), listing(b"a"))
    opened = tr.dirs.open(ROOT)
    assert opened is not None and opened[1] == vfs.OPEN_CACHE_DIR | vfs.OPEN_KEEP_CACHE
    tr.drop_node(ROOT)  # a host notice ends it, as for a host OPENDIR's leave
    assert tr.dirs.open(ROOT) is None
