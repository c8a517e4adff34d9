"""The guest's FUSE codec: struct layouts against linux/fuse.h, and request/reply translation."""

from __future__ import annotations

import errno
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from matchlock.guest import fuse
from matchlock.wire import vfs

# Each struct we pack, with its C fields in the order of the format's codes (None for padding we
# never read or write, "" for a trailing `x` run).
LAYOUTS = {
    "fuse_in_header": (fuse.IN_HEADER, "len opcode unique nodeid uid gid pid total_extlen padding"),
    "fuse_out_header": (fuse.OUT_HEADER, "len error unique"),
    "fuse_init_out": (
        fuse.INIT_OUT,
        "major minor max_readahead flags max_background congestion_threshold "
        "max_write time_gran max_pages map_alignment flags2",
    ),  # fmt: skip
    "fuse_attr": (
        fuse.ATTR,
        "ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags",
    ),  # fmt: skip
    "fuse_entry_out": (fuse.ENTRY_OUT, "nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec"),
    "fuse_attr_out": (fuse.ATTR_OUT, "attr_valid attr_valid_nsec dummy"),
    "fuse_open_out": (fuse.OPEN_OUT, "fh open_flags padding"),
    "fuse_write_out": (fuse.WRITE_OUT, "size padding"),
    "fuse_statfs_out": (
        fuse.STATFS_OUT,
        "st.blocks st.bfree st.bavail st.files st.ffree st.bsize st.namelen st.frsize st.padding",
    ),  # fmt: skip
    "fuse_dirent": (fuse.DIRENT, "ino off namelen type"),
    "fuse_forget_in": (fuse.FORGET_IN, "nlookup"),
    "fuse_batch_forget_in": (fuse.BATCH_FORGET_IN, "count dummy"),
    "fuse_forget_one": (fuse.FORGET_ONE, "nodeid nlookup"),
    "fuse_getattr_in": (fuse.GETATTR_IN, "getattr_flags dummy fh"),
    "fuse_setattr_in": (
        fuse.SETATTR_IN,
        "valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode unused4 uid gid unused5",
    ),  # fmt: skip
    "fuse_mknod_in": (fuse.MKNOD_IN, "mode rdev umask padding"),
    "fuse_mkdir_in": (fuse.MKDIR_IN, "mode umask"),
    "fuse_rename_in": (fuse.RENAME_IN, "newdir"),
    "fuse_rename2_in": (fuse.RENAME2_IN, "newdir flags padding"),
    "fuse_link_in": (fuse.LINK_IN, "oldnodeid"),
    "fuse_open_in": (fuse.OPEN_IN, "flags open_flags"),
    "fuse_create_in": (fuse.CREATE_IN, "flags mode umask open_flags"),
    "fuse_read_in": (fuse.READ_IN, "fh offset size read_flags lock_owner flags padding"),
    "fuse_write_in": (fuse.WRITE_IN, "fh offset size write_flags lock_owner flags padding"),
    "fuse_release_in": (fuse.RELEASE_IN, "fh flags release_flags lock_owner"),
    "fuse_fsync_in": (fuse.FSYNC_IN, "fh fsync_flags padding"),
    "fuse_getxattr_in": (fuse.GETXATTR_IN, "size padding"),
    "fuse_getxattr_out": (fuse.GETXATTR_OUT, "size padding"),
    "fuse_notify_inval_inode_out": (fuse.NOTIFY_INVAL_INODE, "ino off len"),
    "fuse_notify_inval_entry_out": (fuse.NOTIFY_INVAL_ENTRY, "parent namelen flags"),
}
# Structs we pack only up to a field (the flexible name[], or the fuse_attr packed separately).
SIZE_IS_PREFIX = {"fuse_dirent": "name", "fuse_entry_out": "attr", "fuse_attr_out": "attr"}


def _offsets(layout: struct.Struct) -> list[int]:
    codes = [c for c in layout.format[1:] if c.isalpha() and c != "x"]
    return [struct.calcsize("<" + "".join(codes[:i])) for i in range(len(codes))]


