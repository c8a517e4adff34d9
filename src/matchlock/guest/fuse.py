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
from ..wire.frames import RemoteProtocolError
from . import fuse_prefetch
from .fuse_actions import Action, Pending
from .fuse_cache import MetaCache
from .fuse_dirs import DIRENT, FH, LOCAL_FH, GuestDirs, dirents  # noqa: F401 - DIRENT: the tests use fuse.DIRENT
from .fuse_out import (  # noqa: F401 - re-exported: the daemon and the tests use them as fuse.*
    ATTR,
    ATTR_OUT,
    ENTRY_OUT,
    ENTRY_SIZE,
    NOTIFY_INVAL_ENTRY,
    NOTIFY_INVAL_ENTRY_CODE,
    NOTIFY_INVAL_INODE,
    NOTIFY_INVAL_INODE_CODE,
    NS,
    OUT_HEADER,
    ROOT_ID,
    WIRE_ATTR_REPLY,
    WIRE_ENTRY,
    error,
    fast_attr_reply,
    fast_entry,
    inval_entry_notice,
    inval_inode_notice,
    out,
    pack_attr,
    pack_entry,
    split_ns,
)

KERNEL_MAJOR = 7
KERNEL_MINOR = 38
MIN_MINOR = 28  # max_pages
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
HANDLE_KILLPRIV_V2 = 1 << 28  # only if the host drops set-id bits itself (FEATURE_KILLPRIV): then a
# chown needs no GETATTR first, as the kernel would otherwise send to recompute the mode
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
WRITE_KILL_SUIDGID = 1 << 2  # fuse_write_in.write_flags
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in/fuse_create_in.open_flags

IN_HEADER = struct.Struct("<IIQQIIIHH")
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
OPEN_OUT = struct.Struct("<QII")
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
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
MAX_ABSENT = 4096  # remembered ENOENTs per mount; past it they are forgotten all at once
# The hot requests go straight to wire bytes (see fuse_out for the replies).
_WIRE_LOOKUP = struct.Struct(vfs.Lookup._fixed.format + "H")  # parent, then the name's length and bytes
_WIRE_GETATTR = vfs.Getattr._fixed
_WIRE_SETATTR = vfs.Setattr._fixed
_WIRE_WRITE = vfs.Write._fixed  # then the data
_WIRE_CREATE = struct.Struct(vfs.Create._fixed.format + "H")  # then the name
_SETATTR_IN_SIGNED = struct.Struct("<IIQQQqqqIIIIIIII")  # SETATTR_IN with the times signed (before 1970)
_WIRE_CREATED_SIZE = WIRE_ENTRY.size + vfs._OPENED.size


def _name(raw: bytes) -> bytes | int:
    """A name from the kernel, or the errno to answer with (the host would treat a bad one as hostile)."""
    if len(raw) > vfs.MAX_NAME:
        return errno.ENAMETOOLONG
    try:
        return vfs.check_name(raw)
    except ValueError:
        return errno.EINVAL


def _name_at(data: bytes | memoryview, start: int, what: str) -> bytes | int:
    """The NUL-terminated name at `start` of a `what` request, as `_name` checks it."""
    raw = bytes(data[start:])
    end = raw.find(b"\0")
    if end < 0:
        raise RemoteProtocolError(f"FUSE {what} lacks a NUL-terminated name")
    return _name(raw[:end])


def _cstrings(body: bytes | memoryview, count: int) -> list[bytes]:
    parts = bytes(body).split(b"\0", count)
    if len(parts) <= count:
        raise RemoteProtocolError(f"FUSE request lacks {count} NUL-terminated strings")
    return parts[:count]


