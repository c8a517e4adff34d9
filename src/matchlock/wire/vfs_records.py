"""The VFS channel's records: ops, limits, request arguments and reply results (stdlib only).

`wire.vfs` encodes and decodes them and re-exports every name here, so both sides import `wire.vfs`
only. Each request record lists its fixed big-endian fields first, then its variable tail.
"""

from __future__ import annotations

import struct

from ._records import Record

VERSION = 1
# The largest READ or WRITE: the guest negotiates FUSE max_write/max_read from it.
MAX_IO = 1 << 20
# Fixed fields, names and readdir overhead fit in the slack above MAX_IO.
MAX_PAYLOAD = MAX_IO + 64 * 1024
MAX_NAME = 255
MAX_TARGET = 4095
MAX_FORGETS = 4096
MAX_MOUNTS = 64
MAX_HELLO = 64 * 1024
ROOT_ALIAS = 1  # the guest's FUSE root id; the host never uses it as a node id
MAX_ID = (1 << 32) - 1


class Op:
    """Request ops (plain ints: `enum` is too slow to import in the guest)."""

    HELLO = 1
    LOOKUP = 2
    FORGET = 3  # no reply
    GETATTR = 4
    SETATTR = 5
    READLINK = 6
    SYMLINK = 7
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    CREATE = 15
    READ = 16
    WRITE = 17
    FLUSH = 18
    RELEASE = 19
    FSYNC = 20
    OPENDIR = 21
    READDIR = 22
    RELEASEDIR = 23
    STATFS = 24
    OPENDIR_READ = 25  # OPENDIR and the first READDIR in one (FEATURE_GUEST_OPENDIR)
    LOOKUP_DIR = 26  # LOOKUP, answered with the directory's whole listing where the host allows (FEATURE_LOOKUP_DIR)
    PARKED = 27  # no reply: the guest answers a PARK notice and sends nothing more until the wake


OP_NAMES = {value: name for name, value in vars(Op).items() if name.isupper()}

# SETATTR `valid` bits (the values of FUSE's FATTR_*, which the guest passes through).
SET_MODE = 1
SET_UID = 2
SET_GID = 4
SET_SIZE = 8
SET_ATIME = 16
SET_MTIME = 32
SET_ATIME_NOW = 128
SET_MTIME_NOW = 256
SET_CTIME = 1024
SET_KILL_SUIDGID = 2048  # with SET_SIZE: the truncater lacks CAP_FSETID, so drop set-id bits (FUSE_HANDLE_KILLPRIV_V2)
SET_ALL = (SET_MODE | SET_UID | SET_GID | SET_SIZE | SET_ATIME | SET_MTIME | SET_ATIME_NOW | SET_MTIME_NOW | SET_CTIME
           | SET_KILL_SUIDGID)  # fmt: skip

# Opened.flags bits (FUSE's FOPEN_* values).
OPEN_DIRECT_IO = 1
OPEN_KEEP_CACHE = 2
OPEN_CACHE_DIR = 8
OPEN_FLAGS_ALL = OPEN_DIRECT_IO | OPEN_KEEP_CACHE | OPEN_CACHE_DIR
# Not FUSE's: an OPENDIR reply bit (FEATURE_GUEST_OPENDIR) saying the guest may answer later OPENDIRs of
# this node itself, with these flags, until an INVAL_INODE or FORGET of it: the host enforces nothing
# on them (no interception) and its notices keep the guest's cached listing right. The guest then
# opens the host's handle with OPENDIR_READ when a READDIR needs it.
OPEN_GUEST_DIR = 1 << 16