@pytest.fixture(scope="module")
def c_layouts(tmp_path_factory) -> dict[str, int]:
    """sizeof and offsetof of every struct and field above, from the real header."""
    header = Path("/usr/include/linux/fuse.h")
    assert header.exists(), "install linux-libc-dev (it ships /usr/include/linux/fuse.h)"
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed to read struct layouts from linux/fuse.h"
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/fuse.h>", "int main(void) {"]
    for name, (_, fields) in LAYOUTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for field in fields.split():
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    lines.append('printf("fuse_dirent.name %zu\\n", offsetof(struct fuse_dirent, name));')
    lines.append('printf("fuse_entry_out.attr %zu\\n", offsetof(struct fuse_entry_out, attr));')
    lines.append('printf("fuse_attr_out.attr %zu\\n", offsetof(struct fuse_attr_out, attr));')
    lines.append("return 0; }")
    work = tmp_path_factory.mktemp("fuseh")
    (work / "layout.c").write_text("\n".join(lines))
    subprocess.run([compiler, "-o", str(work / "layout"), str(work / "layout.c")], check=True)
    out = subprocess.run([str(work / "layout")], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", LAYOUTS)
def test_struct_layout_matches_linux_fuse_h(name, c_layouts):
    layout, fields = LAYOUTS[name]
    expected_size = c_layouts[f"{name}.{SIZE_IS_PREFIX[name]}"] if name in SIZE_IS_PREFIX else c_layouts[name]
    assert layout.size == expected_size
    assert _offsets(layout) == [c_layouts[f"{name}.{f}"] for f in fields.split()]


def test_entry_out_with_its_attr_is_the_whole_struct(c_layouts):
    assert fuse.ENTRY_SIZE == c_layouts["fuse_entry_out"]
    assert fuse.ATTR_OUT.size + fuse.ATTR.size == c_layouts["fuse_attr_out"]


# ---- translation ----------------------------------------------------------------------------------

ROOT = 100
ATTR = vfs.Attr(ino=5, size=3, blocks=1, atime_ns=1_500_000_000, mtime_ns=-1, ctime_ns=7, mode=0o100640, nlink=2,
                uid=1000, gid=1001)  # fmt: skip
ENTRY = vfs.Entry(node=42, generation=3, entry_valid_ns=2_500_000_000, attr_valid_ns=10, attr=ATTR)


def request(op: int, body: bytes = b"", nodeid: int = fuse.ROOT_ID, unique: int = 9) -> bytes:
    return fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), op, unique, nodeid, 1000, 1001, 77, 0, 0) + body


def sent(action: fuse.Action) -> vfs.Args | None:
    """What the host gets for `action`: its args, or its ready wire payload as the host decodes it."""
    if action.wire is None:
        return action.args
    assert action.args is None
    op, payload = action.wire
    args = vfs.decode_args(op, b"".join(payload) if isinstance(payload, tuple) else payload)
    assert args is not None
    return args


def forwarded(translator: fuse.MountTranslator, data: bytes) -> vfs.Args:
    action = translator.handle(data)
    args = sent(action)
    assert action.reply is None and args is not None and action.pending is not None
    assert (action.uid, action.gid, action.pid) == (1000, 1001, 77)
    return args


@pytest.fixture
def tr() -> fuse.MountTranslator:
    return fuse.MountTranslator(ROOT, max_io=1 << 20, negative_valid_ns=0)


def test_init_negotiates_only_what_the_kernel_offers_and_big_io(tr):
    # Declined: 1<<14 READDIRPLUS_AUTO (plus for every READDIR instead) and 1<<16 writeback cache.
    offered = fuse.ASYNC_READ | fuse.MAX_PAGES | fuse.DO_READDIRPLUS | (1 << 14) | (1 << 16)
    action = tr.handle(request(fuse.INIT, fuse.INIT_IN.pack(7, 37, 131072, offered) + bytes(48)))
    length, err, unique = fuse.OUT_HEADER.unpack_from(action.reply)
    assert (length, err, unique) == (16 + 64, 0, 9)
    major, minor, readahead, flags, _, _, max_write, gran, pages, _, _ = fuse.INIT_OUT.unpack_from(action.reply, 16)
    assert (major, minor, readahead, max_write, gran, pages) == (7, 38, 131072, 1 << 20, 1, 256)
    assert flags == fuse.ASYNC_READ | fuse.MAX_PAGES | fuse.DO_READDIRPLUS
    assert tr.initialized