class MountTranslator:
    """One FUSE connection (one mount point) and the host root node it maps to."""

    def __init__(
        self,
        root: int,
        *,
        max_io: int = vfs.MAX_IO,
        negative_valid_ns: int = 0,
        clock=time.monotonic_ns,
        features: int = 0,
    ) -> None:
        self.root = root
        self.features = features  # the host's HELLO features
        self.cache = MetaCache(clock)
        self.dirs = GuestDirs()
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

    def drop_absent(self, parent: int, name: bytes) -> None:
        """The host says `name` in `parent` (a host node id) changed: forget a remembered ENOENT for it."""
        self._absent.pop((parent, name), None)
        self.cache.drop_name(parent, name)

    def drop_node(self, node: int) -> None:
        """The host says `node` changed: forget its attributes and any leave to open it here (called in
        port order by the reply thread, so a reply behind the notice is not kept: fuse_daemon.Notices)."""
        self.cache.drop_node(node)
        self.dirs.noticed(node)

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
            node = self._node(nodeid)
            hit = self.cache.getattr(node)
            if hit is not None:
                return Action(out(unique, hit))
            payload = _WIRE_GETATTR.pack(node, fh if flags & GETATTR_FH else 0)
            pending = Pending(unique, op, 0, 0, None, 0, node, self.cache.stamp())
            return Action(None, None, pending, uid, gid, pid, (), (vfs.Op.GETATTR, payload))
        if op in _FAST:
            return _FAST[op](self, data, unique, self._node(nodeid), uid, gid, pid)
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
        if op in (READDIR, READDIRPLUS, RELEASEDIR) and len(body) >= FH.size:
            if (fh := FH.unpack_from(body)[0]) & LOCAL_FH:
                return self._local_dir(op, unique, fh, body, uid, gid, pid)
        if op == OPENDIR and (local := self.dirs.open(self._node(nodeid))) is not None:
            return Action(out(unique, OPEN_OUT.pack(*local, 0)))
        if op in (RELEASE, RELEASEDIR):
            # The kernel ignores a release's result, so it is answered here and the host gets a
            # notice: no reply frame to wait for, decode and relay.
            try:
                fh = RELEASE_IN.unpack_from(body)[0]
            except struct.error:
                return Action(error(unique, errno.EINVAL))
            node = self._node(nodeid)
            return Action(out(unique), notices=((vfs.Release if op == RELEASE else vfs.Releasedir)(node, fh),))
        node = self._node(nodeid)
        try:
            built = self._build(op, node, body)
        except struct.error:
            return Action(error(unique, errno.EINVAL))
        if isinstance(built, int):
            return Action(error(unique, built))
        args, size, plus = built
        key = None
        if op in _NAMING:
            key = _made_name(args)
            self._absent.pop(key, None)
            self.cache.naming(*key)
        source = LINK_IN.unpack_from(body)[0] if op == LINK else 0
        changes = self._changes(args)
        gen = self.cache.begin(changes) if changes else self.cache.stamp()
        return Action(None, args, Pending(unique, op, size, plus, key, source, node, gen, changes), uid, gid, pid)

    def _local_dir(self, op: int, unique: int, fh: int, body: memoryview, uid: int, gid: int, pid: int) -> Action:
        """READDIR[PLUS] or RELEASEDIR on our handle `fh` (fuse_dirs)."""
        if op == RELEASEDIR:
            host = self.dirs.release(fh)
            return Action(out(unique), notices=() if host is None else (vfs.Releasedir(*host),))
        held = self.dirs.host(fh)
        try:
            _, offset, size, _, _, _, _ = READ_IN.unpack_from(body)
        except struct.error:
            return Action(error(unique, errno.EINVAL))
        if held is None:
            return Action(error(unique, errno.EBADF))
        node, host_fh = held
        size, plus = min(size, self.max_io), int(op == READDIRPLUS)
        if host_fh:
            args: vfs.Args = vfs.Readdir(node, host_fh, offset, size, plus)
        elif self.dirs.granted(node) and (page := self.cache.listed_dir(node, offset, size, plus)) is not None:
            return Action(out(unique, page))  # from the directory's LOOKUP_DIR listing, still fresh
        else:  # the first read that misses the kernel's cache: the host opens its handle for it
            args = vfs.OpendirRead(node, offset, size, plus)
        return Action(None, args, Pending(unique, op, size, plus, node=node, fh=0 if host_fh else fh), uid, gid, pid)

    def _changes(self, args: vfs.Args) -> tuple[int, ...]:
        """The nodes whose cached attributes `args` makes stale; names it removes are dropped here."""
        if isinstance(args, vfs.Open):
            return (args.node,) if args.flags & 0o1000 else ()  # O_TRUNC
        if isinstance(args, (vfs.Mknod, vfs.Mkdir, vfs.Symlink)):
            return (args.parent,)
        if isinstance(args, vfs.Link):
            return (args.node, args.newparent)
        if isinstance(args, (vfs.Unlink, vfs.Rmdir, vfs.Rename)):
            # The removed (or replaced) node's nlink and ctime change too: if this cache does not know
            # which node a name is, it forgets everything rather than keep a stale nlink.
            names = [(args.parent, args.name)]
            if isinstance(args, vfs.Rename):
                names.append((args.newparent, args.newname))
            if not all(self.cache.drop_name(p, n) for p, n in names):
                self.cache.drop_all()
            return (args.parent, args.newparent) if isinstance(args, vfs.Rename) else (args.parent,)
        return ()

    def _lookup(self, data: bytes | memoryview, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> Action:
        # The commonest request by far, so straight to wire bytes: each Python step is dear under emulation.
        name = _name_at(data, IN_HEADER.size, "LOOKUP")
        if isinstance(name, int):
            return Action(error(unique, name))
        parent = self.root if nodeid == ROOT_ID else nodeid
        key = (parent, name)
        if self.negative_valid_ns:
            expires = self._absent.get(key)
            if expires is not None:
                left = expires - self._clock()
                if left > 0:
                    return Action(out(unique, pack_entry(None, left)))
                self._absent.pop(key, None)  # not `del`: the reply thread may have dropped it meanwhile
        # Lookups held for listings whose entries left the cache go back with the next LOOKUP (fuse_prefetch).
        forgets = () if not self.cache.owing or (held := self.cache.take_forget()) is None else (held,)
        hit = self.cache.lookup(parent, name)
        if hit is not None:
            return Action(out(unique, hit), notices=forgets)
        if self.negative_valid_ns and (left := self.cache.absent(parent, name)):
            return Action(out(unique, pack_entry(None, min(left, self.negative_valid_ns))), notices=forgets)
        payload = _WIRE_LOOKUP.pack(parent, len(name)) + name
        # LOOKUP_DIR has the same fields; plus=1 marks its reply for `complete` (fuse_prefetch).
        plus = self.features & vfs.FEATURE_LOOKUP_DIR and self.negative_valid_ns and self.cache.want_listing(parent)
        pending = Pending(unique, LOOKUP, 0, int(bool(plus)), key, 0, 0, self.cache.stamp())
        wire = (vfs.Op.LOOKUP_DIR if plus else vfs.Op.LOOKUP, payload)
        return Action(None, None, pending, uid, gid, pid, forgets, wire)

    # `tar x` sends CREATE, WRITE and three SETATTRs per file: straight to wire bytes, as LOOKUP.

    def _setattr(self, data: bytes | memoryview, unique: int, node: int, uid: int, gid: int, pid: int) -> Action:
        try:
            valid, _, fh, size, _, atime, mtime, _, atimens, mtimens, _, mode, _, owner, group, _ = (
                _SETATTR_IN_SIGNED.unpack_from(data, IN_HEADER.size)
            )
            payload = _WIRE_SETATTR.pack(node, valid & vfs.SET_ALL, fh if valid & FATTR_FH else 0, size,
                                         atime * NS + atimens, mtime * NS + mtimens, mode, owner, group)  # fmt: skip
        except struct.error:  # short, or a time past the wire's range
            return Action(error(unique, errno.EINVAL))
        if self.features & vfs.FEATURE_SETATTR_NOTICE:  # tar's futimens, fchown and fchmod (fuse_cache)
            hit = self.cache.predict_setattr(node, valid & vfs.SET_ALL, mode, owner, group, time.time_ns(),
                                             atime * NS + atimens, mtime * NS + mtimens)  # fmt: skip
            if hit is not None:  # the host still makes the change (its ctime): a notice, before the reply
                return Action(out(unique, hit), None, None, uid, gid, pid, (), (vfs.Op.SETATTR, payload))
        changes = (node,)
        pending = Pending(unique, SETATTR, 0, 0, None, 0, node, self.cache.begin(changes), changes)
        return Action(None, None, pending, uid, gid, pid, (), (vfs.Op.SETATTR, payload))

    def _write(self, data: bytes | memoryview, unique: int, node: int, uid: int, gid: int, pid: int) -> Action:
        try:
            fh, offset, size, write_flags, _, flags, _ = WRITE_IN.unpack_from(data, IN_HEADER.size)
            kill = vfs.KILL_SUIDGID if write_flags & WRITE_KILL_SUIDGID else 0
            fixed = _WIRE_WRITE.pack(node, fh, offset, flags & vfs.OPEN_FLAG_MASK | kill)
        except struct.error:
            return Action(error(unique, errno.EINVAL))
        start = IN_HEADER.size + WRITE_IN.size
        if start + size > len(data) or size > self.max_io:
            return Action(error(unique, errno.EINVAL))
        changes = (node,)
        pending = Pending(unique, WRITE, size, 0, None, 0, node, self.cache.begin(changes), changes)
        # A view of the FUSE buffer: the data is copied once, into the request frame.
        wire = (vfs.Op.WRITE, (fixed, memoryview(data)[start : start + size]))
        return Action(None, None, pending, uid, gid, pid, (), wire)

    def _create(self, data: bytes | memoryview, unique: int, parent: int, uid: int, gid: int, pid: int) -> Action:
        try:
            flags, mode, _, open_flags = CREATE_IN.unpack_from(data, IN_HEADER.size)
        except struct.error:
            return Action(error(unique, errno.EINVAL))
        name = _name_at(data, IN_HEADER.size + CREATE_IN.size, "CREATE")
        if isinstance(name, int):
            return Action(error(unique, name))
        key = (parent, name)
        self._absent.pop(key, None)
        self.cache.naming(parent, name)
        kill = vfs.KILL_SUIDGID if open_flags & OPEN_KILL_SUIDGID else 0
        payload = _WIRE_CREATE.pack(parent, flags & vfs.OPEN_FLAG_MASK | kill, mode, len(name)) + name
        changes = (parent,)
        pending = Pending(unique, CREATE, 0, 0, key, 0, 0, self.cache.begin(changes), changes)
        return Action(None, None, pending, uid, gid, pid, (), (vfs.Op.CREATE, payload))

    def _forgets(self, op: int, nodeid: int, body: memoryview) -> tuple[vfs.Forget, ...]:
        if op == FORGET:
            items = [(nodeid, FORGET_IN.unpack_from(body)[0])]
        else:
            (count, _) = BATCH_FORGET_IN.unpack_from(body)
            end = BATCH_FORGET_IN.size + count * FORGET_ONE.size
            items = list(FORGET_ONE.iter_unpack(body[BATCH_FORGET_IN.size : end]))
        # The root is never forgotten; lookups answered from the cache are not the host's to give back.
        items = [(node, n) for node, n in items if node not in (0, ROOT_ID)]
        for node, _ in items:
            self.dirs.drop(node)
        items = [(node, n) for node, n in ((node, self.cache.forget(node, n)) for node, n in items) if n]
        chunks = [items[i : i + vfs.MAX_FORGETS] for i in range(0, len(items), vfs.MAX_FORGETS)]
        return tuple(vfs.Forget(tuple(chunk)) for chunk in chunks)

    def _init(self, unique: int, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
        if major != KERNEL_MAJOR or minor < MIN_MINOR:
            return error(unique, errno.EPROTO)
        self.initialized = True
        pages = self.max_io // PAGE
        wanted = WANTED | (HANDLE_KILLPRIV_V2 if self.features & vfs.FEATURE_KILLPRIV else 0)
        return out(unique, INIT_OUT.pack(KERNEL_MAJOR, KERNEL_MINOR, max_readahead, flags & wanted, MAX_BACKGROUND,
                                         CONGESTION_THRESHOLD, self.max_io, 1, pages, 0, 0))  # fmt: skip

    def _build(self, op: int, node: int, body: memoryview) -> tuple[vfs.Args, int, int] | int:  # noqa: C901, PLR0911, PLR0912 - one branch per opcode
        """The host request for `op`, with the read size and plus flag its reply needs, or an errno."""
        mask = vfs.OPEN_FLAG_MASK
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
        if op in (MKNOD, MKDIR, UNLINK, RMDIR):
            fixed = _NAMED_FIXED.get(op)
            name = _name(_cstrings(body[fixed.size if fixed else 0 :], 1)[0])
            if isinstance(name, int):
                return name
            if op == MKNOD:
                mode, rdev, _, _ = MKNOD_IN.unpack_from(body)
                return vfs.Mknod(node, mode, rdev, name), 0, 0
            if op == MKDIR:
                return vfs.Mkdir(node, MKDIR_IN.unpack_from(body)[0], name), 0, 0
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
            flags, open_flags = OPEN_IN.unpack_from(body)
            if op == OPENDIR:
                return vfs.Opendir(node, flags & mask), 0, 0
            return vfs.Open(node, flags & mask | (vfs.KILL_SUIDGID if open_flags & OPEN_KILL_SUIDGID else 0)), 0, 0
        if op in (READ, READDIR, READDIRPLUS):
            fh, offset, size, _, _, _, _ = READ_IN.unpack_from(body)
            size = min(size, self.max_io)
            if op == READ:
                return vfs.Read(node, fh, offset, size), size, 0
            plus = int(op == READDIRPLUS)
            return vfs.Readdir(node, fh, offset, size, plus), size, plus
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
        return inval_inode_notice(pending.source)

    def complete(
        self, pending: Pending, status: int, payload: bytes
    ) -> tuple[list[bytes], vfs.Forget | vfs.Releasedir | None]:
        """The /dev/fuse reply (as buffers for one writev), and lookups or a handle to give back to the host."""
        unique, op = pending.unique, pending.op
        if op == LOOKUP and pending.plus:  # sent as LOOKUP_DIR
            return fuse_prefetch.listed(self, pending, status, payload)
        alone = self.cache.end(pending.changes, pending.gen) if pending.changes else False
        if status < 0:
            key = pending.key  # an ENOENT is cached only if its directory did not change since it was asked
            if status == -errno.ENOENT and op == LOOKUP and self.negative_valid_ns:
                if key is None or self.cache.fresh(key[0], pending.gen):
                    if key is not None:
                        if len(self._absent) >= MAX_ABSENT:
                            self._absent.clear()
                        self._absent[key] = self._clock() + self.negative_valid_ns
                    return [out(unique, pack_entry(None, self.negative_valid_ns))], None
            if pending.fh:  # an OPENDIR_READ refused (e.g. the directory is gone): ask the host from now on
                self.dirs.noticed(pending.node)  # as a notice: a later one still refuses reads opened before it
            return [error(unique, -status)], None
        if op in _PARENT_REPLIES and len(payload) == _WITH_PARENT_SIZE[op == CREATE]:
            # FEATURE_PARENT_ATTR: the directory's attributes after the change, for the cache.
            cut = len(payload) - vfs.PARENT_STRUCT.size
            if pending.key is not None:
                self.cache.store_attr(pending.key[0], fast_attr_reply(payload[cut:]), pending.gen, alone)
            payload = payload[:cut]
        elif op == WRITE and len(payload) == _WRITTEN_WITH_ATTR:  # FEATURE_WRITE_ATTR: the file's new attributes
            self.cache.store_attr(pending.node, fast_attr_reply(payload[4:]), pending.gen, alone)
            payload = payload[:4]
        if op in _ENTRY_REPLIES and len(payload) == WIRE_ENTRY.size:
            body = fast_entry(payload)
            if pending.key is not None:
                self.cache.store_entry(pending.key[0], pending.key[1], body, pending.gen, alone)
            if op == MKDIR and self.negative_valid_ns:
                self.cache.made_dir(ENTRY_OUT.unpack_from(body)[0], self.negative_valid_ns)
            return [out(unique, body)], None
        if op in _ATTR_REPLIES and len(payload) == WIRE_ATTR_REPLY.size:
            body = fast_attr_reply(payload)
            self.cache.store_attr(pending.node, body, pending.gen, alone)
            return [out(unique, body)], None
        if pending.fh:
            opened = vfs.decode_result(vfs.Op.OPENDIR_READ, payload)
            assert isinstance(opened, vfs.DirOpened)
            self.dirs.learned(pending.node, opened.fh, opened.flags, pending.fh)
            body, forget = dirents(unique, pending.size, pending.plus, opened.entries)
            if not self.dirs.opened(pending.fh, opened.fh):  # closed meanwhile (an interrupted read)
                return [body], vfs.Releasedir(pending.node, opened.fh)
            return [body], forget
        if op == CREATE and len(payload) == _WIRE_CREATED_SIZE:
            fh, flags = vfs._OPENED.unpack_from(payload, WIRE_ENTRY.size)
            opened = OPEN_OUT.pack(fh, flags & vfs.OPEN_FLAGS_ALL, 0)
            body = fast_entry(payload[: WIRE_ENTRY.size])
            if pending.key is not None:
                self.cache.store_entry(pending.key[0], pending.key[1], body, pending.gen, alone)
            return [out(unique, body + opened)], None
        result = vfs.decode_result(_WIRE_OP[op], payload)
        if isinstance(result, vfs.Entry):
            return [out(unique, pack_entry(result))], None
        if isinstance(result, vfs.AttrReply):
            sec, nsec = split_ns(result.attr_valid_ns)
            return [out(unique, ATTR_OUT.pack(sec, nsec, 0) + pack_attr(result.attr))], None
        if isinstance(result, vfs.Opened):
            if op == OPENDIR:
                flags = self.dirs.learned(pending.node, result.fh, result.flags)
            else:
                flags = result.flags & vfs.OPEN_FLAGS_ALL
            return [out(unique, OPEN_OUT.pack(result.fh, flags, 0))], None
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
            body, forget = dirents(unique, pending.size, pending.plus, result)
            return [body], forget
        if isinstance(result, bytes):
            if op == READ and len(result) > pending.size:
                raise RemoteProtocolError(f"host returned {len(result)} bytes for a {pending.size}-byte READ")
            return [OUT_HEADER.pack(OUT_HEADER.size + len(result), 0, unique), result], None
        return [out(unique)], None

    def reset_for_new_host(self) -> list[vfs.Forget]:
        """A restored clone's new host took over (fuse_daemon, at the wake): drop every answer kept from
        the old one; the FORGETs give the lookups held for listings back to the new host."""
        self._absent.clear()
        self.cache.drop_host()
        self.dirs.drop_all()  # the leaves to open directories here
        return list(iter(self.cache.take_forget, None))


def _made_name(args: vfs.Args) -> tuple[int, bytes]:
    """The (directory, name) an op in _NAMING may bring into being."""
    if isinstance(args, (vfs.Rename, vfs.Link)):
        return args.newparent, args.newname
    assert isinstance(args, (vfs.Create, vfs.Mknod, vfs.Mkdir, vfs.Symlink))
    return args.parent, args.name


_FAST = {SETATTR: MountTranslator._setattr, WRITE: MountTranslator._write, CREATE: MountTranslator._create}
_NAMING = frozenset((CREATE, MKNOD, MKDIR, SYMLINK, LINK, RENAME, RENAME2))
_NAMED_FIXED = {MKNOD: MKNOD_IN, MKDIR: MKDIR_IN}  # the fixed part before the name
_ENTRY_REPLIES = frozenset((LOOKUP, MKNOD, MKDIR, SYMLINK, LINK))
_ATTR_REPLIES = frozenset((GETATTR, SETATTR))
_PARENT_REPLIES = frozenset((MKNOD, MKDIR, SYMLINK, LINK, CREATE))
_WITH_PARENT_SIZE = (WIRE_ENTRY.size + vfs.PARENT_STRUCT.size, _WIRE_CREATED_SIZE + vfs.PARENT_STRUCT.size)
_WRITTEN_WITH_ATTR = 4 + vfs.PARENT_STRUCT.size  # Written (u32 size), then an AttrReply
_WIRE_OP = {
    LOOKUP: vfs.Op.LOOKUP, GETATTR: vfs.Op.GETATTR, SETATTR: vfs.Op.SETATTR, READLINK: vfs.Op.READLINK,
    SYMLINK: vfs.Op.SYMLINK, MKNOD: vfs.Op.MKNOD, MKDIR: vfs.Op.MKDIR, UNLINK: vfs.Op.UNLINK, RMDIR: vfs.Op.RMDIR,
    RENAME: vfs.Op.RENAME, RENAME2: vfs.Op.RENAME, LINK: vfs.Op.LINK, OPEN: vfs.Op.OPEN, CREATE: vfs.Op.CREATE,
    READ: vfs.Op.READ, WRITE: vfs.Op.WRITE, FSYNC: vfs.Op.FSYNC,
    OPENDIR: vfs.Op.OPENDIR, READDIR: vfs.Op.READDIR, READDIRPLUS: vfs.Op.READDIR,
    STATFS: vfs.Op.STATFS,
}  # fmt: skip