# The Linux open(2) flags OPEN, CREATE, OPENDIR and WRITE may carry (the same values on every Linux
# architecture we boot): access mode, O_CREAT, O_EXCL, O_TRUNC, O_APPEND, O_DSYNC, O_SYNC.
OPEN_FLAG_MASK = 0o3 | 0o100 | 0o200 | 0o1000 | 0o2000 | 0o10000 | 0o4000000
# Beside them, OPEN and CREATE (with O_TRUNC) and WRITE may carry this bit, no open(2) flag: the caller
# lacks CAP_FSETID, so the host drops the file's set-id bits as the kernel would (FUSE_HANDLE_KILLPRIV_V2).
KILL_SUIDGID = 1 << 30

# HELLO features, a bit mask: the guest offers them, the host's reply says which it serves.
FEATURE_PARENT_ATTR = 1  # MKNOD, MKDIR, SYMLINK, LINK and CREATE replies end with the parent's new attributes
FEATURE_KILLPRIV = 2  # the host honours KILL_SUIDGID and SET_KILL_SUIDGID, and drops set-id bits on chown
FEATURE_GUEST_OPENDIR = 4  # the host may set OPEN_GUEST_DIR, and serves OPENDIR_READ
# The host serves LOOKUP_DIR: only without interception (every LOOKUP must reach rules and events).
FEATURE_LOOKUP_DIR = 8
# The guest may answer a SETATTR that changes nothing it can see but ctime (a chown or chmod to what its
# fresh cache holds) itself, and send it with id 0 (no reply); the host serves those in order, and a
# failure or another outcome becomes an INVAL_INODE notice. Never served with VFS interception.
FEATURE_SETATTR_NOTICE = 16
FEATURE_WRITE_ATTR = 32  # WRITE replies end with the file's new attributes (an AttrReply, as PARENT_ATTR's)
FEATURES_ALL = (FEATURE_PARENT_ATTR | FEATURE_KILLPRIV | FEATURE_GUEST_OPENDIR | FEATURE_LOOKUP_DIR
                | FEATURE_SETATTR_NOTICE | FEATURE_WRITE_ATTR)  # fmt: skip
# The most entries a LOOKUP_DIR listing holds (about 400 KiB at most, well inside MAX_PAYLOAD): a
# bigger directory is answered as LOOKUP, so one name never costs the host a huge listing.
MAX_LISTED = 1024

# RENAME flags (renameat2): anything else is rejected by the decoder.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# Tail kinds of a request's variable part.
_NAME = "name"
_TARGET = "target"
_DATA = "data"
_FORGETS = "forgets"


def check_name(name: bytes, *, dots: bool = False) -> bytes:
    """A single path component: 1..255 bytes, no '/' or NUL, not '.' or '..' (unless `dots`)."""
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"name of {len(name)} bytes (must be 1..{MAX_NAME})")
    if b"/" in name or b"\x00" in name:
        raise ValueError(f"name {name[:64]!r} contains '/' or NUL")
    if not dots and name in (b".", b".."):
        raise ValueError(f"name {name!r} is not allowed")
    return name


def check_target(target: bytes) -> bytes:
    if not target or len(target) > MAX_TARGET or b"\x00" in target:
        raise ValueError(f"symlink target of {len(target)} bytes (must be 1..{MAX_TARGET}, no NUL)")
    return target


class Args(Record):
    """Base of the request payload records: fixed fields first, then the tail in `_tail` order."""

    _op = 0
    _fixed = struct.Struct(">")
    _tail: tuple[str, ...] = ()


class Lookup(Args):
    __slots__ = ("parent", "name")
    parent: int
    name: bytes
    _op, _fixed, _tail = Op.LOOKUP, struct.Struct(">Q"), (_NAME,)


class Forget(Args):
    """Give back lookups: `items` is ((node, nlookup), ...)."""

    __slots__ = ("items",)
    items: tuple[tuple[int, int], ...]
    _op, _tail = Op.FORGET, (_FORGETS,)


class Parked(Args):
    """The guest's answer to the host's PARK notice `token` (wire.vfs: parking the channel)."""

    __slots__ = ("token",)
    token: int
    _op, _fixed = Op.PARKED, struct.Struct(">Q")


