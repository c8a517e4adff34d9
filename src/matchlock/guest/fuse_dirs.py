"""Directories the FUSE daemon opens itself, and READDIR replies (sans-IO, stdlib only).

A warm `git status` opens and closes every directory of the tree, and the kernel answers each
READDIR from its cached listing: only the OPENDIR and RELEASEDIR reached the host, one round trip
and one notice each. When the host's OPENDIR reply says OPEN_GUEST_DIR (FEATURE_GUEST_OPENDIR: the
mount is cached long, the host's notices keep the guest right, and no interception rule or event
needs to see the open), later OPENDIRs of that node are answered here with the same flags and a
handle of our own (LOCAL_FH set). The host's handle is opened only when a READDIR misses the
kernel's cache (OPENDIR_READ: the open and the read in one round trip), and released with ours.

While the leave stands, a READDIR[PLUS] on our handle before the host's is opened is answered from
the directory's LOOKUP_DIR listing if the cache holds it fresh (MetaCache.listed_dir), with no
round trip at all.

The leave ends with any INVAL_INODE notice or FORGET of the node, or an OPENDIR_READ the host refused,
so a directory the host changed or removed, or a mount whose watch stopped (the host then invalidates
every node), goes back to the host. A notice ends it as it arrives (the reply thread, in port order),
and a leave in an OPENDIR_READ reply counts only if no notice for the node arrived since the
directory was opened here: the host decides the leave before it reads the entries' attributes, so a
watch that stops meanwhile sends its notices ahead of that reply. (A host OPENDIR's leave is decided
as its reply is queued, so port order alone keeps it right.)
"""

from __future__ import annotations

import struct
import threading

from ..wire import vfs
from ..wire.frames import RemoteProtocolError
from .fuse_out import ENTRY_SIZE, out, pack_entry

LOCAL_FH = 1 << 63  # our handles; the host's never have this bit (a reply with it is refused)
MAX_NODES = 65536  # directories we may open; past it the leave is forgotten at once
MAX_OPEN = 65536  # handles of ours open at once; past it OPENDIR goes to the host again
DIRENT = struct.Struct("<QQII")  # fuse_dirent, then the name
FH = struct.Struct("<Q")  # the fh that fuse_read_in and fuse_release_in start with


class GuestDirs:
    """Which directories may be opened here (node -> FOPEN flags) and our open handles.

    The translator's request thread opens and releases; the reply thread records host handles.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags: dict[int, int] = {}
        self._open: dict[int, list[int]] = {}  # our fh -> [node, the host's fh or 0, notices seen at open]
        self._next = 0
        self._seen = 0  # host notices arrived so far (counted by the reply thread)
        self._noticed: dict[int, int] = {}  # node -> the count at its last notice
        self._floor = 0  # opens before this count may have missed a notice `_noticed` no longer holds

    def learned(self, node: int, fh: int, flags: int, ours: int = 0) -> int:
        """The host opened `node` as `fh` with `flags` (for our handle `ours`: an OPENDIR_READ): the
        FOPEN flags for the kernel."""
        if fh & LOCAL_FH:
            raise RemoteProtocolError(f"host directory handle {fh:#x} has the guest's own bit")
        if flags & vfs.OPEN_GUEST_DIR and (not ours or self._unnoticed(node, ours)):
            if len(self._flags) >= MAX_NODES:
                self._flags.clear()
            self._flags[node] = flags & vfs.OPEN_FLAGS_ALL
        else:
            self._flags.pop(node, None)
        return flags & vfs.OPEN_FLAGS_ALL

    def _unnoticed(self, node: int, ours: int) -> bool:
        """No notice for `node` arrived since our handle `ours` was opened (False if it is released)."""
        with self._lock:
            held = self._open.get(ours)
        return held is not None and held[2] >= self._floor and self._noticed.get(node, 0) <= held[2]

    def drop(self, node: int) -> None:
        self._flags.pop(node, None)

    def drop_all(self) -> None:
        self._flags.clear()

    def granted(self, node: int) -> bool:
        """The leave to open `node` here stands (so may its READDIRs be answered from a listing)."""
        return node in self._flags

    def noticed(self, node: int) -> None:
        """A host notice about `node` arrived, or a read of it was refused (the reply thread, before any
        reply after it): the leave ends, and reads opened before this may not renew it."""
        self._seen += 1
        # Only a directory with leave (or one noted before) can have a handle of ours open.
        if self._flags.pop(node, None) is None and node not in self._noticed:
            return
        if len(self._noticed) >= MAX_NODES:
            self._noticed.clear()
            self._floor = self._seen
        self._noticed[node] = self._seen

    def open(self, node: int) -> tuple[int, int] | None:
        """Our (fh, FOPEN flags) for `node`; None: ask the host."""
        seen = self._seen  # before the leave is read: a notice in between then refuses the read's leave
        flags = self._flags.get(node)
        if flags is None or len(self._open) >= MAX_OPEN:
            return None
        with self._lock:
            self._next = (self._next + 1) % LOCAL_FH or 1
            fh = LOCAL_FH | self._next
            self._open[fh] = [node, 0, seen]
        return fh, flags

    def host(self, fh: int) -> tuple[int, int] | None:
        """(node, the host's fh or 0 if none is open yet) for our `fh`; None: not ours, or released."""
        with self._lock:
            held = self._open.get(fh)
            return None if held is None else (held[0], held[1])

    def opened(self, fh: int, host_fh: int) -> bool:
        """The host opened our `fh` as `host_fh` (checked by `learned`); False: keep it not (released
        meanwhile, or one already)."""
        with self._lock:
            held = self._open.get(fh)
            if held is None or held[1]:
                return False
            held[1] = host_fh
            return True

    def release(self, fh: int) -> tuple[int, int] | None:
        """Our `fh` is closed: (node, host fh) to release at the host, None if it never opened one."""
        with self._lock:
            held = self._open.pop(fh, None)
        return None if held is None or not held[1] else (held[0], held[1])


def dirents(unique: int, size: int, plus: int, entries: tuple) -> tuple[bytes, vfs.Forget | None]:
    """The READDIR[PLUS] reply for the host's `entries`, at most `size` bytes, and lookups to give back."""
    parts: list[bytes] = []
    used = 0
    unused: list[tuple[int, int]] = []
    full = False
    for item in entries:
        entry = item.entry
        if item.name in (b".", b"..") or not plus:
            if entry is not None:
                unused.append((entry.node, 1))
            entry = None
        length = vfs.dirent_size(len(item.name), bool(plus))
        if full or used + length > size:
            full = True
            if entry is not None:
                unused.append((entry.node, 1))
            continue
        pad = length - (ENTRY_SIZE if plus else 0) - DIRENT.size - len(item.name)
        dirent = DIRENT.pack(item.ino, item.offset, len(item.name), item.type) + item.name + bytes(pad)
        parts.append(pack_entry(entry) + dirent if plus else dirent)
        used += length
    forget = vfs.Forget(tuple(unused[: vfs.MAX_FORGETS])) if unused else None
    return out(unique, b"".join(parts)), forget
