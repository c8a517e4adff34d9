"""The FUSE kernel protocol, translated to and from the VFS channel (sans-IO, stdlib only).

`MountTranslator.handle` takes one request as read from /dev/fuse and says what to do with it:
answer it here (INIT, and ENOSYS for what the host does not serve), forward it to the host as a
`wire.vfs` request, or both (FORGETs carry no reply). `MountTranslator.complete` turns the host's
reply into the bytes to write back to /dev/fuse. Structs follow /usr/include/linux/fuse.h (7.38);
the guest is little-endian on every architecture we boot.

FUSE's root node id is 1; the translator maps it to the host's root node of the mount and passes
every other node id through unchanged, so the host's ids are the kernel's.
"""

from __future__ import annotations

import errno
import struct
import time

from ..wire import vfs
from ..wire._records import Record
from ..wire.frames import RemoteProtocolError

KERNEL_MAJOR = 7
KERNEL_MINOR = 38
MIN_MINOR = 28  # max_pages
ROOT_ID = 1
PAGE = 4096

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18
FSYNC, GETXATTR, LISTXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 20, 22, 23, 25, 26, 27, 28, 29
CREATE, INTERRUPT, DESTROY, BATCH_FORGET, READDIRPLUS, RENAME2 = 35, 36, 38, 42, 44, 45

# INIT flags we ask for (each only if the kernel offers it).
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
# No READDIRPLUS_AUTO: with it only a directory's first READDIR (of one page, ~25 entries) carries
# attributes, and `find`/`ls -l`/`git status` then LOOKUP every other entry, one round trip each.
# No WRITEBACK_CACHE: with it the kernel would own size and mtime and delay writes past the
# host's interception rules, and host_fs files can change under us.
WANTED = (ASYNC_READ | ATOMIC_O_TRUNC | BIG_WRITES | AUTO_INVAL_DATA | DO_READDIRPLUS | ASYNC_DIO
          | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS)  # fmt: skip
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48

GETATTR_FH = 1
FATTR_FH = 1 << 6

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")  # fuse_notify_inval_inode_out: ino, off, len (0, 0: every page)
NOTIFY_INVAL_INODE_CODE = 2  # FUSE_NOTIFY_INVAL_INODE, sent in the header's error field with unique 0
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")
ATTR_OUT = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QII")
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
RELEASE_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
ENTRY_SIZE = ENTRY_OUT.size + ATTR.size
MAX_ABSENT = 4096  # remembered ENOENTs per mount; past it they are forgotten all at once
_NS = 1_000_000_000
# The hot replies go from wire bytes to FUSE bytes in one unpack and one pack, without records.
_WIRE_ENTRY = struct.Struct(vfs.ENTRY_STRUCT.format + vfs.ATTR_STRUCT.format[1:])
_WIRE_ATTR_REPLY = struct.Struct(">Q" + vfs.ATTR_STRUCT.format[1:])
_FUSE_ENTRY = struct.Struct(ENTRY_OUT.format + ATTR.format[1:])
_WIRE_LOOKUP = struct.Struct(vfs.Lookup._fixed.format + "H")  # parent, then the name's length and bytes
_WIRE_GETATTR = vfs.Getattr._fixed
_WIRE_CREATED_SIZE = _WIRE_ENTRY.size + vfs._OPENED.size
_FUSE_ATTR_REPLY = struct.Struct(ATTR_OUT.format + ATTR.format[1:])


class Pending(Record):
    """What the reply to a forwarded request needs: the FUSE request, and its limits."""

    __slots__ = ("unique", "op", "size", "plus", "key", "source")
    unique: int
    op: int
    size: int
    plus: int
    key: tuple[int, bytes] | None  # a LOOKUP's (parent, name), to remember an ENOENT
    source: int  # a LINK's existing inode (the kernel's node id), whose cached attributes go stale
    _defaults = {"size": 0, "plus": 0, "key": None, "source": 0}


