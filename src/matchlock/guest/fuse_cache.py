"""Entries and attributes the FUSE daemon answers LOOKUP and GETATTR from (sans-IO, stdlib only).

The guest kernel caches what the host returns, but asks again where it must: a LOOKUP for every
`mkdir` of a name that exists (LOOKUP_EXCL: `mkdir -p`, `tar x` making each file's directories), a
GETATTR of a directory after every change in it (its attributes are dropped), one round trip each.
This cache holds the same replies, each only as long as the host said it may be cached (the
kernel's own validity), and the directory attributes that MKDIR/CREATE/... replies carry
(FEATURE_PARENT_ATTR), so those requests are answered here.

Freshness: a reply is stored only if no change to its node was in flight or began after the request
was sent (a generation count per node), and a change drops what it touches when it is sent. A
LOOKUP answered here counts one more kernel lookup of the node that the host never gave: the next
FORGET of that node is reduced by it, so the host's count stays the kernel's minus ours (never
below what the kernel holds). A FORGET drops the node from the cache, so a node id the host may
have released is never handed out again from here.

A directory this guest made is empty, and every name that appears in it afterwards is made through
this daemon: for as long as the mount lets the guest cache an ENOENT, a LOOKUP of any other name in
it is answered ENOENT here (`tar x` unlinks each name before it creates it).

A directory's listing (LOOKUP_DIR, fuse_prefetch) fills the cache with every entry and makes the
directory complete the same way. The host counted a lookup for each of those nodes that no kernel
holds (`_held`, at most one per node): the kernel's first LOOKUP answered here takes it over, and
an entry that leaves the cache before that (a change, a notice, a FORGET, the cache emptied) gives
it back to the host with FORGET (`take_forget`), so the host's count is the kernel's plus ours.
A host notice marks what it names as changed, so a listing sent before it is not kept.

The listing also answers the directory's READDIR[PLUS] (`listed_dir`) while it is as fresh as its
ENOENTs: no change to the directory began since it was asked (any made here, any host notice), and
within the mount's negative lifetime. READDIRPLUS entries are the cache's own (fresh, else without a
node) and each hands the kernel one lookup, counted as a LOOKUP answered here is (the held one taken
over, else owed against the next FORGET), so the host's count is never below the kernel's.

A chown or chmod to the owner and mode a node's fresh attributes hold changes nothing but its ctime,
and setting explicit times changes nothing but those and ctime (`predict_setattr`): it is answered
here and the host gets it as a notice (FEATURE_SETATTR_NOTICE).
"""

from __future__ import annotations

import itertools
import threading
import time

from ..wire import vfs
from .fuse_dirs import DIRENT
from .fuse_out import ATTR, ATTR_OUT, ENTRY_OUT, ENTRY_SIZE, NS

MAX_CACHED = 65536  # nodes or names; past it the cache is emptied at once
MAX_COMPLETE = 4096  # directories whose every name is known here
MAX_COMPLETE_NAMES = 16384  # names one of them may hold before it is no longer tracked
MAX_HELD = 16384  # nodes held for listings alone; past it they are all given back at once
MAX_LISTED_ROWS = 65536  # entries of listings kept for READDIR; past it they are all dropped at once
ListedEntry = tuple[bytes, int, int, int, bytes]  # name, node, entry and attribute validity (ns), fuse_entry_out
ListedRow = tuple[bytes, int, int]  # name, ino, type: one entry of a listing, in the host's READDIR order
_DOTS: tuple[ListedRow, ...] = ((b".", 1, 4), (b"..", 1, 4))  # as the host lists them (DT_DIR, never ino 0)
_S_IFMT, _S_IFDIR, _SETID = 0o170000, 0o040000, 0o6000  # stat's, without importing it
# The SETATTR bits `predict_setattr` may answer. KILL_SUIDGID comes with every chown of a non-directory
# (FUSE_HANDLE_KILLPRIV_V2): one answered here has no set-id bit to kill. Times only as given values
# (utimensat, tar's futimens): "now" is the host's clock.
_CHECKABLE = vfs.SET_MODE | vfs.SET_UID | vfs.SET_GID | vfs.SET_KILL_SUIDGID | vfs.SET_ATIME | vfs.SET_MTIME
_NO_ENTRY = bytes(ENTRY_SIZE)  # a READDIRPLUS entry without a node: the kernel makes no dentry of it


