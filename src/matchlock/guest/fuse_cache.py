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
"""

from __future__ import annotations

import threading
import time

from .fuse_out import ATTR_OUT, ENTRY_OUT, NS

MAX_CACHED = 65536  # nodes or names; past it the cache is emptied at once
MAX_COMPLETE = 4096  # directories whose every name is known here
MAX_COMPLETE_NAMES = 16384  # names one of them may hold before it is no longer tracked


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
            self._extra[node] = self._extra.get(node, 0) + 1
        el, al = entry_expires - now, attr[0] - now
        return ENTRY_OUT.pack(node, 0, el // NS, al // NS, el % NS, al % NS) + attr[1]

    def getattr(self, node: int) -> bytes | None:
        """The fuse_attr_out for `node`; None: ask the host."""
        attr = self._attrs.get(node)
        if attr is None:
            return None
        left = attr[0] - self._clock()
        if left <= 0:
            return None
        return ATTR_OUT.pack(left // NS, left % NS, 0) + attr[1]

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
            old = self._names.get(node)
            if old is not None and old != (parent, name):
                self._entries.pop(old, None)
            self._entries[(parent, name)] = (node, now + entry_ns)
            self._names[node] = (parent, name)
            if attr_ns and self._fresh(node, gen):
                self._attrs[node] = (now + attr_ns, entry[ENTRY_OUT.size :])

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
        self._complete.pop(parent, None)  # only said for a host-side change or a removal: both are rare
        with self._lock:
            hit = self._entries.pop((parent, name), None)
            if hit is not None:
                self._names.pop(hit[0], None)
                self._attrs.pop(hit[0], None)
            return hit is not None or not self._attrs

    def drop_node(self, node: int) -> None:
        self._complete.pop(node, None)
        with self._lock:
            self._attrs.pop(node, None)

    def drop_all(self) -> None:
        """Forget every entry and attribute, and every reply still in flight (not the lookup counts)."""
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._entries.clear()
        self._names.clear()
        self._attrs.clear()
        self._changed.clear()
        self._gen += 1
        self._floor = self._gen

    def forget(self, node: int, count: int) -> int:
        """The kernel gives back `count` lookups of `node`: how many of them the host gave."""
        self._complete.pop(node, None)
        with self._lock:
            self._attrs.pop(node, None)
            key = self._names.pop(node, None)
            if key is not None:
                self._entries.pop(key, None)
            extra = self._extra.get(node, 0)
            if not extra:
                return count
            taken = min(extra, count)
            if extra > taken:
                self._extra[node] = extra - taken
            else:
                del self._extra[node]
            return count - taken
