"""The VFS channel: file requests from the guest's FUSE daemon to the host (sans-IO, stdlib only).

It runs on its own virtio-serial port (`VFS_PORT_NAME`), so file traffic never queues behind exec
streams. The guest sends requests, the host answers each one (except FORGET, and RELEASE,
RELEASEDIR or SETATTR sent with id 0); many requests are in flight at once and replies may come in any order,
matched by request id.

    request: length u32 | id u32 | op u8  | uid u32 | gid u32 | pid u32 | payload
    reply:   length u32 | id u32 | status i32 | payload

`length` counts the payload only. Payloads are fixed big-endian structs, optionally followed by
names (u16 length + bytes), a symlink target (same), or raw file data (the rest of the payload):
file data is never JSON or base64. Only HELLO is JSON. A reply's status is 0 or a negative Linux
errno; an error reply has no payload.

Nodes and handles are the host's: it assigns a node id (u64, never 0 or 1) in every entry it
returns (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK, CREATE, READDIR with `plus`), counting one lookup for
each; FORGET gives lookups back. Each mount's root node comes in the HELLO reply. File handles
(u64, never 0) come from OPEN, CREATE, OPENDIR and OPENDIR_READ; fh 0 in GETATTR and SETATTR means
"no handle".

The host must treat the guest as hostile, so `RequestDecoder` checks every length, count, id and
name before the host sees a request and raises RemoteProtocolError on the first violation. A
request with an op this version does not know decodes with `args=None`; answer it with ENOSYS.
"""

from __future__ import annotations

import operator
import struct

from .checkpoint import WAKE_MAGIC, WAKE_RECORD_SIZE
from .frames import LocalProtocolError, RemoteProtocolError
from .vfs_hello import decode_hello, decode_hello_reply, encode_hello, encode_hello_reply
from .vfs_records import (  # noqa: F401 - re-exported: `wire.vfs` is the one name both sides import
    _DATA,
    _DIRENT,
    _FORGETS,
    _NAME,
    _NODE_FIELDS,
    _OPENED,
    _STATFS,
    ARGS,
    ATTR_STRUCT,
    ENTRY_STRUCT,
    FEATURE_GUEST_OPENDIR,
    FEATURE_KILLPRIV,
    FEATURE_LOOKUP_DIR,
    FEATURE_PARENT_ATTR,
    FEATURE_SETATTR_NOTICE,
    FEATURE_WRITE_ATTR,
    FEATURES_ALL,
    KILL_SUIDGID,
    MAX_FORGETS,
    MAX_HELLO,
    MAX_ID,
    MAX_IO,
    MAX_LISTED,
    MAX_MOUNTS,
    MAX_NAME,
    MAX_PAYLOAD,
    MAX_TARGET,
    OP_NAMES,
    OPEN_CACHE_DIR,
    OPEN_DIRECT_IO,
    OPEN_FLAG_MASK,
    OPEN_FLAGS_ALL,
    OPEN_GUEST_DIR,
    OPEN_KEEP_CACHE,
    PARENT_STRUCT,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_ALIAS,
    SET_ALL,
    SET_ATIME,
    SET_ATIME_NOW,
    SET_CTIME,
    SET_GID,
    SET_KILL_SUIDGID,
    SET_MODE,
    SET_MTIME,
    SET_MTIME_NOW,
    SET_SIZE,
    SET_UID,
    VERSION,
    Args,
    Attr,
    AttrReply,
    Create,
    Created,
    DirEntry,
    DirOpened,
    Entry,
    Flush,
    Forget,
    Fsync,
    Getattr,
    Hello,
    HelloReply,
    Link,
    Listed,
    Lookup,
    LookupDir,
    Mkdir,
    Mknod,
    Mount,
    Op,
    Open,
    Opendir,
    OpendirRead,
    Opened,
    Parked,
    Read,
    Readdir,
    Readlink,
    Release,
    Releasedir,
    Rename,
    Reply,
    Request,
    Result,
    Rmdir,
    Setattr,
    Statfs,
    StatfsReply,
    Symlink,
    Unlink,
    Write,
    Written,
    check_name,
    check_target,
    dirent_size,
)

TYPE_CHECKING = False  # not `typing`'s: the guest pays for every import under emulation
if TYPE_CHECKING:
    from collections.abc import Callable