def test_init_from_an_old_kernel_is_refused(tr):
    action = tr.handle(request(fuse.INIT, fuse.INIT_IN.pack(7, 20, 0, 0)))
    assert fuse.OUT_HEADER.unpack_from(action.reply)[1] == -errno.EPROTO


def test_root_node_maps_to_the_host_root_and_others_pass_through(tr):
    assert forwarded(tr, request(fuse.LOOKUP, b"a.txt\0")) == vfs.Lookup(ROOT, b"a.txt")
    assert forwarded(tr, request(fuse.LOOKUP, b"b\0", nodeid=42)) == vfs.Lookup(42, b"b")


@pytest.mark.parametrize(
    "op, body, nodeid, expected",
    [
        (fuse.GETATTR, fuse.GETATTR_IN.pack(fuse.GETATTR_FH, 0, 8), 42, vfs.Getattr(42, 8)),
        (fuse.GETATTR, fuse.GETATTR_IN.pack(0, 0, 8), 42, vfs.Getattr(42, 0)),
        (fuse.SETATTR, fuse.SETATTR_IN.pack(vfs.SET_SIZE | vfs.SET_MTIME | fuse.FATTR_FH | 512, 0, 8, 123, 0, 0, 5,
                                            0, 0, 7, 0, 0, 0, 0, 0, 0), 42,
         vfs.Setattr(42, vfs.SET_SIZE | vfs.SET_MTIME, 8, 123, 0, 5_000_000_007, 0, 0, 0)),
        (fuse.READLINK, b"", 42, vfs.Readlink(42)),
        (fuse.SYMLINK, b"ln\0../t\0", 1, vfs.Symlink(ROOT, b"ln", b"../t")),
        (fuse.MKNOD, fuse.MKNOD_IN.pack(0o010644, 0, 0o22, 0) + b"p\0", 1, vfs.Mknod(ROOT, 0o010644, 0, b"p")),
        (fuse.MKDIR, fuse.MKDIR_IN.pack(0o755, 0o22) + b"d\0", 42, vfs.Mkdir(42, 0o755, b"d")),
        (fuse.UNLINK, b"f\0", 42, vfs.Unlink(42, b"f")),
        (fuse.RMDIR, b"d\0", 42, vfs.Rmdir(42, b"d")),
        (fuse.RENAME, fuse.RENAME_IN.pack(1) + b"a\0b\0", 42, vfs.Rename(42, ROOT, 0, b"a", b"b")),
        (fuse.RENAME2, fuse.RENAME2_IN.pack(43, 2, 0) + b"a\0b\0", 42, vfs.Rename(42, 43, 2, b"a", b"b")),
        (fuse.LINK, fuse.LINK_IN.pack(42) + b"h\0", 1, vfs.Link(42, ROOT, b"h")),
        (fuse.OPEN, fuse.OPEN_IN.pack(0o102001 | 0o1000, 0), 42, vfs.Open(42, 0o3001)),
        (fuse.CREATE, fuse.CREATE_IN.pack(0o100302, 0o100600, 0o22, 0) + b"n\0", 1,
         vfs.Create(ROOT, 0o302, 0o100600, b"n")),
        (fuse.READ, fuse.READ_IN.pack(8, 4096, 131072, 0, 0, 0, 0), 42, vfs.Read(42, 8, 4096, 131072)),
        (fuse.WRITE, fuse.WRITE_IN.pack(8, 10, 3, 0, 0, 0o2001, 0) + b"xyz", 42, vfs.Write(42, 8, 10, 0o2001, b"xyz")),
        (fuse.FSYNC, fuse.FSYNC_IN.pack(8, 1, 0), 42, vfs.Fsync(42, 8, 1)),
        (fuse.OPENDIR, fuse.OPEN_IN.pack(0o200000, 0), 1, vfs.Opendir(ROOT, 0)),
        (fuse.READDIR, fuse.READ_IN.pack(4, 2, 4096, 0, 0, 0, 0), 1, vfs.Readdir(ROOT, 4, 2, 4096, 0)),
        (fuse.READDIRPLUS, fuse.READ_IN.pack(4, 0, 4096, 0, 0, 0, 0), 1, vfs.Readdir(ROOT, 4, 0, 4096, 1)),
        (fuse.STATFS, b"", 1, vfs.Statfs(ROOT)),
    ],
)  # fmt: skip
def test_requests_translate_to_the_wire(tr, op, body, nodeid, expected):
    args = forwarded(tr, request(op, body, nodeid))
    assert args == expected
    # Whatever the guest forwards, the host's decoder accepts.
    (decoded,) = vfs.RequestDecoder().feed(vfs.encode_request(1, 0, 0, 0, args))
    assert decoded.args == expected


