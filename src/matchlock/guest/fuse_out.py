"""What the FUSE daemon writes to /dev/fuse: reply headers, entries, attributes, cache notices (stdlib only).

Structs follow /usr/include/linux/fuse.h (7.38), little-endian. The hot replies go from the host's
wire bytes to FUSE bytes in one unpack and one pack, without records (`fast_entry`, `fast_attr_reply`).
"""

from __future__ import annotations

import struct

from ..wire import vfs
from ..wire.frames import RemoteProtocolError

ROOT_ID = 1
OUT_HEADER = struct.Struct("<IiQ")
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")  # fuse_notify_inval_inode_out: ino, off, len (0, 0: every page)
NOTIFY_INVAL_INODE_CODE = 2  # FUSE_NOTIFY_INVAL_INODE, sent in the header's error field with unique 0
NOTIFY_INVAL_ENTRY = struct.Struct("<QII")  # fuse_notify_inval_entry_out: parent, namelen, flags; name, NUL
NOTIFY_INVAL_ENTRY_CODE = 3  # FUSE_NOTIFY_INVAL_ENTRY
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")
ATTR_OUT = struct.Struct("<QII")
ENTRY_SIZE = ENTRY_OUT.size + ATTR.size
NS = 1_000_000_000
WIRE_ENTRY = struct.Struct(vfs.ENTRY_STRUCT.format + vfs.ATTR_STRUCT.format[1:])
WIRE_ATTR_REPLY = struct.Struct(">Q" + vfs.ATTR_STRUCT.format[1:])
_FUSE_ENTRY = struct.Struct(ENTRY_OUT.format + ATTR.format[1:])
_FUSE_ATTR_REPLY = struct.Struct(ATTR_OUT.format + ATTR.format[1:])


def out(unique: int, body: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def error(unique: int, code: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -code, unique)


def split_ns(ns: int) -> tuple[int, int]:
    return ns // NS, ns % NS


def pack_attr(attr: vfs.Attr) -> bytes:
    (a, an), (m, mn), (c, cn) = split_ns(attr.atime_ns), split_ns(attr.mtime_ns), split_ns(attr.ctime_ns)
    return ATTR.pack(attr.ino, attr.size, attr.blocks, a, m, c, an, mn, cn, attr.mode, attr.nlink, attr.uid,
                     attr.gid, attr.rdev, attr.blksize, 0)  # fmt: skip


def pack_entry(entry: vfs.Entry | None, negative_ns: int = 0) -> bytes:
    """fuse_entry_out; None is a negative entry (node 0), cached for `negative_ns`."""
    if entry is None:
        sec, nsec = split_ns(negative_ns)
        return ENTRY_OUT.pack(0, 0, sec, 0, nsec, 0) + bytes(ATTR.size)
    (es, en), (as_, an) = split_ns(entry.entry_valid_ns), split_ns(entry.attr_valid_ns)
    return ENTRY_OUT.pack(entry.node, entry.generation, es, as_, en, an) + pack_attr(entry.attr)


def inval_inode_notice(nodeid: int) -> bytes:
    """FUSE_NOTIFY_INVAL_INODE: the inode's attributes and every cached page (a directory's listing)."""
    return OUT_HEADER.pack(OUT_HEADER.size + NOTIFY_INVAL_INODE.size, NOTIFY_INVAL_INODE_CODE, 0) + (
        NOTIFY_INVAL_INODE.pack(nodeid, 0, 0)
    )


def inval_entry_notice(parent: int, name: bytes) -> bytes:
    """FUSE_NOTIFY_INVAL_ENTRY: the dentry `name` in directory `parent`."""
    body = NOTIFY_INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_ENTRY_CODE, 0) + body


def fast_entry(payload: bytes) -> bytes:
    node, gen, ev, av, ino, size, blocks, at, mt, ct, mode, nlink, uid, gid, rdev, blksize = WIRE_ENTRY.unpack(payload)
    if node in (0, ROOT_ID):
        raise RemoteProtocolError(f"entry with reserved node id {node}")
    return _FUSE_ENTRY.pack(node, gen, ev // NS, av // NS, ev % NS, av % NS, ino, size, blocks, at // NS,
                            mt // NS, ct // NS, at % NS, mt % NS, ct % NS, mode, nlink, uid, gid, rdev, blksize, 0)  # fmt: skip


def fast_attr_reply(payload: bytes) -> bytes:
    av, ino, size, blocks, at, mt, ct, mode, nlink, uid, gid, rdev, blksize = WIRE_ATTR_REPLY.unpack(payload)
    return _FUSE_ATTR_REPLY.pack(av // NS, av % NS, 0, ino, size, blocks, at // NS, mt // NS, ct // NS, at % NS,
                                 mt % NS, ct % NS, mode, nlink, uid, gid, rdev, blksize, 0)  # fmt: skip
