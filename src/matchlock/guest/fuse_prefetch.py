"""LOOKUPs answered from one listing per directory (FEATURE_LOOKUP_DIR; sans-IO, stdlib only).

Cold (the kernel's caches dropped), `git status` lstat()s every path of its index and the kernel
LOOKUPs every component it does not hold, one host round trip each. When the host grants
FEATURE_LOOKUP_DIR (no interception) and the mount may cache ENOENTs, a LOOKUP that misses the cache
in a directory whose listing is not here and not on its way goes as LOOKUP_DIR: the host answers
with the directory's whole listing and attributes where it lets the guest cache long (as for
OPEN_GUEST_DIR; vfs/lookup_dir.py), else exactly as a LOOKUP. The cache keeps every listed entry
and the names (MetaCache.store_listing), so later LOOKUPs there are answered here, an absent name
ENOENT for the mount's negative lifetime (the ENOENTs a LOOKUP would have cached: host notices drop
the directory sooner). Other LOOKUPs in the directory while its listing is in flight go as plain
LOOKUPs. The host lists only where it would grant OPEN_GUEST_DIR, so a listing also lets the guest
open the directory itself (fuse_dirs), as a host OPENDIR with that flag would, and answer its
READDIR[PLUS] from the listing while it is fresh (MetaCache.listed_dir): a cold `git status` then
sends one request per directory.
"""

from __future__ import annotations

import errno
import struct

from ..wire import vfs
from ..wire.frames import RemoteProtocolError
from .fuse_out import WIRE_ENTRY, fast_entry, out

TYPE_CHECKING = False  # not `typing`'s: the guest pays for every import under emulation
if TYPE_CHECKING:
    from .fuse import MountTranslator
    from .fuse_actions import Pending
    from .fuse_cache import ListedEntry, ListedRow


def listed(
    t: MountTranslator, pending: Pending, status: int, payload: bytes
) -> tuple[list[bytes], vfs.Forget | vfs.Releasedir | None]:
    """The /dev/fuse reply to a LOOKUP sent as LOOKUP_DIR, and lookups to give back to the host."""
    assert pending.key is not None
    parent, name = pending.key
    got = status == 0 and payload[:1] == _LISTED
    t.cache.listing_done(parent, 0 if got else t.negative_valid_ns)
    pending.plus = 0  # from here on, as the LOOKUP it stands for
    if not got:  # an error, or the host gave no listing: LOOKUP's reply
        if status == 0:
            vfs.decode_result(vfs.Op.LOOKUP_DIR, payload)  # checked as a whole
        return t.complete(pending, status, payload[1:])
    names, items, rows = decode(payload)
    fresh, answer = t.cache.store_listing(parent, name, names, items, pending.gen, t.negative_valid_ns, rows)
    if fresh and t.features & vfs.FEATURE_GUEST_OPENDIR:
        # The host lists only where it would let the guest open the directory itself (OPEN_GUEST_DIR).
        t.dirs.learned(parent, 0, vfs.OPEN_GUEST_DIR | vfs.OPEN_CACHE_DIR | vfs.OPEN_KEEP_CACHE)
    forget = t.cache.take_forget()  # more than one FORGET's worth: the rest go with later LOOKUPs
    if answer is not None:
        return [out(pending.unique, answer)], forget
    return t.complete(pending, -errno.ENOENT, b"")[0], forget  # not fresh: an ENOENT the kernel does not cache


def decode(payload: bytes) -> tuple[set[bytes], list[ListedEntry], list[ListedRow]]:
    """A LOOKUP_DIR listing straight to FUSE bytes, as `wire.vfs.decode_result` checks it (its records
    cost several times as much under emulation): every name, the entries with a node, and every
    (name, ino, type) in the host's order (READDIR's: cookies 3, 4, ... after '.' and '..')."""
    try:
        (count,) = _COUNT.unpack_from(payload, 1)
        if count > vfs.MAX_LISTED:
            raise ValueError(f"{count} entries, more than {vfs.MAX_LISTED}")
        names: set[bytes] = set()
        items: list[ListedEntry] = []
        rows: list[ListedRow] = []
        pos = 1 + _COUNT.size
        for index in range(count):
            cookie, ino, kind, length, has_entry = _DIRENT.unpack_from(payload, pos)
            pos += _DIRENT.size
            item = vfs.check_name(payload[pos : pos + length])  # no '.' or '..'
            if len(item) != length:
                raise ValueError("a name runs past the end")
            if cookie != index + 3 or item in names:  # READDIRs answered from it resume at these cookies
                raise ValueError(f"entry {index} has cookie {cookie} or a repeated name")
            names.add(item)
            rows.append((item, ino, kind))
            pos += length
            if has_entry:
                wire = payload[pos : pos + WIRE_ENTRY.size]
                node, _, entry_ns, attr_ns = vfs.ENTRY_STRUCT.unpack_from(wire)
                items.append((item, node, entry_ns, attr_ns, fast_entry(wire)))
                pos += WIRE_ENTRY.size
        if pos != len(payload):
            raise ValueError(f"{len(payload) - pos} stray bytes")
    except (struct.error, ValueError) as exc:
        raise RemoteProtocolError(f"malformed LOOKUP_DIR reply: {exc}") from None
    return names, items, rows


_COUNT = struct.Struct(">I")
_DIRENT = vfs._DIRENT
_LISTED = b"\x01"
