"""LOOKUP_DIR: a LOOKUP answered with the directory's whole listing, for the guest's cache (FEATURE_LOOKUP_DIR).

Cold, `git status` lstat()s every path of its index and the guest kernel LOOKUPs every component it
does not hold, one round trip each. Where the guest may answer OPENDIR itself (the same grant as
OPEN_GUEST_DIR: the directory is cached long, so the host's notices keep the guest right, and no
interception rule or event needs to see each LOOKUP; the server grants the feature only without
interception), the guest's first LOOKUP in a directory gets the directory's listing with every
entry's attributes, READDIRPLUS-like: each entry with a node counts one lookup, which the guest
gives back (FORGET) for every entry its kernel never takes. Anywhere else, and for a directory of
more than MAX_LISTED entries, it is answered exactly as a LOOKUP.

Bounds: one request slot as any request, at most MAX_LISTED host stats, nodes within
`Limits.max_nodes` (past it: the plain LOOKUP answer, with every node it made given back).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from ..wire import vfs as wire
from .types import Caller, FsError, check_name

if TYPE_CHECKING:
    from .router import Router


async def lookup_dir(router: Router, a: wire.LookupDir, caller: Caller) -> wire.Result:
    if not router.lookup_dir:  # served only to a guest that offered FEATURE_LOOKUP_DIR, granted it
        raise FsError(errno.ENOSYS, "LOOKUP_DIR without FEATURE_LOOKUP_DIR")
    parent = router._node(a.parent)
    check_name(os.fsdecode(a.name))
    parts = router._parts(parent)
    listing = None
    if router._cache_flags(parts) and not router.interceptor.enabled:
        try:
            listing = await router._io(router._listing, parts, wire.MAX_LISTED)
        except FsError as exc:
            if exc.errno not in (errno.EOVERFLOW, errno.ENOTDIR):
                raise
    if listing is None:
        entry = await router.lookup(wire.Lookup(a.parent, a.name), caller)
        assert isinstance(entry, wire.Entry)
        return wire.Listed(entry, ())
    attrs = await router._io(router._attrs, [parts + (e.name,) for e in listing])
    out: list[wire.DirEntry] = []
    made: list[tuple[int, int]] = []
    try:
        for cookie, e in enumerate(listing, 3):  # after '.' and '..', as READDIR counts
            name = os.fsencode(e.name)
            attr = attrs.get(e.name)
            if attr is None:  # gone since the listing: an entry without a node
                out.append(wire.DirEntry(cookie, e.ino or 1, stat.S_IFMT(e.mode) >> 12, name))
                continue
            found = router._entry(parent, e.name, parts + (e.name,), attr)
            made.append((found.node, 1))
            out.append(wire.DirEntry(cookie, attr.ino or 1, stat.S_IFMT(attr.mode) >> 12, name, found))
    except FsError as exc:  # the node table is full: no listing, and nothing of it kept
        router.forget(tuple(made))
        if exc.errno != errno.ENFILE:
            raise
        entry = await router.lookup(wire.Lookup(a.parent, a.name), caller)
        assert isinstance(entry, wire.Entry)
        return wire.Listed(entry, ())
    return wire.Listed(None, tuple(out))