@pytest.mark.parametrize(
    "op, body, code",
    [
        (fuse.LOOKUP, b"x" * 256 + b"\0", errno.ENAMETOOLONG),
        (fuse.LOOKUP, b"..\0", errno.EINVAL),
        (fuse.SYMLINK, b"l\0\0", errno.ENOENT),
        (fuse.SYMLINK, b"l\0" + b"t" * 4096 + b"\0", errno.ENAMETOOLONG),
        (fuse.RENAME2, fuse.RENAME2_IN.pack(1, 4, 0) + b"a\0b\0", errno.EINVAL),
        (fuse.WRITE, fuse.WRITE_IN.pack(8, 0, 10, 0, 0, 0, 0) + b"short", errno.EINVAL),
        (fuse.FLUSH, struct.pack("<QIIQ", 8, 0, 0, 99), errno.ENOSYS),  # the kernel stops sending it
        (22, b"", errno.ENOSYS),  # GETXATTR
        (43, b"", errno.ENOSYS),  # FALLOCATE
        (fuse.GETATTR, b"\0", errno.EINVAL),
    ],
)
def test_requests_answered_in_the_guest(tr, op, body, code):
    action = tr.handle(request(op, body))
    assert action.args is None
    assert fuse.OUT_HEADER.unpack(action.reply) == (16, -code, 9)


@pytest.mark.parametrize(
    "op, nodeid, notice",
    [(fuse.RELEASE, 42, vfs.Release(42, 8)), (fuse.RELEASEDIR, 1, vfs.Releasedir(ROOT, 8))],
)
def test_releases_are_answered_at_once_and_sent_as_notices(tr, op, nodeid, notice):
    action = tr.handle(request(op, fuse.RELEASE_IN.pack(8, 0, 0, 0), nodeid, unique=31))
    assert action.reply == fuse.OUT_HEADER.pack(16, 0, 31) and action.args is None
    assert action.notices == (notice,)
    # Sent with id 0, the host takes it as a notice: served, never answered.
    (decoded,) = vfs.RequestDecoder().feed(vfs.encode_request(0, 0, 0, 0, notice))
    assert (decoded.id, decoded.args) == (0, notice)
    assert tr.handle(request(op, b"\0", nodeid)).reply == fuse.OUT_HEADER.pack(16, -errno.EINVAL, 9)


def test_the_xattr_list_is_empty_and_answered_in_the_guest(tr):
    # size 0 asks for the length; a buffer gets the (empty) names.
    length = tr.handle(request(fuse.LISTXATTR, fuse.GETXATTR_IN.pack(0, 0), 42))
    assert length.args is None and length.reply == fuse.OUT_HEADER.pack(24, 0, 9) + fuse.GETXATTR_OUT.pack(0, 0)
    names = tr.handle(request(fuse.LISTXATTR, fuse.GETXATTR_IN.pack(4096, 0), 42))
    assert names.reply == fuse.OUT_HEADER.pack(16, 0, 9)
    getxattr = tr.handle(request(fuse.GETXATTR, fuse.GETXATTR_IN.pack(0, 0) + b"user.a\0"))
    assert fuse.OUT_HEADER.unpack(getxattr.reply)[1] == -errno.ENOSYS


