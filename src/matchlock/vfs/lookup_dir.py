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

import contextlib
import errno
import os
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
        # Any failure to list (too big, not a directory, searchable but unreadable): LOOKUP answers instead.
        with contextlib.suppress(FsError):
            listing = await router._io(router._listing, parts, wire.MAX_LISTED)
    if listing is None or len(listing) > wire.MAX_LISTED:  # nested mount points come on top of the provider's
        return await _looked_up(router, a, caller)
    attrs = await router._io(router._attrs, [parts + (e.name,) for e in listing])
    out: list[wire.DirEntry] = []
    made: list[tuple[int, int]] = []
    try:
        for cookie, e in enumerate(listing, 3):  # after '.' and '..', as READDIR counts
            item = router._plus_entry(parent, parts, cookie, e, attrs.get(e.name))
            if item.entry is not None:
                made.append((item.entry.node, 1))
            out.append(item)
    except FsError as exc:  # the node table is full: no listing, and nothing of it kept
        router.forget(tuple(made))
        if exc.errno != errno.ENFILE:
            raise
        return await _looked_up(router, a, caller)
    return wire.Listed(None, tuple(out))


async def _looked_up(router: Router, a: wire.LookupDir, caller: Caller) -> wire.Listed:
    """No listing: exactly LOOKUP's answer."""
    entry = await router.lookup(wire.Lookup(a.parent, a.name), caller)
    assert isinstance(entry, wire.Entry)
    return wire.Listed(entry, ())