class MetaCache:
    def __init__(self, clock=time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, bytes], tuple[int, int]] = {}  # (parent, name) -> (node, expires)
        self._names: dict[int, tuple[int, bytes]] = {}  # node -> its (parent, name) in _entries
        self._attrs: dict[int, tuple[int, bytes]] = {}  # node -> (expires, FUSE fuse_attr bytes)
        self._gen = 1
        self._floor = 1  # replies to requests sent before this generation are never stored
        self._changed: dict[int, int] = {}  # node -> generation its last change began or ended at
        self._busy: dict[int, int] = {}  # node -> changes in flight
        self._extra: dict[int, int] = {}  # node -> lookups answered here, owed against FORGETs
        self._complete: dict[int, tuple[int, set[bytes]]] = {}  # directory -> (until, names it may hold)
        self._held: dict[int, int] = {}  # node -> 1: the host counted a lookup for our entry alone
        self._held_in: dict[int, list[int]] = {}  # directory -> nodes listed in it and held then
        self._give: dict[int, int] = {}  # node -> lookups to give back to the host
        self._listing: set[int] = set()  # directories whose LOOKUP_DIR is in flight
        self._unlisted: dict[int, int] = {}  # directory -> until when not to ask again (the host gave no listing)
        self._dirs: dict[int, tuple[int, int, list[ListedRow]]] = {}  # directory -> (gen asked at, until, rows)
        self._rows = 0  # rows held in _dirs

    # ---- answering ------------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> bytes | None:
        """The fuse_entry_out (with its attributes) for `name`, counting a lookup; None: ask the host."""
        with self._lock:
            hit = self._entries.get((parent, name))
            if hit is None:
                return None
            node, entry_expires = hit
            attr = self._attrs.get(node)
            now = self._clock()
            if attr is None or entry_expires <= now or attr[0] <= now:
                return None
            self._count(node)
        el, al = entry_expires - now, attr[0] - now
        return ENTRY_OUT.pack(node, 0, el // NS, al // NS, el % NS, al % NS) + attr[1]

    def _count(self, node: int) -> None:
        """The kernel takes one more lookup of `node` from here."""
        if not self._held.pop(node, 0):  # else the kernel takes over the lookup held for a listing
            self._extra[node] = self._extra.get(node, 0) + 1

    def listed_dir(self, parent: int, offset: int, size: int, plus: int) -> bytes | None:
        """The READDIR[PLUS] reply body at `offset` (at most `size` bytes) from `parent`'s fresh listing,
        counting a lookup for each entry with a node; None: ask the host."""
        now = self._clock()
        parts: list[bytes] = []
        with self._lock:
            held = self._dirs.get(parent)
            if held is None:
                return None
            gen, until, rows = held
            if until <= now or not self._fresh(parent, gen):
                self._drop_dir(parent)
                return None
            used = 0
            for index in range(offset, len(rows) + 2):
                name, ino, kind = _DOTS[index] if index < 2 else rows[index - 2]
                length = vfs.dirent_size(len(name), bool(plus))
                if used + length > size:
                    break
                used += length
                dirent = DIRENT.pack(ino, index + 1, len(name), kind) + name
                if plus:
                    parts.append(_NO_ENTRY if index < 2 else self._plus_entry(parent, name, now))
                parts.append(dirent + bytes(-len(dirent) % 8))
        return b"".join(parts)

    def _plus_entry(self, parent: int, name: bytes, now: int) -> bytes:
        """`name`'s fuse_entry_out for a READDIRPLUS reply, counting its lookup (none if not fresh here)."""
        hit = self._entries.get((parent, name))
        attr = None if hit is None else self._attrs.get(hit[0])
        if hit is None or attr is None or hit[1] <= now or attr[0] <= now:
            return _NO_ENTRY
        node, el, al = hit[0], hit[1] - now, attr[0] - now
        self._count(node)
        return ENTRY_OUT.pack(node, 0, el // NS, al // NS, el % NS, al % NS) + attr[1]

    def _drop_dir(self, parent: int) -> None:
        held = self._dirs.pop(parent, None)
        if held is not None:
            self._rows -= len(held[2])

    def getattr(self, node: int) -> bytes | None:
        """The fuse_attr_out for `node`; None: ask the host."""
        attr = self._attrs.get(node)
        if attr is None:
            return None
        left = attr[0] - self._clock()
        if left <= 0:
            return None
        return ATTR_OUT.pack(left // NS, left % NS, 0) + attr[1]

    def predict_setattr(
        self, node: int, valid: int, mode: int, uid: int, gid: int, ctime_ns: int, atime_ns: int = 0, mtime_ns: int = 0
    ) -> bytes | None:
        """The fuse_attr_out to answer a SETATTR of `node` with here, if its outcome is certain: a chown or
        chmod to what `node` has, and times set to given values (`valid`: SET_MODE, SET_UID, SET_GID,
        SET_KILL_SUIDGID, SET_ATIME, SET_MTIME only; the guest kernel checked the caller may), of a node
        whose attributes are fresh, with no change to it in flight, not a directory (a synthesized one
        refuses any) and with no set-id bit a chown would drop. The cached ctime becomes `ctime_ns`, the
        times the given ones. None: ask the host."""
        if not valid or valid & ~_CHECKABLE:
            return None
        with self._lock:
            held = self._attrs.get(node)
            if held is None or node in self._busy:
                return None
            left = held[0] - self._clock()
            if left <= 0:
                return None
            fields = list(ATTR.unpack(held[1]))
            now_mode, now_uid, now_gid = fields[9], fields[11], fields[12]
            if now_mode & _S_IFMT == _S_IFDIR or now_mode & _SETID:
                return None
            if valid & vfs.SET_MODE and mode & 0o7777 != now_mode & 0o7777:
                return None
            if valid & vfs.SET_UID and uid != now_uid or valid & vfs.SET_GID and gid != now_gid:
                return None
            if valid & vfs.SET_ATIME:
                fields[3], fields[6] = divmod(atime_ns, NS)
            if valid & vfs.SET_MTIME:
                fields[4], fields[7] = divmod(mtime_ns, NS)
            # Never back: the cached ctime may be the host's, and the guest's clock may lag it a little.
            fields[5], fields[8] = divmod(max(ctime_ns, fields[5] * NS + fields[8] + 1), NS)
            attr = ATTR.pack(*fields)
            self._attrs[node] = (held[0], attr)
            self._mark(node)  # a reply asked before this is not kept (it has the old ctime)
        return ATTR_OUT.pack(left // NS, left % NS, 0) + attr

    def absent(self, parent: int, name: bytes) -> int:
        """How long more `name` is known not to exist in `parent` (ns); 0: ask the host."""
        known = self._complete.get(parent)
        if known is None or name in known[1]:
            return 0
        left = known[0] - self._clock()
        if left <= 0:
            self._complete.pop(parent, None)
        return max(left, 0)

    def made_dir(self, node: int, valid_ns: int) -> None:
        """The guest made directory `node` just now (so it is empty); trust that for `valid_ns`."""
        if len(self._complete) < MAX_COMPLETE:
            self._complete[node] = (self._clock() + valid_ns, set())

    def naming(self, parent: int, name: bytes) -> None:
        """A request that may make `name` in `parent` is about to be sent."""
        known = self._complete.get(parent)
        if known is not None:
            known[1].add(name)
            if len(known[1]) > MAX_COMPLETE_NAMES:
                self._complete.pop(parent, None)

    # ---- generations ----------------------------------------------------------------------------

    def stamp(self) -> int:
        """The generation a reading request is sent at."""
        return self._gen

    def begin(self, nodes: tuple[int, ...]) -> int:
        """A change to `nodes` is about to be sent: drop their attributes; returns its generation."""
        with self._lock:
            self._gen += 1
            gen = self._gen
            for node in nodes:
                self._changed[node] = gen
                self._busy[node] = self._busy.get(node, 0) + 1
                self._attrs.pop(node, None)
            if len(self._changed) > MAX_CACHED:
                self._reset()
            return gen

    def end(self, nodes: tuple[int, ...], gen: int) -> bool:
        """The change begun at `gen` got its reply: True if nothing else touched `nodes` meanwhile."""
        with self._lock:
            alone = gen >= self._floor
            self._gen += 1
            for node in nodes:
                busy = self._busy.get(node, 0)
                if busy != 1 or self._changed.get(node) != gen:
                    alone = False
                if busy <= 1:
                    self._busy.pop(node, None)
                else:
                    self._busy[node] = busy - 1
                self._changed[node] = self._gen
            return alone

    def fresh(self, node: int, gen: int) -> bool:
        """No change to `node` was in flight or began since `gen`: a reply to a request sent then may be kept."""
        with self._lock:
            return self._fresh(node, gen)

    def _fresh(self, node: int, gen: int) -> bool:
        return gen >= self._floor and node not in self._busy and self._changed.get(node, 0) <= gen

    # ---- storing --------------------------------------------------------------------------------

    def store_entry(self, parent: int, name: bytes, entry: bytes, gen: int, trusted: bool = False) -> None:
        """A fuse_entry_out (with attributes) the host returned for `name` in `parent`, asked at `gen`
        (`trusted`: the reply to a change of `parent` that ran alone)."""
        node, _, es, as_, en, an = ENTRY_OUT.unpack_from(entry)
        entry_ns, attr_ns = es * NS + en, as_ * NS + an
        if not node or not entry_ns:
            return
        now = self._clock()
        with self._lock:
            if not (trusted or self._fresh(parent, gen)):
                return
            if len(self._entries) >= MAX_CACHED:
                self._reset()
            self._put(parent, name, node, now + entry_ns)
            if attr_ns and self._fresh(node, gen):
                self._attrs[node] = (now + attr_ns, entry[ENTRY_OUT.size :])

    def _put(self, parent: int, name: bytes, node: int, expires: int) -> None:
        old = self._names.get(node)
        if old is not None and old != (parent, name):
            self._entries.pop(old, None)
        was = self._entries.get((parent, name))
        if was is not None and was[0] != node and self._names.get(was[0]) == (parent, name):
            self._unname(was[0])
        self._entries[(parent, name)] = (node, expires)
        self._names[node] = (parent, name)

    def _unname(self, node: int) -> None:
        """`node`'s entry left the cache: a lookup held for it goes back to the host, and so do those
        held for its own listing (nothing can reach them but through it)."""
        self._names.pop(node, None)
        self._attrs.pop(node, None)
        if self._held.pop(node, 0):
            self._give[node] = self._give.get(node, 0) + 1
        self._release_listed(node)

    def _release_listed(self, parent: int) -> None:
        for node in self._held_in.pop(parent, ()):
            key = self._names.get(node)
            if node in self._held and key is not None and key[0] == parent:
                self._entries.pop(key, None)
                self._unname(node)

    def store_attr(self, node: int, attr_out: bytes, gen: int, trusted: bool = False) -> None:
        """A fuse_attr_out for `node`, asked at `gen` (`trusted`: the reply to its own change, alone)."""
        sec, nsec, _ = ATTR_OUT.unpack_from(attr_out)
        valid = sec * NS + nsec
        if not valid:
            return
        now = self._clock()
        with self._lock:
            if not (trusted or self._fresh(node, gen)):
                return
            if len(self._attrs) >= MAX_CACHED:
                self._reset()
            self._attrs[node] = (now + valid, attr_out[ATTR_OUT.size :])

    # ---- dropping -------------------------------------------------------------------------------

    def drop_name(self, parent: int, name: bytes) -> bool:
        """`name` in `parent` changed (on the host, or is being removed or renamed here). False: the
        cache did not know which node the name is, so that node's attributes may still be held."""
        with self._lock:
            self._mark(parent)  # a listing of `parent` sent before this is not kept
            self._complete.pop(parent, None)  # only said for a host-side change or a removal: both are rare
            self._drop_dir(parent)
            hit = self._entries.pop((parent, name), None)
            if hit is not None:
                self._unname(hit[0])
            return hit is not None or not self._attrs

    def drop_node(self, node: int) -> None:
        self._unlisted.pop(node, None)
        with self._lock:
            self._mark(node)
            self._complete.pop(node, None)
            self._drop_dir(node)
            self._attrs.pop(node, None)

    def _mark(self, node: int) -> None:
        self._gen += 1
        self._changed[node] = self._gen
        if len(self._changed) > MAX_CACHED:
            self._reset()

    def drop_all(self) -> None:
        """Forget every entry and attribute, and every reply still in flight (not the lookup counts)."""
        with self._lock:
            self._reset()

    def drop_host(self) -> None:
        """A new host took over (a restored clone): forget everything, the listings' completeness too,
        which drop_all keeps because it follows the guest's own ops."""
        self.drop_all()
        self._complete.clear()
        self._unlisted.clear()

    def _reset(self) -> None:
        for node in self._held:
            self._give[node] = self._give.get(node, 0) + 1
        self._held.clear()
        self._held_in.clear()
        self._dirs.clear()
        self._rows = 0
        self._entries.clear()
        self._names.clear()
        self._attrs.clear()
        self._changed.clear()
        self._gen += 1
        self._floor = self._gen

    def forget(self, node: int, count: int) -> int:
        """The kernel gives back `count` lookups of `node`: how many to give back to the host (with any
        held for a listing, as the node's entry leaves the cache)."""
        self._complete.pop(node, None)
        self._unlisted.pop(node, None)
        with self._lock:
            self._attrs.pop(node, None)
            key = self._names.pop(node, None)
            if key is not None:
                self._entries.pop(key, None)
            count += self._held.pop(node, 0)
            self._drop_dir(node)
            self._release_listed(node)  # the kernel holds none of them: its next LOOKUP there lists again
            extra = self._extra.get(node, 0)
            if not extra:
                return count
            taken = min(extra, count)
            if extra > taken:
                self._extra[node] = extra - taken
            else:
                del self._extra[node]
            return count - taken

    # ---- listings (fuse_prefetch) ---------------------------------------------------------------

    def want_listing(self, parent: int) -> bool:
        """A LOOKUP in `parent` missed: True if its listing should be asked for (now in flight)."""
        if parent in self._listing:
            return False
        now = self._clock()
        if self._unlisted.get(parent, 0) > now:
            return False
        known = self._complete.get(parent)
        if known is not None and known[0] > now:
            return False  # complete, yet the name is not here (its attributes dropped): a plain LOOKUP
        self._listing.add(parent)
        return True

    def listing_done(self, parent: int, retry_ns: int) -> None:
        """The LOOKUP_DIR of `parent` got its reply; `retry_ns` > 0: the host gave no listing (a mount
        not cached long, a directory too big), so plain LOOKUPs go there that long."""
        self._listing.discard(parent)
        if retry_ns:
            if len(self._unlisted) >= MAX_COMPLETE:
                self._unlisted.clear()
            self._unlisted[parent] = self._clock() + retry_ns

    def store_listing(
        self,
        parent: int,
        name: bytes,
        names: set[bytes],
        items: list[ListedEntry],
        gen: int,
        complete_ns: int,
        rows: list[ListedRow] | None = None,
    ) -> tuple[bool, bytes | None]:
        """`parent`'s listing (every name in it; the entries with a node; the rows for READDIR,
        fuse_prefetch.decode) asked at `gen` for a LOOKUP of `name`: (fresh, the fuse_entry_out to answer
        it with, None if `name` is not listed). Not fresh (`parent` changed since): nothing is kept and
        the answer may not be cached. Every other listed node is kept, or given back."""
        now = self._clock()
        answer = None
        with self._lock:
            if len(self._held) + len(items) > MAX_HELD:
                for node in list(self._held):
                    key = self._names.get(node)
                    if key is not None:
                        self._entries.pop(key, None)
                    self._unname(node)
                self._held_in.clear()  # it records held nodes only, and none is held now
            if len(self._entries) + len(items) >= MAX_CACHED:
                self._reset()
            fresh = self._fresh(parent, gen)
            for item_name, node, entry_ns, attr_ns, entry in items:
                if item_name == name:
                    if not fresh:  # the kernel takes it, but must ask again next time
                        entry = (
                            ENTRY_OUT.pack(node, ENTRY_OUT.unpack_from(entry)[1], 0, 0, 0, 0) + entry[ENTRY_OUT.size :]
                        )
                    answer = entry
                    if fresh and entry_ns and attr_ns and self._fresh(node, gen):
                        self._put(parent, name, node, now + entry_ns)
                        self._attrs[node] = (now + attr_ns, entry[ENTRY_OUT.size :])
                    continue
                if not fresh or node in self._held or not entry_ns or not attr_ns or not self._fresh(node, gen):
                    self._give[node] = self._give.get(node, 0) + 1
                    continue
                self._put(parent, item_name, node, now + entry_ns)
                self._attrs[node] = (now + attr_ns, entry[ENTRY_OUT.size :])
                self._held[node] = 1
            # Those held for this directory's listings, once each (a later one keeps what is still held).
            held = [n for n in (*self._held_in.get(parent, ()), *(item[1] for item in items)) if n in self._held
                    and self._names.get(n, (0,))[0] == parent]  # fmt: skip
            if held:
                self._held_in[parent] = list(dict.fromkeys(held))
            if fresh and complete_ns and len(self._complete) < MAX_COMPLETE:
                self._complete[parent] = (now + complete_ns, names)
            if fresh and complete_ns and rows is not None:
                self._drop_dir(parent)
                if self._rows + len(rows) > MAX_LISTED_ROWS or len(self._dirs) >= MAX_COMPLETE:
                    self._dirs.clear()
                    self._rows = 0
                self._dirs[parent] = (gen, now + complete_ns, rows)
                self._rows += len(rows)
        return fresh, answer

    @property
    def owing(self) -> bool:
        return bool(self._give)

    def take_forget(self) -> vfs.Forget | None:
        """A FORGET for lookups held for listings whose entries left the cache (at most MAX_FORGETS of them)."""
        with self._lock:
            if not self._give:
                return None
            items = tuple(itertools.islice(self._give.items(), vfs.MAX_FORGETS))
            for node, _ in items:
                del self._give[node]
        return vfs.Forget(items)