def test_forgets_drop_the_root_and_split_big_batches(tr):
    action = tr.handle(request(fuse.FORGET, fuse.FORGET_IN.pack(2), nodeid=42))
    assert action.reply is None and action.notices == (vfs.Forget(((42, 2),)),)
    assert tr.handle(request(fuse.FORGET, fuse.FORGET_IN.pack(1))).notices == ()
    items = [(n, 1) for n in range(2, 2 + vfs.MAX_FORGETS + 10)] + [(1, 1)]
    body = fuse.BATCH_FORGET_IN.pack(len(items), 0) + b"".join(fuse.FORGET_ONE.pack(*i) for i in items)
    forgets = tr.handle(request(fuse.BATCH_FORGET, body)).notices
    assert [len(f.items) for f in forgets] == [vfs.MAX_FORGETS, 10]
    assert all(node != 1 for f in forgets for node, _ in f.items)


def test_interrupt_gets_no_reply_and_nothing_is_forwarded(tr):
    action = tr.handle(request(fuse.INTERRUPT, struct.pack("<Q", 5)))
    assert (action.reply, action.args, action.notices) == (None, None, ())


def complete(tr, op, result, size=0, plus=0):
    (reply,) = vfs.ReplyDecoder().feed(vfs.encode_reply(1, result))
    buffers, forget = tr.complete(fuse.Pending(9, op, size, plus), reply.status, reply.payload)
    data = b"".join(buffers)
    length, err, unique = fuse.OUT_HEADER.unpack_from(data)
    assert (length, err, unique) == (len(data), 0, 9)
    return data[16:], forget


def test_entry_reply_carries_ids_validity_and_nanosecond_times(tr):
    body, _ = complete(tr, fuse.LOOKUP, ENTRY)
    assert fuse.ENTRY_OUT.unpack_from(body) == (42, 3, 2, 0, 500_000_000, 10)
    attr = fuse.ATTR.unpack_from(body, fuse.ENTRY_OUT.size)
    assert attr == (5, 3, 1, 1, -1, 0, 500_000_000, 999_999_999, 7, 0o100640, 2, 1000, 1001, 0, 4096, 0)


def test_a_link_is_followed_by_a_notice_dropping_the_old_names_cached_attributes(tr):
    # The host gives the new name its own node, so the kernel's inode for the old name keeps
    # "1 link" and its size cached (a write through the new name would not show): invalidate it.
    action = tr.handle(request(fuse.LINK, fuse.LINK_IN.pack(50) + b"hard\0", 42))
    assert action.pending is not None and action.pending.source == 50
    notice = tr.after_reply(action.pending, 0)
    assert notice is not None
    assert fuse.OUT_HEADER.unpack_from(notice) == (16 + 24, fuse.NOTIFY_INVAL_INODE_CODE, 0)
    assert fuse.NOTIFY_INVAL_INODE.unpack_from(notice, 16) == (50, 0, 0)  # attributes and every page
    assert tr.after_reply(action.pending, -errno.EPERM) is None  # a refused link changed nothing
    other = tr.handle(request(fuse.UNLINK, b"f\0", 42))
    assert other.pending is not None and tr.after_reply(other.pending, 0) is None


def test_error_reply_and_negative_lookup_caching():
    plain = fuse.MountTranslator(ROOT)
    buffers, _ = plain.complete(fuse.Pending(9, fuse.LOOKUP), -errno.ENOENT, b"")
    assert fuse.OUT_HEADER.unpack(b"".join(buffers)) == (16, -errno.ENOENT, 9)
    caching = fuse.MountTranslator(ROOT, negative_valid_ns=1_500_000_000)
    buffers, _ = caching.complete(fuse.Pending(9, fuse.LOOKUP), -errno.ENOENT, b"")
    data = b"".join(buffers)
    assert fuse.OUT_HEADER.unpack_from(data)[1] == 0
    assert fuse.ENTRY_OUT.unpack_from(data, 16)[:5] == (0, 0, 1, 0, 500_000_000)