class Getattr(Args):
    __slots__ = ("node", "fh")
    node: int
    fh: int
    _op, _fixed = Op.GETATTR, struct.Struct(">QQ")


class Setattr(Args):
    """Change what `valid` (SET_* bits) names; times are ns since the epoch; fh 0 = none."""

    __slots__ = ("node", "valid", "fh", "size", "atime_ns", "mtime_ns", "mode", "uid", "gid")
    node: int
    valid: int
    fh: int
    size: int
    atime_ns: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    _op, _fixed = Op.SETATTR, struct.Struct(">QIQQqqIII")


class Readlink(Args):
    __slots__ = ("node",)
    node: int
    _op, _fixed = Op.READLINK, struct.Struct(">Q")


class Symlink(Args):
    __slots__ = ("parent", "name", "target")
    parent: int
    name: bytes
    target: bytes
    _op, _fixed, _tail = Op.SYMLINK, struct.Struct(">Q"), (_NAME, _TARGET)


class Mknod(Args):
    """`mode` is the full st_mode, umask already applied by the guest kernel."""

    __slots__ = ("parent", "mode", "rdev", "name")
    parent: int
    mode: int
    rdev: int
    name: bytes
    _op, _fixed, _tail = Op.MKNOD, struct.Struct(">QII"), (_NAME,)


class Mkdir(Args):
    __slots__ = ("parent", "mode", "name")
    parent: int
    mode: int
    name: bytes
    _op, _fixed, _tail = Op.MKDIR, struct.Struct(">QI"), (_NAME,)


class Unlink(Args):
    __slots__ = ("parent", "name")
    parent: int
    name: bytes
    _op, _fixed, _tail = Op.UNLINK, struct.Struct(">Q"), (_NAME,)


class Rmdir(Args):
    __slots__ = ("parent", "name")
    parent: int
    name: bytes
    _op, _fixed, _tail = Op.RMDIR, struct.Struct(">Q"), (_NAME,)


class Rename(Args):
    __slots__ = ("parent", "newparent", "flags", "name", "newname")
    parent: int
    newparent: int
    flags: int
    name: bytes
    newname: bytes
    _op, _fixed, _tail = Op.RENAME, struct.Struct(">QQI"), (_NAME, _NAME)


class Link(Args):
    """Hard link: a new name `newname` in `newparent` for the existing `node`."""

    __slots__ = ("node", "newparent", "newname")
    node: int
    newparent: int
    newname: bytes
    _op, _fixed, _tail = Op.LINK, struct.Struct(">QQ"), (_NAME,)


class Open(Args):
    """`flags` are Linux open(2) flags; O_TRUNC is included and must be honoured."""

    __slots__ = ("node", "flags")
    node: int
    flags: int
    _op, _fixed = Op.OPEN, struct.Struct(">QI")


class Create(Args):
    __slots__ = ("parent", "flags", "mode", "name")
    parent: int
    flags: int
    mode: int
    name: bytes
    _op, _fixed, _tail = Op.CREATE, struct.Struct(">QII"), (_NAME,)


class Read(Args):
    __slots__ = ("node", "fh", "offset", "size")
    node: int
    fh: int
    offset: int
    size: int
    _op, _fixed = Op.READ, struct.Struct(">QQQI")


class Write(Args):
    """`flags` are the file's open flags (O_APPEND: the host writes at the end, ignoring offset)."""

    __slots__ = ("node", "fh", "offset", "flags", "data")
    node: int
    fh: int
    offset: int
    flags: int
    data: bytes
    _op, _fixed, _tail = Op.WRITE, struct.Struct(">QQQI"), (_DATA,)


class Flush(Args):
    __slots__ = ("node", "fh")
    node: int
    fh: int
    _op, _fixed = Op.FLUSH, struct.Struct(">QQ")


class Release(Args):
    __slots__ = ("node", "fh")
    node: int
    fh: int
    _op, _fixed = Op.RELEASE, struct.Struct(">QQ")


