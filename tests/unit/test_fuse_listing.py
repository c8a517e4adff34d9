"""READDIR[PLUS] answered in the guest from a directory's LOOKUP_DIR listing (fuse_cache.listed_dir)."""

from __future__ import annotations

import collections
import stat

import pytest

from matchlock.guest import fuse
from matchlock.guest.fuse_dirs import LOCAL_FH
from matchlock.wire import vfs
from matchlock.wire.frames import RemoteProtocolError

ROOT = 100
SECOND = 1_000_000_000
LONG = 600 * SECOND
FILE = vfs.Attr(ino=8, size=5, blocks=1, atime_ns=1, mtime_ns=2, ctime_ns=3, mode=stat.S_IFREG | 0o644, nlink=1,
                uid=0, gid=0)  # fmt: skip
NAMES = (b"a", b"bb", b"c")


class Clock:
    def __init__(self) -> None:
        self.now = 10 * SECOND

    def __call__(self) -> int:
        return self.now


def request(op: int, body: bytes = b"", nodeid: int = fuse.ROOT_ID, unique: int = 9) -> bytes:
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), op, unique, nodeid, 0, 0, 77, 0, 0) + body


def entries(first: int = 200) -> tuple[vfs.DirEntry, ...]:
    """The host's listing of NAMES, as nodes first, first + 1, ... (cookies from 3, as READDIR counts)."""
    return tuple(
        vfs.DirEntry(i + 3, 8 + i, stat.S_IFREG >> 12, name, vfs.Entry(first + i, 0, LONG, LONG, FILE))
        for i, name in enumerate(NAMES)
    )


def host_readdir(offset: int, size: int, plus: int) -> bytes:
    """The reply body the host's READDIR[PLUS] of the same listing would make (vfs.router.readdir)."""
    dots = (vfs.DirEntry(1, 1, stat.S_IFDIR >> 12, b"."), vfs.DirEntry(2, 1, stat.S_IFDIR >> 12, b".."))
    page, used = [], 0
    for item in (*dots, *entries())[offset:]:
        length = vfs.dirent_size(len(item.name), bool(plus))
        if used + length > size:
            break
        used += length
        page.append(item)
    body, _ = fuse.dirents(9, size, plus, tuple(page))
    return body[fuse.OUT_HEADER.size :]


def listed(clock: Clock | None = None) -> fuse.MountTranslator:
    """A translator whose LOOKUP of "a" in the root brought the root's listing (the kernel took "a")."""
    tr = fuse.MountTranslator(ROOT, negative_valid_ns=SECOND, clock=clock or Clock(), features=vfs.FEATURES_ALL)
    action = tr.handle(request(fuse.LOOKUP, b"a\0"))
    assert action.wire is not None and action.wire[0] == vfs.Op.LOOKUP_DIR and action.pending is not None
    (got,) = vfs.ReplyDecoder().feed(vfs.encode_reply(5, vfs.Listed(None, entries())))
    buffers, _ = tr.complete(action.pending, got.status, got.payload)
    assert fuse.ENTRY_OUT.unpack_from(b"".join(buffers), fuse.OUT_HEADER.size)[0] == 200
    return tr


def opendir(tr: fuse.MountTranslator) -> int:
    action = tr.handle(request(fuse.OPENDIR, fuse.OPEN_IN.pack(0o200000, 0)))
    assert action.reply is not None and action.pending is None, "OPENDIR went to the host"
    fh = fuse.OPEN_OUT.unpack_from(action.reply, fuse.OUT_HEADER.size)[0]
    assert fh & LOCAL_FH
    return fh


def readdir(tr: fuse.MountTranslator, fh: int, offset: int = 0, size: int = 4096, plus: int = 1) -> fuse.Action:
    op = fuse.READDIRPLUS if plus else fuse.READDIR
    return tr.handle(request(op, fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)))


def here(action: fuse.Action) -> bytes:
    """The body of a READDIR answered in the guest (nothing sent to the host)."""
    assert action.pending is None and action.args is None and action.wire is None, "sent to the host"
    assert action.reply is not None and not action.notices
    length, status, unique = fuse.OUT_HEADER.unpack_from(action.reply)
    assert (length, status, unique) == (len(action.reply), 0, 9)
    return action.reply[fuse.OUT_HEADER.size :]


def to_host(action: fuse.Action) -> None:
    assert action.reply is None and isinstance(action.args, vfs.OpendirRead), "answered in the guest"


@pytest.mark.parametrize("plus", [0, 1])
@pytest.mark.parametrize(("offset", "size"), [(0, 4096), (3, 4096), (5, 4096), (9, 4096), (0, 200), (1, 500)])
def test_a_listed_directory_is_read_here_exactly_as_the_host_would_answer(plus, offset, size):
    tr = listed()
    fh = opendir(tr)
    assert here(readdir(tr, fh, offset, size, plus)) == host_readdir(offset, size, plus)