@pytest.mark.parametrize(
    "op, body, nodeid",
    [
        (fuse.CREATE, fuse.CREATE_IN.pack(0o100301, 0o100644, 0o22, 0) + b"new\0", 42),
        (fuse.MKDIR, fuse.MKDIR_IN.pack(0o755, 0o22) + b"new\0", 42),
        (fuse.MKNOD, fuse.MKNOD_IN.pack(0o10644, 0, 0o22, 0) + b"new\0", 42),
        (fuse.SYMLINK, b"new\0target\0", 42),
        (fuse.LINK, fuse.LINK_IN.pack(50) + b"new\0", 42),
        (fuse.RENAME, fuse.RENAME_IN.pack(42) + b"old\0new\0", 51),
        (fuse.RENAME2, fuse.RENAME2_IN.pack(42, 0, 0) + b"old\0new\0", 51),
    ],
)  # fmt: skip
def test_a_remembered_enoent_answers_until_it_expires_or_the_name_is_made(op, body, nodeid):
    now = [0]
    tr = fuse.MountTranslator(ROOT, negative_valid_ns=1_000_000_000, clock=lambda: now[0])
    lookup = tr.handle(request(fuse.LOOKUP, b"new\0", 42, unique=5))
    assert sent(lookup) == vfs.Lookup(42, b"new")
    tr.complete(lookup.pending, -errno.ENOENT, b"")
    # Asked again (as the kernel does for O_EXCL), the guest answers: a negative entry for the time left.
    now[0] = 400_000_000
    again = tr.handle(request(fuse.LOOKUP, b"new\0", 42, unique=6))
    assert sent(again) is None and fuse.OUT_HEADER.unpack_from(again.reply) == (16 + fuse.ENTRY_SIZE, 0, 6)
    assert fuse.ENTRY_OUT.unpack_from(again.reply, 16)[:5] == (0, 0, 0, 0, 600_000_000)
    # Another name or directory still goes to the host.
    assert sent(tr.handle(request(fuse.LOOKUP, b"other\0", 42))) == vfs.Lookup(42, b"other")
    assert sent(tr.handle(request(fuse.LOOKUP, b"new\0", 43))) == vfs.Lookup(43, b"new")
    # An op that may make the name forgets the ENOENT, so the next LOOKUP asks the host.
    assert sent(tr.handle(request(op, body, nodeid))) is not None
    assert sent(tr.handle(request(fuse.LOOKUP, b"new\0", 42))) == vfs.Lookup(42, b"new")


def test_a_remembered_enoent_expires_and_the_table_is_bounded():
    now = [0]
    tr = fuse.MountTranslator(ROOT, negative_valid_ns=1_000, clock=lambda: now[0])
    lookup = tr.handle(request(fuse.LOOKUP, b"gone\0", 42))
    tr.complete(lookup.pending, -errno.ENOENT, b"")
    now[0] = 1_000
    assert sent(tr.handle(request(fuse.LOOKUP, b"gone\0", 42))) == vfs.Lookup(42, b"gone")
    for n in range(fuse.MAX_ABSENT + 1):
        tr.complete(fuse.Pending(9, fuse.LOOKUP, key=(42, b"f%d" % n)), -errno.ENOENT, b"")
    assert len(tr._absent) <= fuse.MAX_ABSENT
    # Without negative caching (host_fs that asked for none) nothing is remembered.
    plain = fuse.MountTranslator(ROOT)
    first = plain.handle(request(fuse.LOOKUP, b"x\0", 42))
    plain.complete(first.pending, -errno.ENOENT, b"")
    assert sent(plain.handle(request(fuse.LOOKUP, b"x\0", 42))) == vfs.Lookup(42, b"x")