class Fsync(Args):
    __slots__ = ("node", "fh", "datasync")
    node: int
    fh: int
    datasync: int
    _op, _fixed = Op.FSYNC, struct.Struct(">QQI")


class Opendir(Args):
    __slots__ = ("node", "flags")
    node: int
    flags: int
    _op, _fixed = Op.OPENDIR, struct.Struct(">QI")


class Readdir(Args):
    """Entries after cookie `offset` (0 = start), at most about `size` bytes of them; `plus` asks for entries."""

    __slots__ = ("node", "fh", "offset", "size", "plus")
    node: int
    fh: int
    offset: int
    size: int
    plus: int
    _op, _fixed = Op.READDIR, struct.Struct(">QQQIB")


class OpendirRead(Args):
    """OPENDIR, then READDIR on the new handle: the reply is a DirOpened."""

    __slots__ = ("node", "offset", "size", "plus")
    node: int
    offset: int
    size: int
    plus: int
    _op, _fixed = Op.OPENDIR_READ, struct.Struct(">QQIB")


class LookupDir(Args):
    """LOOKUP `name` in `parent`; the reply is a Listed: the entry alone, or `parent`'s whole listing."""

    __slots__ = ("parent", "name")
    parent: int
    name: bytes
    _op, _fixed, _tail = Op.LOOKUP_DIR, struct.Struct(">Q"), (_NAME,)


class Releasedir(Args):
    __slots__ = ("node", "fh")
    node: int
    fh: int
    _op, _fixed = Op.RELEASEDIR, struct.Struct(">QQ")


class Statfs(Args):
    __slots__ = ("node",)
    node: int
    _op, _fixed = Op.STATFS, struct.Struct(">Q")


class Hello(Args):
    """The guest's first request (JSON): its protocol version, the largest I/O it will send, FEATURE_* it offers."""

    __slots__ = ("version", "max_io", "features")
    version: int
    max_io: int
    features: int
    _op = Op.HELLO
    _defaults = {"features": 0}


ARGS: dict[int, type[Args]] = {
    cls._op: cls
    for cls in (Hello, Lookup, Forget, Getattr, Setattr, Readlink, Symlink, Mknod, Mkdir, Unlink, Rmdir, Rename,
                Link, Open, Create, Read, Write, Flush, Release, Fsync, Opendir, Readdir, Releasedir, Statfs,
                OpendirRead, LookupDir, Parked)
}  # fmt: skip
_NODE_FIELDS = ("node", "parent", "newparent")


class Request(Record):
    """A decoded request; `args` is None for an op this version does not know (reply ENOSYS)."""

    __slots__ = ("id", "op", "uid", "gid", "pid", "args")
    id: int
    op: int
    uid: int
    gid: int
    pid: int
    args: Args | None


# ---- reply records -------------------------------------------------------------------------------


class Attr(Record):
    """Attributes as stat(2) has them; times in ns since the epoch, `mode` the full st_mode."""

    __slots__ = ("ino", "size", "blocks", "atime_ns", "mtime_ns", "ctime_ns", "mode", "nlink", "uid", "gid",
                 "rdev", "blksize")  # fmt: skip
    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    _defaults = {"rdev": 0, "blksize": 4096}


ATTR_STRUCT = struct.Struct(">QQQqqqIIIIII")
PARENT_STRUCT = struct.Struct(">Q" + ATTR_STRUCT.format[1:])  # FEATURE_PARENT_ATTR's suffix: an AttrReply


class AttrReply(Record):
    """GETATTR/SETATTR reply: the guest may cache `attr` for `attr_valid_ns`."""

    __slots__ = ("attr_valid_ns", "attr")
    attr_valid_ns: int
    attr: Attr


class Entry(Record):
    """A node the host looked up; the guest may cache the name for `entry_valid_ns`."""

    __slots__ = ("node", "generation", "entry_valid_ns", "attr_valid_ns", "attr")
    node: int
    generation: int
    entry_valid_ns: int
    attr_valid_ns: int
    attr: Attr