class Action(Record):
    """What to do with one FUSE request: write `reply` to /dev/fuse, send `args` to the host, send `notices`.

    Notices (FORGET, and RELEASE/RELEASEDIR answered here at once) go with request id 0 and get no reply.
    """

    __slots__ = ("reply", "args", "pending", "uid", "gid", "pid", "notices", "wire")
    reply: bytes | None
    args: vfs.Args | None
    pending: Pending | None
    uid: int
    gid: int
    pid: int
    notices: tuple[vfs.Forget | vfs.Release | vfs.Releasedir, ...]
    wire: tuple[int, bytes] | None  # instead of `args`: the wire op and its encoded payload
    _defaults = {"args": None, "pending": None, "uid": 0, "gid": 0, "pid": 0, "notices": (), "wire": None}


def out(unique: int, body: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def error(unique: int, code: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -code, unique)


def _split_ns(ns: int) -> tuple[int, int]:
    return ns // _NS, ns % _NS


def pack_attr(attr: vfs.Attr) -> bytes:
    (a, an), (m, mn), (c, cn) = _split_ns(attr.atime_ns), _split_ns(attr.mtime_ns), _split_ns(attr.ctime_ns)
    return ATTR.pack(attr.ino, attr.size, attr.blocks, a, m, c, an, mn, cn, attr.mode, attr.nlink, attr.uid,
                     attr.gid, attr.rdev, attr.blksize, 0)  # fmt: skip


def pack_entry(entry: vfs.Entry | None, negative_ns: int = 0) -> bytes:
    """fuse_entry_out; None is a negative entry (node 0), cached for `negative_ns`."""
    if entry is None:
        sec, nsec = _split_ns(negative_ns)
        return ENTRY_OUT.pack(0, 0, sec, 0, nsec, 0) + bytes(ATTR.size)
    (es, en), (as_, an) = _split_ns(entry.entry_valid_ns), _split_ns(entry.attr_valid_ns)
    return ENTRY_OUT.pack(entry.node, entry.generation, es, as_, en, an) + pack_attr(entry.attr)


def _name(raw: bytes) -> bytes | int:
    """A name from the kernel, or the errno to answer with (the host would treat a bad one as hostile)."""
    if len(raw) > vfs.MAX_NAME:
        return errno.ENAMETOOLONG
    try:
        return vfs.check_name(raw)
    except ValueError:
        return errno.EINVAL


def _cstrings(body: bytes | memoryview, count: int) -> list[bytes]:
    parts = bytes(body).split(b"\0", count)
    if len(parts) <= count:
        raise RemoteProtocolError(f"FUSE request lacks {count} NUL-terminated strings")
    return parts[:count]


class MountTranslator:
    """One FUSE connection (one mount point) and the host root node it maps to."""

    def __init__(
        self, root: int, *, max_io: int = vfs.MAX_IO, negative_valid_ns: int = 0, clock=time.monotonic_ns
    ) -> None:
        self.root = root
        self.max_io = max_io
        self.negative_valid_ns = negative_valid_ns
        self.initialized = False
        self._clock = clock
        # (parent, name) -> when the host's ENOENT for it stops being valid. The kernel keeps the
        # same as a negative dentry, but looks again anyway for O_EXCL creates and for the target
        # of mkdir, rename and link (LOOKUP_EXCL): `tar x` would pay two round trips per new file.
        # Answering those from here is as fresh as the kernel's own cache; every op that makes a
        # name drops it first.
        self._absent: dict[tuple[int, bytes], int] = {}

    def _node(self, nodeid: int) -> int:
        return self.root if nodeid == ROOT_ID else nodeid

    # ---- requests ----------------------------------------------------------------------------

    def handle(self, data: bytes | memoryview) -> Action:
        length, op, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(data, 0)
        if length != len(data):
            raise RemoteProtocolError(f"FUSE request of {len(data)} bytes says {length}")
        if op == LOOKUP:
            return self._lookup(data, unique, nodeid, uid, gid, pid)
        if op == GETATTR:
            try:
                flags, _, fh = GETATTR_IN.unpack_from(data, IN_HEADER.size)
            except struct.error:
                return Action(error(unique, errno.EINVAL))
            payload = _WIRE_GETATTR.pack(self._node(nodeid), fh if flags & GETATTR_FH else 0)
            return Action(None, None, Pending(unique, op), uid, gid, pid, (), (vfs.Op.GETATTR, payload))
        # A view, so WRITE data is not copied here (it is copied once, into the request frame).
        body = memoryview(data)[IN_HEADER.size :]
        if op in (FORGET, BATCH_FORGET):
            return Action(None, notices=self._forgets(op, nodeid, body))
        if op == INTERRUPT:
            return Action(None)  # the interrupted request still gets its reply from the host
        if op == INIT:
            return Action(self._init(unique, body))
        if op == DESTROY:
            return Action(out(unique))
        if op == LISTXATTR:
            # No provider stores xattrs: an empty list, answered here, so `tar --xattrs` and
            # `cp --preserve=all` copy none without a warning. GETXATTR and SETXATTR stay ENOSYS,
            # which the kernel remembers (EOPNOTSUPP from then on, no request on every write).
            try:
                (size, _) = GETXATTR_IN.unpack_from(data, IN_HEADER.size)
            except struct.error:
                return Action(error(unique, errno.EINVAL))
            return Action(out(unique, GETXATTR_OUT.pack(0, 0) if size == 0 else b""))
        if op in (RELEASE, RELEASEDIR):
            # The kernel ignores a release's result, so it is answered here and the host gets a
            # notice: no reply frame to wait for, decode and relay.
            try:
                fh = RELEASE_IN.unpack_from(body)[0]
            except struct.error:
                return Action(error(unique, errno.EINVAL))
            node = self._node(nodeid)
            return Action(out(unique), notices=((vfs.Release if op == RELEASE else vfs.Releasedir)(node, fh),))
        try:
            built = self._build(op, self._node(nodeid), body)
        except struct.error:
            return Action(error(unique, errno.EINVAL))
        if isinstance(built, int):
            return Action(error(unique, built))
        args, size, plus = built
        if self._absent and op in _NAMING:
            self._absent.pop(_made_name(args), None)
        source = LINK_IN.unpack_from(body)[0] if op == LINK else 0
        return Action(None, args, Pending(unique, op, size, plus, None, source), uid, gid, pid)

    def _lookup(self, data: bytes | memoryview, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Action:
        # The commonest request by far, so straight to wire bytes: each Python step is dear under emulation.
        raw = bytes(data[IN_HEADER.size :])
        end = raw.find(b"\0")
        if end < 0:
            raise RemoteProtocolError("FUSE LOOKUP lacks a NUL-terminated name")
        name = _name(raw[:end])
        if isinstance(name, int):
            return Action(error(unique, name))
        parent = self.root if nodeid == ROOT_ID else nodeid
        key = None
        if self.negative_valid_ns:
            key = (parent, name)
            expires = self._absent.get(key)
            if expires is not None:
                left = expires - self._clock()
                if left > 0:
                    return Action(out(unique, pack_entry(None, left)))
                del self._absent[key]
        payload = _WIRE_LOOKUP.pack(parent, len(name)) + name
        return Action(None, None, Pending(unique, LOOKUP, 0, 0, key), uid, gid, pid, (), (vfs.Op.LOOKUP, payload))

    def _forgets(self, op: int, nodeid: int, body: memoryview) -> tuple[vfs.Forget, ...]:
        if op == FORGET:
            items = [(nodeid, FORGET_IN.unpack_from(body)[0])]
        else:
            (count, _) = BATCH_FORGET_IN.unpack_from(body)
            end = BATCH_FORGET_IN.size + count * FORGET_ONE.size
            items = list(FORGET_ONE.iter_unpack(body[BATCH_FORGET_IN.size : end]))
        items = [(node, n) for node, n in items if node not in (0, ROOT_ID)]  # the root is never forgotten
        chunks = [items[i : i + vfs.MAX_FORGETS] for i in range(0, len(items), vfs.MAX_FORGETS)]
        return tuple(vfs.Forget(tuple(chunk)) for chunk in chunks)

    def _init(self, unique: int, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
        if major != KERNEL_MAJOR or minor < MIN_MINOR:
            return error(unique, errno.EPROTO)
        self.initialized = True
        pages = self.max_io // PAGE
        return out(
            unique,
            INIT_OUT.pack(
                KERNEL_MAJOR,
                KERNEL_MINOR,
                max_readahead,
                flags & WANTED,
                MAX_BACKGROUND,
                CONGESTION_THRESHOLD,
                self.max_io,
                1,
                pages,
                0,
                0,
            ),  # fmt: skip
        )

    def _build(self, op: int, node: int, body: memoryview) -> tuple[vfs.Args, int, int] | int:  # noqa: C901, PLR0911, PLR0912 - one branch per opcode
        """The host request for `op`, with the read size and plus flag its reply needs, or an errno."""
        mask = vfs.OPEN_FLAG_MASK
        if op == SETATTR:
            (valid, _, fh, size, _, atime, mtime, _, atimens, mtimens, _, mode, _, uid, gid, _) = (
                SETATTR_IN.unpack_from(body)
            )
            return vfs.Setattr(node, valid & vfs.SET_ALL, fh if valid & FATTR_FH else 0, size,
                               atime * _NS + atimens, mtime * _NS + mtimens, mode, uid, gid), 0, 0  # fmt: skip
        if op == READLINK:
            return vfs.Readlink(node), 0, 0
        if op == SYMLINK:
            raw_name, target = _cstrings(body, 2)
            name = _name(raw_name)
            if isinstance(name, int):
                return name
            if not target:
                return errno.ENOENT
            if len(target) > vfs.MAX_TARGET:
                return errno.ENAMETOOLONG
            return vfs.Symlink(node, name, target), 0, 0
        if op in (MKNOD, MKDIR, UNLINK, RMDIR, CREATE):
            fixed = _NAMED_FIXED.get(op)
            name = _name(_cstrings(body[fixed.size if fixed else 0 :], 1)[0])
            if isinstance(name, int):
                return name
            if op == MKNOD:
                mode, rdev, _, _ = MKNOD_IN.unpack_from(body)
                return vfs.Mknod(node, mode, rdev, name), 0, 0
            if op == MKDIR:
                return vfs.Mkdir(node, MKDIR_IN.unpack_from(body)[0], name), 0, 0
            if op == CREATE:
                flags, mode, _, _ = CREATE_IN.unpack_from(body)
                return vfs.Create(node, flags & mask, mode, name), 0, 0
            return (vfs.Unlink(node, name) if op == UNLINK else vfs.Rmdir(node, name)), 0, 0
        if op in (RENAME, RENAME2):
            if op == RENAME:
                (newdir,), flags, fixed_size = RENAME_IN.unpack_from(body), 0, RENAME_IN.size
            else:
                newdir, flags, _ = RENAME2_IN.unpack_from(body)
                fixed_size = RENAME2_IN.size
            if flags & ~(vfs.RENAME_NOREPLACE | vfs.RENAME_EXCHANGE):
                return errno.EINVAL
            old, new = (_name(n) for n in _cstrings(body[fixed_size:], 2))
            if isinstance(old, int):
                return old
            if isinstance(new, int):
                return new
            return vfs.Rename(node, self._node(newdir), flags, old, new), 0, 0
        if op == LINK:
            (old_node,) = LINK_IN.unpack_from(body)
            name = _name(_cstrings(body[LINK_IN.size :], 1)[0])
            return name if isinstance(name, int) else (vfs.Link(self._node(old_node), node, name), 0, 0)
        if op in (OPEN, OPENDIR):
            flags = OPEN_IN.unpack_from(body)[0] & mask
            return (vfs.Open(node, flags) if op == OPEN else vfs.Opendir(node, flags)), 0, 0
        if op in (READ, READDIR, READDIRPLUS):
            fh, offset, size, _, _, _, _ = READ_IN.unpack_from(body)
            size = min(size, self.max_io)
            if op == READ:
                return vfs.Read(node, fh, offset, size), size, 0
            plus = int(op == READDIRPLUS)
            return vfs.Readdir(node, fh, offset, size, plus), size, plus
        if op == WRITE:
            fh, offset, size, _, _, flags, _ = WRITE_IN.unpack_from(body)
            data = body[WRITE_IN.size : WRITE_IN.size + size]
            if len(data) != size or size > self.max_io:
                return errno.EINVAL
            return vfs.Write(node, fh, offset, flags & mask, data), size, 0
        if op == FSYNC:
            fh, fsync_flags, _ = FSYNC_IN.unpack_from(body)
            return vfs.Fsync(node, fh, fsync_flags & 1), 0, 0
        if op == STATFS:
            return vfs.Statfs(node), 0, 0
        # xattrs, locks, access, fallocate, lseek, ioctl, poll, copy_file_range, syncfs, ...: the
        # kernel remembers ENOSYS and falls back (or reports EOPNOTSUPP) without asking again.
        # FLUSH too: writes reach the host before write(2) returns (no writeback cache), so a
        # flush has nothing to do, and answering ENOSYS once saves a round trip on every close.
        return errno.ENOSYS

    # ---- replies -----------------------------------------------------------------------------

    @staticmethod
    def after_reply(pending: Pending, status: int) -> bytes | None:
        """A notice to write after the reply. After a LINK the new name is a new guest inode (nodes are
        names on the host), and the kernel keeps the old name's attributes (one link, its size) cached:
        drop them and its pages, so it asks again and learns it is linked (never cached from then on)."""
        if pending.op != LINK or status < 0 or not pending.source:
            return None
        body = NOTIFY_INVAL_INODE.pack(pending.source, 0, 0)
        return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE_CODE, 0) + body

    def complete(self, pending: Pending, status: int, payload: bytes) -> tuple[list[bytes], vfs.Forget | None]:
        """The /dev/fuse reply (as buffers for one writev) and any lookups to give back to the host."""
        unique, op = pending.unique, pending.op
        if status < 0:
            if status == -errno.ENOENT and op == LOOKUP and self.negative_valid_ns:
                if pending.key is not None:
                    if len(self._absent) >= MAX_ABSENT:
                        self._absent.clear()
                    self._absent[pending.key] = self._clock() + self.negative_valid_ns
                return [out(unique, pack_entry(None, self.negative_valid_ns))], None
            return [error(unique, -status)], None
        if op in _ENTRY_REPLIES and len(payload) == _WIRE_ENTRY.size:
            return [out(unique, _fast_entry(payload))], None
        if op in _ATTR_REPLIES and len(payload) == _WIRE_ATTR_REPLY.size:
            return [out(unique, _fast_attr_reply(payload))], None
        if op == CREATE and len(payload) == _WIRE_CREATED_SIZE:
            fh, flags = vfs._OPENED.unpack_from(payload, _WIRE_ENTRY.size)
            opened = OPEN_OUT.pack(fh, flags & vfs.OPEN_FLAGS_ALL, 0)
            return [out(unique, _fast_entry(payload[: _WIRE_ENTRY.size]) + opened)], None
        result = vfs.decode_result(_WIRE_OP[op], payload)
        if isinstance(result, vfs.Entry):
            return [out(unique, pack_entry(result))], None
        if isinstance(result, vfs.AttrReply):
            sec, nsec = _split_ns(result.attr_valid_ns)
            return [out(unique, ATTR_OUT.pack(sec, nsec, 0) + pack_attr(result.attr))], None
        if isinstance(result, vfs.Opened):
            return [out(unique, OPEN_OUT.pack(result.fh, result.flags & vfs.OPEN_FLAGS_ALL, 0))], None
        if isinstance(result, vfs.Created):
            body = pack_entry(result.entry) + OPEN_OUT.pack(result.fh, result.flags & vfs.OPEN_FLAGS_ALL, 0)
            return [out(unique, body)], None
        if isinstance(result, vfs.Written):
            if result.size > pending.size:
                raise RemoteProtocolError(f"host wrote {result.size} of {pending.size} bytes")
            return [out(unique, WRITE_OUT.pack(result.size, 0))], None
        if isinstance(result, vfs.StatfsReply):
            r = result
            body = STATFS_OUT.pack(r.blocks, r.bfree, r.bavail, r.files, r.ffree, r.bsize, r.namelen, r.frsize, 0)
            return [out(unique, body)], None
        if isinstance(result, tuple):
            return self._dirents(pending, result)
        if isinstance(result, bytes):
            if op == READ and len(result) > pending.size:
                raise RemoteProtocolError(f"host returned {len(result)} bytes for a {pending.size}-byte READ")
            return [OUT_HEADER.pack(OUT_HEADER.size + len(result), 0, unique), result], None
        return [out(unique)], None

    def _dirents(self, pending: Pending, entries: tuple) -> tuple[list[bytes], vfs.Forget | None]:
        parts: list[bytes] = []
        used = 0
        unused: list[tuple[int, int]] = []
        full = False
        for item in entries:
            entry = item.entry
            if item.name in (b".", b"..") or not pending.plus:
                if entry is not None:
                    unused.append((entry.node, 1))
                entry = None
            size = vfs.dirent_size(len(item.name), bool(pending.plus))
            if full or used + size > pending.size:
                full = True
                if entry is not None:
                    unused.append((entry.node, 1))
                continue
            pad = size - (ENTRY_SIZE if pending.plus else 0) - DIRENT.size - len(item.name)
            dirent = DIRENT.pack(item.ino, item.offset, len(item.name), item.type) + item.name + bytes(pad)
            parts.append(pack_entry(entry) + dirent if pending.plus else dirent)
            used += size
        body = b"".join(parts)
        forget = vfs.Forget(tuple(unused[: vfs.MAX_FORGETS])) if unused else None
        return [out(pending.unique, body)], forget


def _fast_entry(payload: bytes) -> bytes:
    node, gen, ev, av, ino, size, blocks, at, mt, ct, mode, nlink, uid, gid, rdev, blksize = _WIRE_ENTRY.unpack(payload)
    if node in (0, ROOT_ID):
        raise RemoteProtocolError(f"entry with reserved node id {node}")
    return _FUSE_ENTRY.pack(node, gen, ev // _NS, av // _NS, ev % _NS, av % _NS, ino, size, blocks, at // _NS,
                            mt // _NS, ct // _NS, at % _NS, mt % _NS, ct % _NS, mode, nlink, uid, gid, rdev, blksize, 0)  # fmt: skip


def _fast_attr_reply(payload: bytes) -> bytes:
    av, ino, size, blocks, at, mt, ct, mode, nlink, uid, gid, rdev, blksize = _WIRE_ATTR_REPLY.unpack(payload)
    return _FUSE_ATTR_REPLY.pack(av // _NS, av % _NS, 0, ino, size, blocks, at // _NS, mt // _NS, ct // _NS, at % _NS,
                                 mt % _NS, ct % _NS, mode, nlink, uid, gid, rdev, blksize, 0)  # fmt: skip


def _made_name(args: vfs.Args) -> tuple[int, bytes]:
    """The (directory, name) an op in _NAMING may bring into being."""
    if isinstance(args, (vfs.Rename, vfs.Link)):
        return args.newparent, args.newname
    assert isinstance(args, (vfs.Create, vfs.Mknod, vfs.Mkdir, vfs.Symlink))
    return args.parent, args.name


_NAMING = frozenset((CREATE, MKNOD, MKDIR, SYMLINK, LINK, RENAME, RENAME2))
_NAMED_FIXED = {MKNOD: MKNOD_IN, MKDIR: MKDIR_IN, CREATE: CREATE_IN}  # the fixed part before the name
_ENTRY_REPLIES = frozenset((LOOKUP, MKNOD, MKDIR, SYMLINK, LINK))
_ATTR_REPLIES = frozenset((GETATTR, SETATTR))
_WIRE_OP = {
    LOOKUP: vfs.Op.LOOKUP, GETATTR: vfs.Op.GETATTR, SETATTR: vfs.Op.SETATTR, READLINK: vfs.Op.READLINK,
    SYMLINK: vfs.Op.SYMLINK, MKNOD: vfs.Op.MKNOD, MKDIR: vfs.Op.MKDIR, UNLINK: vfs.Op.UNLINK, RMDIR: vfs.Op.RMDIR,
    RENAME: vfs.Op.RENAME, RENAME2: vfs.Op.RENAME, LINK: vfs.Op.LINK, OPEN: vfs.Op.OPEN, CREATE: vfs.Op.CREATE,
    READ: vfs.Op.READ, WRITE: vfs.Op.WRITE, FSYNC: vfs.Op.FSYNC,
    OPENDIR: vfs.Op.OPENDIR, READDIR: vfs.Op.READDIR, READDIRPLUS: vfs.Op.READDIR,
    STATFS: vfs.Op.STATFS,
}  # fmt: skip