@pytest.mark.parametrize(
    "op, result, expected",
    [
        (fuse.GETATTR, vfs.AttrReply(3_000_000_001, ATTR), fuse.ATTR_OUT.pack(3, 1, 0)),
        (fuse.OPEN, vfs.Opened(8, vfs.OPEN_KEEP_CACHE | 64), fuse.OPEN_OUT.pack(8, vfs.OPEN_KEEP_CACHE, 0)),
        (fuse.WRITE, vfs.Written(3), fuse.WRITE_OUT.pack(3, 0)),
        (fuse.STATFS, vfs.StatfsReply(1, 2, 3, 4, 5, 4096, 255, 4096), fuse.STATFS_OUT.pack(1, 2, 3, 4, 5, 4096, 255,
                                                                                            4096, 0)),
        (fuse.READ, b"data", b"data"),
        (fuse.READLINK, b"../t", b"../t"),
        (fuse.UNLINK, None, b""),
    ],
)  # fmt: skip
def test_replies_translate_to_fuse(tr, op, result, expected):
    body, _ = complete(tr, op, result, size=3 if op == fuse.WRITE else 4096)
    assert body.startswith(expected)
    if op == fuse.CREATE:
        assert len(body) == fuse.ENTRY_SIZE + fuse.OPEN_OUT.size


def test_create_reply_is_entry_then_open(tr):
    body, _ = complete(tr, fuse.CREATE, vfs.Created(ENTRY, 11, vfs.OPEN_DIRECT_IO))
    assert len(body) == fuse.ENTRY_SIZE + fuse.OPEN_OUT.size
    assert fuse.OPEN_OUT.unpack_from(body, fuse.ENTRY_SIZE) == (11, vfs.OPEN_DIRECT_IO, 0)


def test_host_exceeding_the_read_or_write_size_is_a_protocol_error(tr):
    with pytest.raises(vfs.RemoteProtocolError):
        complete(tr, fuse.READ, b"12345", size=4)
    with pytest.raises(vfs.RemoteProtocolError):
        complete(tr, fuse.WRITE, vfs.Written(5), size=4)


def _parse_dirents(body: bytes, plus: bool) -> list[tuple[int, bytes, int]]:
    """(node or 0, name, off) of each entry, walking the kernel's own layout."""
    out, pos = [], 0
    while pos < len(body):
        node = 0
        if plus:
            node = fuse.ENTRY_OUT.unpack_from(body, pos)[0]
            pos += fuse.ENTRY_SIZE
        ino, off, namelen, _ = fuse.DIRENT.unpack_from(body, pos)
        name = body[pos + 24 : pos + 24 + namelen]
        pos += (24 + namelen + 7) // 8 * 8
        out.append((node, name, off))
    return out


def test_readdirplus_fits_the_buffer_and_gives_back_what_did_not_fit(tr):
    entries = (
        vfs.DirEntry(1, 1, 4, b".", ENTRY),  # a host that wrongly attached an entry to '.'
        vfs.DirEntry(2, 1, 4, b".."),
        vfs.DirEntry(3, 5, 8, b"a", vfs.Entry(50, 0, 0, 0, ATTR)),
        vfs.DirEntry(4, 6, 8, b"b", vfs.Entry(51, 0, 0, 0, ATTR)),
    )
    size = 3 * vfs.dirent_size(1, True)
    body, forget = complete(tr, fuse.READDIRPLUS, entries, size=size, plus=1)
    assert _parse_dirents(body, True) == [(0, b".", 1), (0, b"..", 2), (50, b"a", 3)]
    assert forget == vfs.Forget(((42, 1), (51, 1)))


def test_plain_readdir_has_no_entries(tr):
    entries = (vfs.DirEntry(7, 5, 8, b"file.txt"), vfs.DirEntry(8, 6, 4, b"sub"))
    body, forget = complete(tr, fuse.READDIR, entries, size=4096)
    assert _parse_dirents(body, False) == [(0, b"file.txt", 7), (0, b"sub", 8)]
    assert forget is None