def kernel_forgets_all(tr: fuse.MountTranslator, kernel: collections.Counter[int]) -> collections.Counter[int]:
    """The kernel forgets every lookup it holds, and the cache empties: what the host is given back in all."""
    given: collections.Counter[int] = collections.Counter()
    for node, count in kernel.items():
        for notice in tr.handle(request(fuse.FORGET, fuse.FORGET_IN.pack(count), nodeid=node)).notices:
            assert isinstance(notice, vfs.Forget)
            given.update(dict(notice.items))
    tr.cache.drop_all()  # what it still holds for the listing goes back too
    while (held := tr.cache.take_forget()) is not None:
        given.update(dict(held.items))
    return given


def plus_nodes(body: bytes) -> list[int]:
    """The node of each READDIRPLUS entry (0: none), in order."""
    nodes, pos = [], 0
    while pos < len(body):
        nodes.append(fuse.ENTRY_OUT.unpack_from(body, pos)[0])
        _, _, namelen, _ = fuse.DIRENT.unpack_from(body, pos + fuse.ENTRY_SIZE)
        pos += vfs.dirent_size(namelen, True)
    return nodes


def test_readdirplus_entries_from_the_listing_count_lookups_as_the_host_does():
    tr = listed()
    host = collections.Counter({200: 1, 201: 1, 202: 1})  # the listing's entries, one lookup each
    kernel = collections.Counter({200: 1})  # "a" went to the kernel with the LOOKUP's reply
    fh = opendir(tr)
    for offset, size in ((0, 4096), (0, 4096), (0, 500)):  # read twice, then a page with only '.', '..', "a"
        nodes = plus_nodes(here(readdir(tr, fh, offset, size)))
        kernel.update(n for n in nodes if n)
    assert kernel == {200: 4, 201: 2, 202: 2}
    assert kernel_forgets_all(tr, kernel) == host  # the host's node table ends empty, and never below the kernel's


def test_a_plain_readdir_from_the_listing_hands_out_no_lookups():
    tr = listed()
    here(readdir(tr, opendir(tr), plus=0))
    assert kernel_forgets_all(tr, collections.Counter({200: 1})) == {200: 1, 201: 1, 202: 1}


def test_an_entry_not_fresh_here_is_listed_without_a_node():
    tr = listed()
    fh = opendir(tr)
    tr.handle(request(fuse.OPEN, fuse.OPEN_IN.pack(0o1001, 0), nodeid=201))  # O_TRUNC of "bb": its attributes go
    assert plus_nodes(here(readdir(tr, fh))) == [0, 0, 200, 0, 202]


def create(tr: fuse.MountTranslator, name: bytes) -> fuse.Action:
    return tr.handle(request(fuse.CREATE, fuse.CREATE_IN.pack(0o101, 0o644, 0, 0) + name + b"\0"))


CHANGES = {
    "a name made here (its reply not in yet)": lambda tr, clock: create(tr, b"new"),
    "the host's notice of the directory": lambda tr, clock: tr.drop_node(ROOT),
    "the host's notice of a name in it": lambda tr, clock: tr.drop_absent(ROOT, b"zz"),
    "past the mount's negative lifetime": lambda tr, clock: setattr(clock, "now", clock.now + 2 * SECOND),
    "the cache emptied": lambda tr, clock: tr.cache.drop_all(),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_after_a_change_or_a_notice_the_host_reads_the_directory_again(change):
    clock = Clock()
    tr = listed(clock)
    fh = opendir(tr)
    here(readdir(tr, fh))
    change(tr, clock)
    to_host(readdir(tr, fh))


@pytest.mark.parametrize(
    "bad",
    [
        (vfs.DirEntry(4, 8, stat.S_IFREG >> 12, b"a"),),  # READDIRs from it would resume at the wrong entry
        (vfs.DirEntry(3, 8, stat.S_IFREG >> 12, b"a"), vfs.DirEntry(4, 9, stat.S_IFREG >> 12, b"a")),
    ],
)
def test_a_listing_with_other_cookies_or_a_repeated_name_is_refused(bad):
    tr = fuse.MountTranslator(ROOT, negative_valid_ns=SECOND, clock=Clock(), features=vfs.FEATURES_ALL)
    action = tr.handle(request(fuse.LOOKUP, b"a\0"))
    assert action.pending is not None
    (got,) = vfs.ReplyDecoder().feed(vfs.encode_reply(5, vfs.Listed(None, bad)))
    with pytest.raises(RemoteProtocolError, match="cookie"):
        tr.complete(action.pending, got.status, got.payload)