ENTRY_STRUCT = struct.Struct(">QQQQ")


class Opened(Record):
    __slots__ = ("fh", "flags")
    fh: int
    flags: int
    _defaults = {"flags": 0}


_OPENED = struct.Struct(">QI")


class Created(Record):
    __slots__ = ("entry", "fh", "flags")
    entry: Entry
    fh: int
    flags: int
    _defaults = {"flags": 0}


class Written(Record):
    __slots__ = ("size",)
    size: int


class StatfsReply(Record):
    __slots__ = ("blocks", "bfree", "bavail", "files", "ffree", "bsize", "namelen", "frsize")
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


_STATFS = struct.Struct(">QQQQQIII")


class DirOpened(Record):
    """OPENDIR_READ's reply: the handle (as OPENDIR's Opened) and READDIR's entries on it."""

    __slots__ = ("fh", "flags", "entries")
    fh: int
    flags: int
    entries: tuple[DirEntry, ...]


class Listed(Record):
    """LOOKUP_DIR's reply: `entry` (as LOOKUP's; entries empty) where the host gives no listing, else None and
    every entry of the directory but '.' and '..', each with its node (one lookup each, as READDIR's `plus`)
    unless it went away while listed. An ENOENT without a listing is an error reply, as LOOKUP's."""

    __slots__ = ("entry", "entries")
    entry: Entry | None
    entries: tuple[DirEntry, ...]


class DirEntry(Record):
    """One directory entry; `offset` is the cookie to continue after it; `entry` only for `plus`.

    With `plus`, every entry with a node counts as one lookup, except '.' and '..', which must have
    entry None.
    """

    __slots__ = ("offset", "ino", "type", "name", "entry")
    offset: int
    ino: int
    type: int
    name: bytes
    entry: Entry | None
    _defaults = {"entry": None}


_DIRENT = struct.Struct(">QQBHB")


def dirent_size(name_len: int, plus: bool) -> int:
    """Bytes one entry takes in the guest kernel's buffer (fuse_dirent[plus], 8-byte aligned).

    The host stops adding entries when the next one would not fit in READDIR's `size`; with `plus`
    the guest gives back (FORGETs) any entry that does not fit anyway, so a host that overfills only
    wastes work.
    """
    return (24 + name_len + 7) // 8 * 8 + (128 if plus else 0)


class Mount(Record):
    """A mount point the guest should create: its guest path and root node.

    `negative_valid_ns` > 0 lets the guest cache "no such name" (a LOOKUP answered ENOENT) that
    long; give it only where the guest is the sole writer (memory, overlay) or staleness is fine.
    `guest_overlay` (read-only mounts only): the guest mounts this as the lower of its own kernel
    overlayfs at `path`, its writes kept on the sandbox's upper disk; absent means a plain mount.
    """

    __slots__ = ("path", "root", "readonly", "negative_valid_ns", "guest_overlay")
    path: str
    root: int
    readonly: bool
    negative_valid_ns: int
    guest_overlay: bool
    _defaults = {"readonly": False, "negative_valid_ns": 0, "guest_overlay": False}


class HelloReply(Record):
    """`stats` asks the guest daemon to log its per-request timings (benchmarks, MATCHLOCK_VFS_STATS);
    `features` are the offered FEATURE_* bits the host serves."""

    __slots__ = ("version", "max_io", "mounts", "stats", "features")
    version: int
    max_io: int
    mounts: tuple[Mount, ...]
    stats: bool
    features: int
    _defaults = {"stats": False, "features": 0}


class Reply(Record):
    """A reply frame before its payload is decoded (the guest knows the op from the id)."""

    __slots__ = ("id", "status", "payload")
    id: int
    status: int
    payload: bytes


Result = (Entry | AttrReply | Opened | Created | DirOpened | Listed | Written | StatfsReply | HelloReply | tuple | bytes
          | None)  # fmt: skip