REQUEST_HEADER = struct.Struct(">IIBIII")
REPLY_HEADER = struct.Struct(">IIi")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_FORGET = struct.Struct(">QQ")
_NOT_LISTED, _LISTED = b"\x00", b"\x01"  # LOOKUP_DIR's reply: an entry, or a listing


# Which reply each op gets.
_ENTRY_OPS = (Op.LOOKUP, Op.MKNOD, Op.MKDIR, Op.SYMLINK, Op.LINK)
_ATTR_OPS = (Op.GETATTR, Op.SETATTR)
PARENT_OPS = frozenset((Op.MKNOD, Op.MKDIR, Op.SYMLINK, Op.LINK, Op.CREATE))  # FEATURE_PARENT_ATTR
# May come with id 0: no reply (SETATTR only with FEATURE_SETATTR_NOTICE, which the host checks).
NOTICE_OPS = frozenset((Op.FORGET, Op.RELEASE, Op.RELEASEDIR, Op.PARKED, Op.SETATTR))
_EMPTY_OPS = (Op.UNLINK, Op.RMDIR, Op.RENAME, Op.FLUSH, Op.RELEASE, Op.FSYNC, Op.RELEASEDIR)


# ---- requests ------------------------------------------------------------------------------------


def _short(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{what} runs past the end of its frame")


def _pack_tail(kind: str, value) -> bytes | memoryview:
    if kind == _DATA:
        if len(value) > MAX_IO:
            raise LocalProtocolError(f"{len(value)} bytes of data exceed MAX_IO ({MAX_IO})")
        return value
    if kind == _FORGETS:
        if not 1 <= len(value) <= MAX_FORGETS:
            raise LocalProtocolError(f"FORGET of {len(value)} items (must be 1..{MAX_FORGETS})")
        return _U32.pack(len(value)) + b"".join(_FORGET.pack(node, count) for node, count in value)
    try:
        (check_name if kind == _NAME else check_target)(value)
    except ValueError as exc:
        raise LocalProtocolError(str(exc)) from None
    return _U16.pack(len(value)) + value


_LAYOUTS: dict[type, tuple[int, Callable[[Args], tuple]]] = {}


def _layout(cls: type[Args]) -> tuple[int, Callable[[Args], tuple]]:
    """How many fixed fields `cls` has, and a getter for all its fields as a tuple (built once per class)."""
    layout = _LAYOUTS.get(cls)
    if layout is None:
        names = cls.__slots__
        many = operator.attrgetter(*names)
        get = many if len(names) > 1 else (lambda args: (many(args),))
        layout = _LAYOUTS[cls] = (len(names) - len(cls._tail), get)
    return layout


def encode_request(request_id: int, uid: int, gid: int, pid: int, args: Args) -> bytes:
    """One request frame (guest side). Id 0 asks for no reply: FORGET always, RELEASE and RELEASEDIR may."""
    if not 0 <= request_id <= MAX_ID:
        raise LocalProtocolError(f"request id {request_id} out of range")
    if isinstance(args, Hello):
        parts: list[bytes | memoryview] = [encode_hello(args)]
    else:
        nfixed, get = _layout(type(args))
        values = get(args)
        parts = [args._fixed.pack(*values[:nfixed])]
        for kind, value in zip(args._tail, values[nfixed:]):  # noqa: B905 - _layout gave one value per kind
            parts.append(_pack_tail(kind, value))
    length = sum(map(len, parts))
    if length > MAX_PAYLOAD:
        raise LocalProtocolError(f"request payload of {length} bytes exceeds {MAX_PAYLOAD}")
    # One join: WRITE data (up to 1 MiB, possibly a memoryview of the FUSE buffer) is copied once.
    return b"".join([REQUEST_HEADER.pack(length, request_id, args._op, uid, gid, pid), *parts])


def _unpack_tail(kind: str, payload: bytes, pos: int) -> tuple[object, int]:
    if kind == _DATA:
        if len(payload) - pos > MAX_IO:
            raise RemoteProtocolError(f"{len(payload) - pos} bytes of data exceed MAX_IO ({MAX_IO})")
        return payload[pos:], len(payload)
    if kind == _FORGETS:
        if pos + 4 > len(payload):
            raise _short("FORGET count")
        (count,) = _U32.unpack_from(payload, pos)
        if not 1 <= count <= MAX_FORGETS:
            raise RemoteProtocolError(f"FORGET of {count} items (must be 1..{MAX_FORGETS})")
        end = pos + 4 + count * _FORGET.size
        if end > len(payload):
            raise _short("FORGET items")
        items = tuple(_FORGET.iter_unpack(payload[pos + 4 : end]))
        if any(node in (0, ROOT_ALIAS) for node, _ in items):
            raise RemoteProtocolError("FORGET of node 0 or 1, which the host never assigns")
        return items, end
    if pos + 2 > len(payload):
        raise _short(kind)
    (length,) = _U16.unpack_from(payload, pos)
    end = pos + 2 + length
    if end > len(payload):
        raise _short(kind)
    value = payload[pos + 2 : end]
    try:
        (check_name if kind == _NAME else check_target)(value)
    except ValueError as exc:
        raise RemoteProtocolError(f"bad {kind}: {exc}") from None
    return value, end


def decode_args(op: int, payload: bytes) -> Args | None:
    """Validate and decode one request payload (host side); None for an unknown op."""
    cls = ARGS.get(op)
    if cls is None:
        return None
    if cls is Hello:
        return decode_hello(payload)
    fixed = cls._fixed
    if len(payload) < fixed.size:
        raise _short(f"{OP_NAMES[op]} fields")
    values: list[object] = list(fixed.unpack_from(payload, 0))
    pos = fixed.size
    for kind in cls._tail:
        value, pos = _unpack_tail(kind, payload, pos)
        values.append(value)
    if pos != len(payload):
        raise RemoteProtocolError(f"{OP_NAMES[op]} has {len(payload) - pos} stray bytes after its fields")
    args = cls(*values)
    for field in _NODE_FIELDS:
        if getattr(args, field, 1) == 0:
            raise RemoteProtocolError(f"{OP_NAMES[op]} names node 0")
    _check_args(args)
    return args


def _check_args(args: Args) -> None:
    if isinstance(args, (Read, Readdir, OpendirRead)) and args.size > MAX_IO:
        raise RemoteProtocolError(f"{type(args).__name__.upper()} of {args.size} bytes exceeds MAX_IO ({MAX_IO})")
    if isinstance(args, Setattr) and args.valid & ~SET_ALL:
        raise RemoteProtocolError(f"SETATTR with unknown valid bits {args.valid & ~SET_ALL:#x}")
    if isinstance(args, Rename) and args.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise RemoteProtocolError(f"RENAME with unknown flags {args.flags:#x}")
    if isinstance(args, Opendir) and args.flags & ~OPEN_FLAG_MASK:
        raise RemoteProtocolError(f"OPENDIR with open flags {args.flags:#o} outside the mask")
    if isinstance(args, (Open, Create, Write)) and args.flags & ~(OPEN_FLAG_MASK | KILL_SUIDGID):
        raise RemoteProtocolError(f"{type(args).__name__.upper()} with open flags {args.flags:#o} outside the mask")
    if isinstance(args, (Readdir, OpendirRead)) and args.plus > 1:
        raise RemoteProtocolError(f"{type(args).__name__.upper()} plus must be 0 or 1, got {args.plus}")
    if isinstance(args, Parked) and not args.token:
        raise RemoteProtocolError("PARKED with token 0, which the host never sends")


class RequestDecoder:
    """Host side: bytes from the guest in, validated Requests out; keeps at most one partial frame."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Request]:
        self._buffer += data
        requests = []
        buf = self._buffer
        while len(buf) >= REQUEST_HEADER.size:
            length, request_id, op, uid, gid, pid = REQUEST_HEADER.unpack_from(buf, 0)
            # Checked before the payload is buffered, so a hostile length costs nothing.
            if length > MAX_PAYLOAD:
                raise RemoteProtocolError(f"request of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
            end = REQUEST_HEADER.size + length
            if len(buf) < end:
                break
            payload = bytes(buf[REQUEST_HEADER.size : end])
            del buf[:end]
            if request_id == 0 and op not in NOTICE_OPS:
                raise RemoteProtocolError(
                    f"request id 0 on {OP_NAMES.get(op, op)} (only FORGET, RELEASE*, PARKED and SETATTR may use it)"
                )
            if op == Op.PARKED and request_id:
                raise RemoteProtocolError(f"PARKED with request id {request_id} (it gets no reply: id 0)")
            requests.append(Request(request_id, op, uid, gid, pid, decode_args(op, payload)))
        return requests

    def close(self) -> None:
        """Call at end of input; a partial frame left over is a protocol error."""
        if self._buffer:
            raise RemoteProtocolError(f"VFS channel closed mid-frame ({len(self._buffer)} bytes pending)")


# ---- replies -------------------------------------------------------------------------------------


def _pack_attr(attr: Attr) -> bytes:
    return ATTR_STRUCT.pack(*attr._values())


def _pack_entry(entry: Entry) -> bytes:
    if entry.node in (0, ROOT_ALIAS):
        raise LocalProtocolError(f"entry with node {entry.node}: node ids 0 and 1 are reserved")
    return ENTRY_STRUCT.pack(entry.node, entry.generation, entry.entry_valid_ns, entry.attr_valid_ns) + _pack_attr(
        entry.attr
    )


def _pack_dirent(item: DirEntry) -> bytes:
    try:
        check_name(item.name, dots=True)
    except ValueError as exc:
        raise LocalProtocolError(f"directory entry: {exc}") from None
    head = _DIRENT.pack(item.offset, item.ino, item.type, len(item.name), item.entry is not None) + item.name
    return head if item.entry is None else head + _pack_entry(item.entry)


def _pack_result(result: Result) -> bytes:
    if result is None:
        return b""
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result)
    if isinstance(result, Entry):
        return _pack_entry(result)
    if isinstance(result, AttrReply):
        return struct.pack(">Q", result.attr_valid_ns) + _pack_attr(result.attr)
    if isinstance(result, Opened):
        return _OPENED.pack(result.fh, result.flags)
    if isinstance(result, Created):
        return _pack_entry(result.entry) + _OPENED.pack(result.fh, result.flags)
    if isinstance(result, Written):
        return _U32.pack(result.size)
    if isinstance(result, StatfsReply):
        return _STATFS.pack(*result._values())
    if isinstance(result, HelloReply):
        return encode_hello_reply(result)
    if isinstance(result, tuple):
        return _U32.pack(len(result)) + b"".join(_pack_dirent(item) for item in result)
    if isinstance(result, DirOpened):
        return _OPENED.pack(result.fh, result.flags) + _pack_result(result.entries)
    if isinstance(result, Listed):
        if result.entry is not None:
            return _NOT_LISTED + _pack_entry(result.entry)
        if len(result.entries) > MAX_LISTED:
            raise LocalProtocolError(f"LOOKUP_DIR listing of {len(result.entries)} entries exceeds {MAX_LISTED}")
        return _LISTED + _pack_result(result.entries)
    raise LocalProtocolError(f"cannot encode a {type(result).__name__} as a VFS reply")


def encode_reply(request_id: int, result: Result, parent: AttrReply | None = None) -> bytes:
    """A success reply (host side): the record the op calls for, bytes for READ/READLINK, None if empty.

    `parent`: the parent directory's attributes after an op that made a name (FEATURE_PARENT_ATTR), or
    the file's after a WRITE (FEATURE_WRITE_ATTR).
    """
    payload = _pack_result(result)
    if parent is not None:
        if not isinstance(result, (Entry, Created, Written)):
            raise LocalProtocolError(f"attributes after a {type(result).__name__}, not an entry or a write")
        payload += PARENT_STRUCT.pack(parent.attr_valid_ns, *parent.attr._values())
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"reply payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return REPLY_HEADER.pack(len(payload), request_id, 0) + payload


def encode_error(request_id: int, error: int) -> bytes:
    """An error reply: `error` is a positive Linux errno."""
    if not 0 < error < 4096:
        raise LocalProtocolError(f"errno {error} out of range")
    return REPLY_HEADER.pack(0, request_id, -error)


class ReplyDecoder:
    """Guest side: bytes from the host in, Reply frames out.

    A wake record (wire.checkpoint) at a frame boundary comes out in port order as
    `Reply(NOTICE_ID, WAKE_STATUS, record)`: no reply header can start with WAKE_MAGIC (its length
    would exceed MAX_PAYLOAD), so it is told apart without knowing whether the channel is parked.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held of a frame not yet complete (0 at a frame boundary)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Reply]:
        # At a frame boundary (the usual case: small replies, one per read) the frames are cut from
        # `data` itself; only a partial frame is copied into the buffer.
        buf = self._buffer
        if buf:
            buf += data
        source: bytes | bytearray = buf if buf else data
        replies = []
        pos, size = 0, len(source)
        while size - pos >= REPLY_HEADER.size:
            length, request_id, status = REPLY_HEADER.unpack_from(source, pos)
            if length > MAX_PAYLOAD:
                if source[pos : pos + len(WAKE_MAGIC)] != WAKE_MAGIC:
                    raise RemoteProtocolError(f"reply of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
                end = pos + WAKE_RECORD_SIZE
                if size < end:
                    break
                replies.append(Reply(NOTICE_ID, WAKE_STATUS, bytes(source[pos:end])))
                pos = end
                continue
            if not -4096 < status <= 0 or (status and length):
                raise RemoteProtocolError(f"reply status {status} with {length} payload bytes")
            end = pos + REPLY_HEADER.size + length
            if size < end:
                break
            replies.append(Reply(request_id, status, bytes(source[pos + REPLY_HEADER.size : end])))
            pos = end
        if source is buf:
            del buf[:pos]
        elif pos < size:
            buf += memoryview(data)[pos:]
        return replies


def _unpack_attr(payload: bytes, pos: int) -> Attr:
    return Attr(*ATTR_STRUCT.unpack_from(payload, pos))


def _unpack_entry(payload: bytes, pos: int) -> Entry:
    node, generation, entry_valid, attr_valid = ENTRY_STRUCT.unpack_from(payload, pos)
    if node in (0, ROOT_ALIAS):
        raise RemoteProtocolError(f"entry with reserved node id {node}")
    return Entry(node, generation, entry_valid, attr_valid, _unpack_attr(payload, pos + ENTRY_STRUCT.size))


_ENTRY_SIZE = ENTRY_STRUCT.size + ATTR_STRUCT.size


def _decode_dirents(payload: bytes) -> tuple[DirEntry, ...]:
    (count,) = _U32.unpack_from(payload, 0)
    pos, items = 4, []
    for _ in range(count):
        offset, ino, kind, length, has_entry = _DIRENT.unpack_from(payload, pos)
        pos += _DIRENT.size
        name = check_name(payload[pos : pos + length], dots=True)
        if len(name) != length:
            raise _short("directory entry name")
        pos += length
        entry = None
        if has_entry:
            entry = _unpack_entry(payload, pos)
            pos += _ENTRY_SIZE
        items.append(DirEntry(offset, ino, kind, name, entry))
    if pos != len(payload):
        raise RemoteProtocolError(f"READDIR reply has {len(payload) - pos} stray bytes")
    return tuple(items)


def decode_result(op: int, payload: bytes) -> Result:
    """Decode a success reply's payload for the op it answers (guest side)."""
    try:
        return _decode_result(op, payload)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise RemoteProtocolError(f"malformed {OP_NAMES.get(op, op)} reply: {exc}") from None


def _exact(payload: bytes, size: int, op: int) -> None:
    if len(payload) != size:
        raise ValueError(f"{len(payload)} bytes, expected {size} for {OP_NAMES[op]}")


def split_parent(op: int, payload: bytes) -> tuple[bytes, AttrReply | None]:
    """A reply payload without its FEATURE_PARENT_ATTR suffix, and the parent's attributes (guest side)."""
    if op not in PARENT_OPS:
        return payload, None
    size = _ENTRY_SIZE + (_OPENED.size if op == Op.CREATE else 0) + PARENT_STRUCT.size
    if len(payload) != size:
        return payload, None
    end = size - PARENT_STRUCT.size
    (valid,) = struct.unpack_from(">Q", payload, end)
    return payload[:end], AttrReply(valid, _unpack_attr(payload, end + 8))


def _decode_result(op: int, payload: bytes) -> Result:
    if op in _ENTRY_OPS:
        _exact(payload, _ENTRY_SIZE, op)
        return _unpack_entry(payload, 0)
    if op in _ATTR_OPS:
        _exact(payload, 8 + ATTR_STRUCT.size, op)
        return AttrReply(struct.unpack_from(">Q", payload)[0], _unpack_attr(payload, 8))
    if op in _EMPTY_OPS:
        _exact(payload, 0, op)
        return None
    if op in (Op.READ, Op.READLINK):
        if op == Op.READLINK:
            check_target(payload)
        return payload
    if op in (Op.OPEN, Op.OPENDIR):
        _exact(payload, _OPENED.size, op)
        return Opened(*_OPENED.unpack(payload))
    if op == Op.CREATE:
        _exact(payload, _ENTRY_SIZE + _OPENED.size, op)
        return Created(_unpack_entry(payload, 0), *_OPENED.unpack_from(payload, _ENTRY_SIZE))
    if op == Op.WRITE:
        _exact(payload, 4, op)
        return Written(_U32.unpack(payload)[0])
    if op == Op.STATFS:
        _exact(payload, _STATFS.size, op)
        return StatfsReply(*_STATFS.unpack(payload))
    if op == Op.READDIR:
        return _decode_dirents(payload)
    if op == Op.OPENDIR_READ:
        fh, flags = _OPENED.unpack_from(payload)
        return DirOpened(fh, flags, _decode_dirents(payload[_OPENED.size :]))
    if op == Op.LOOKUP_DIR:
        kind = payload[:1]
        if kind == _NOT_LISTED:
            _exact(payload, 1 + _ENTRY_SIZE, op)
            return Listed(_unpack_entry(payload, 1), ())
        if kind != _LISTED:
            raise ValueError(f"LOOKUP_DIR reply kind {kind!r} (must be 0: an entry, or 1: a listing)")
        entries = _decode_dirents(payload[1:])
        if len(entries) > MAX_LISTED or any(item.name in (b".", b"..") for item in entries):
            raise ValueError(f"LOOKUP_DIR listing of {len(entries)} entries (at most {MAX_LISTED}, no '.' or '..')")
        return Listed(None, entries)
    if op == Op.HELLO:
        return decode_hello_reply(payload)
    raise ValueError(f"no reply is defined for op {op}")


# ---- host notices --------------------------------------------------------------------------------
# A frame from the host with id 0 is a notice, never a reply (no request the host answers has id 0):
# a watched host_fs directory changed under the guest, so its kernel drops what it caches there;
# or PARK, which asks the guest to quiesce the channel (docs/wire.md, "Parking the channel").
#     notice payload: kind u8 | node u64 | name length u16 | name (INVAL_ENTRY only)
NOTICE_ID = 0
INVAL_INODE = 1  # the node's attributes and cached pages (a directory's: its cached listing)
INVAL_ENTRY = 2  # the name in directory `node`, positive or negative
PARK = 3  # `node` is a nonzero token the guest's PARKED echoes; no name
WAKE_STATUS = 1  # ReplyDecoder: the status of a wake record (no real reply has a positive status)
_NOTICE = struct.Struct(">BQH")


def encode_notice(kind: int, node: int, name: bytes = b"") -> bytes:
    """One notice frame (host side)."""
    bad_node = node == ROOT_ALIAS and kind != PARK
    if kind not in (INVAL_INODE, INVAL_ENTRY, PARK) or not 0 < node < 1 << 64 or bad_node:
        raise LocalProtocolError(f"notice kind {kind} for node {node}")
    if kind == INVAL_ENTRY:
        try:
            check_name(name)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
    elif name:
        raise LocalProtocolError("only an INVAL_ENTRY notice carries a name")
    payload = _NOTICE.pack(kind, node, len(name)) + name
    return REPLY_HEADER.pack(len(payload), NOTICE_ID, 0) + payload


def decode_notice(payload: bytes) -> tuple[int, int, bytes]:
    """(kind, node, name) of a notice's payload (guest side)."""
    if len(payload) < _NOTICE.size:
        raise _short("notice")
    kind, node, length = _NOTICE.unpack_from(payload)
    name = payload[_NOTICE.size :]
    bad_node = node == 0 or node == ROOT_ALIAS and kind != PARK
    if len(name) != length or kind not in (INVAL_INODE, INVAL_ENTRY, PARK) or bad_node:
        raise RemoteProtocolError(f"bad notice: kind {kind}, node {node}, {len(name)} of {length} name bytes")
    if kind == INVAL_ENTRY:
        try:
            check_name(name)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad notice name: {exc}") from None
    elif name:
        raise RemoteProtocolError(f"a notice of kind {kind} with a name")
    return kind, node, name
