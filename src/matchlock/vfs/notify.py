"""Host changes under host_fs mounts, told to the guest, so its kernel may cache those mounts long.

The host may change a shared directory under the guest, so a host_fs mount is cached for `SHORT`
only, and a warm `git status` asks the host about every file again. With every directory of the
mount watched (`watch.TreeWatch`) the guest caches it for `LONG` instead: each host change becomes
notices (`wire.vfs.encode_notice`) that make the guest's kernel drop the name (INVAL_ENTRY) and the
attributes and pages (INVAL_INODE) it holds for the nodes concerned. Notices only name nodes the
guest already holds and names in directories it holds, all beneath the mount root, so they tell it
nothing a listing would not.

The guest's own changes through the mount come back as events too. Each op leaves a mark: the path
and what the op left there (attributes that identify it, or "absent"). Events are acted on `DELAY`
later (so the op has left its mark), and an event whose path still looks exactly as the guest's
own op left it is dropped: the guest's kernel already knows. A path that does not look so is looked
at again a few times (a guest op on it may still be under way); anything still unexplained is then
invalidated.

Any doubt stops the watch for good and says so in the host log: a queue overflow, a watch that
cannot be added, more directories than the cap, the guest not reading its notices. Then every
node the guest holds is invalidated once and the mount is cached for `SHORT` again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..wire import vfs as wire
from ..wire.frames import LocalProtocolError
from .hostfs import HostFSProvider
from .provider import Path, Provider
from .types import Attr, FsError, Handle
from .watch import IN_Q_OVERFLOW, Inotify, TreeWatch

if TYPE_CHECKING:
    from .nodes import Node
    from .router import Mount, Router

log = logging.getLogger("matchlock.vfs")
SHORT = HostFSProvider.cache_seconds  # seconds a host_fs mount is cached without a healthy watch
LONG = 600.0  # with one (past 60 s the router also keeps page caches across opens)
DELAY = 0.02
LOOKS = 3  # a change unexplained this many looks DELAY apart is the host's (so it waits <= 4 DELAYs)
MARK_SECONDS = 5.0  # how long an op's mark explains events on its path
MAX_MARKS = 65_536
MAX_CHANGES = 65_536  # changed paths waiting for one flush; more is treated as an overflow
MAX_BACKLOG = 4 << 20  # bytes queued for the guest: past it the guest is not reading
OFF_ENV = "MATCHLOCK_VFS_NO_WATCH"  # set: host_fs mounts are never watched (cached for SHORT)

Signature = tuple[int, ...] | None  # None: nothing there


def signature(attr: Attr) -> tuple[int, ...]:
    # A directory's times and size follow its entries, whose own events are checked by name.
    if stat.S_ISDIR(attr.mode):
        return (attr.ino, attr.mode, attr.uid, attr.gid)
    return (attr.ino, attr.mode, attr.nlink, attr.uid, attr.gid, attr.size, attr.mtime_ns, attr.ctime_ns)


class _Watched:
    __slots__ = ("mount", "tree")

    def __init__(self, mount: Mount, tree: TreeWatch) -> None:
        self.mount = mount
        self.tree = tree


class Notifier:
    def __init__(self, router: Router, cap: int | None = None) -> None:
        self.router = router
        self.cap = cap
        self.candidates = [m for m in router.mounts if isinstance(m.provider, HostFSProvider)]
        self.watched: dict[Provider, _Watched] = {}
        self.marks: dict[tuple[Provider, Path], tuple[Signature, float]] = {}
        self._looks: dict[tuple[Provider, Path], int] = {}  # paths looked at and not yet explained
        self.sent = 0  # notices sent (tests, benchmarks)
        self.walked = False  # the first walk is over: `watched` holds the mounts it could watch
        self._send: Callable[[bytes], None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._flush_at: asyncio.TimerHandle | None = None
        self._closed = False

    # --- lifetime -------------------------------------------------------------------------------------

    def start(self, send: Callable[[bytes], None], writer: asyncio.StreamWriter | None = None) -> None:
        """Watch every host_fs mount (the walk runs in the router's threads); `send` queues frames for the guest."""
        if not self.candidates or os.environ.get(OFF_ENV, "") not in ("", "0"):
            self.walked = True  # nothing to walk (and nothing will be told): `settled` must not wait for it
            return
        self._send, self._writer = send, writer
        trees = []
        for m in self.candidates:
            assert isinstance(m.provider, HostFSProvider)
            try:
                inotify = Inotify()  # one per mount: two mounts of one directory would share its watch ids
            except OSError as exc:  # fs.inotify.max_user_instances
                log.warning("host_fs mount %s is cached for %s s: %s", m.path, SHORT, exc)
                continue
            kwargs = {} if self.cap is None else {"cap": self.cap}
            trees.append(_Watched(m, TreeWatch(inotify, m.provider.dir, **kwargs)))
        loop = asyncio.get_running_loop()
        walk = loop.run_in_executor(self.router.executor, _walk, trees)
        walk.add_done_callback(lambda done: self._started(trees, done))

    def _started(self, trees: list[_Watched], done: asyncio.Future) -> None:
        self.walked = True
        if self._closed:
            return
        failed = "the walk was cancelled" if done.cancelled() else repr(done.exception() or "")
        for w in trees:
            if w.tree.failed or done.cancelled() or done.exception() is not None:
                log.warning("host_fs mount %s is cached for %s s: %s", w.mount.path, SHORT, w.tree.failed or failed)
                _close(w)
                continue
            self.watched[w.mount.provider] = w
            w.mount.provider.cache_seconds = LONG
            asyncio.get_running_loop().add_reader(w.tree.inotify.fd, self._readable, w)
            self._readable(w)  # events queued during the walk

    def close(self) -> None:
        self._closed = True
        if self._flush_at is not None:
            self._flush_at.cancel()
        for w in self.watched.values():
            _close(w)
        self.watched.clear()

    async def settled(self) -> None:
        """Until every host change made so far is told to the guest or explained (tests and benchmarks:
        after it, such a change sends no more notices). The caller bounds the wait."""
        while True:
            watched = list(self.watched.values())
            for w in watched:
                self._readable(w)  # events the loop has not read yet
            quiet = self._flush_at is None and not any(w.tree.changes for w in watched)
            if quiet and (self.walked or not self.candidates):
                return
            await asyncio.sleep(DELAY)

    # --- the guest's own ops --------------------------------------------------------------------------

    def own(self, m: Mount, rel: Path, attr: Attr | None = None, *, gone: bool = False) -> None:
        """The guest changed `rel` of `m` through the router; `attr` is what it left (None: look now)."""
        if m.provider not in self.watched:
            return
        sig = None if gone else signature(attr) if attr is not None else _looks_now(m.provider, rel)
        key = (m.provider, rel)
        self.marks.pop(key, None)
        if len(self.marks) >= MAX_MARKS:
            del self.marks[next(iter(self.marks))]
        self.marks[key] = (sig, time.monotonic() + MARK_SECONDS)

    def wrote(self, node: Node, handle: Handle) -> None:
        """The guest wrote (or truncated at open) the file open as `handle`."""
        if not self.watched:
            return
        try:
            m, rel = self.router.route(self.router._parts(node))
            if m.provider in self.watched:  # before the fstat: a write to another mount costs nothing more
                self.own(m, rel, handle.fstat())
        except FsError:
            return

    def _explained(self, w: _Watched, rel: Path, now: float) -> bool:
        key = (w.mount.provider, rel)
        mark = self.marks.get(key)
        if mark is None:
            return False
        if mark[1] < now:
            del self.marks[key]
            return False
        return _looks_now(w.mount.provider, rel) == mark[0]

    # --- host events ----------------------------------------------------------------------------------

    def _readable(self, w: _Watched) -> None:
        if w.mount.provider not in self.watched:
            return
        try:
            events = w.tree.inotify.read()
        except OSError as exc:
            self._stop(w, f"reading inotify failed: {exc}")
            return
        for wd, mask, cookie, name in events:
            if mask & IN_Q_OVERFLOW:
                self._stop(w, "the kernel's inotify queue overflowed")
                return
            w.tree.event(wd, mask, cookie, name)
        w.tree.settle()
        if not w.tree.failed and len(w.tree.changes) > MAX_CHANGES:
            w.tree.fail(f"more than {MAX_CHANGES} changes at once")
        if w.tree.failed:
            self._stop(w, w.tree.failed)
        elif w.tree.changes and self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        if self._closed:
            return
        transport = self._writer.transport if self._writer is not None else None
        if transport is not None and transport.get_write_buffer_size() > MAX_BACKLOG:
            self._stop_all("the guest is not reading its notices")
            return
        now = time.monotonic()
        frames: dict[bytes, None] = {}
        again = False
        for w in self.watched.values():
            for rel, named in w.tree.take().items():
                key = (w.mount.provider, rel)
                if self._explained(w, rel, now):
                    self._looks.pop(key, None)
                elif self._looks.get(key, 0) < LOOKS:  # a guest op on it may still be under way: look again
                    self._looks[key] = self._looks.get(key, 0) + 1
                    w.tree.changes[rel] = named or w.tree.changes.get(rel, False)
                    again = True
                else:
                    self._looks.pop(key, None)
                    self._notices(w.mount, rel, named, frames)
        while self.marks and next(iter(self.marks.values()))[1] < now:
            del self.marks[next(iter(self.marks))]
        self._emit(frames)
        if again:
            self._flush_at = asyncio.get_running_loop().call_later(DELAY, self._flush)

    def _notices(self, mount: Mount, rel: Path, named: bool, frames: dict[bytes, None]) -> None:
        table = self.router
        if table.route(mount.parts + rel)[0] is not mount:
            return  # shadowed by a mount nested in this one: the guest cannot see that name
        if not rel:
            node = table.find(mount.parts)
            if node is not None:
                frames[wire.encode_notice(wire.INVAL_INODE, node.id)] = None
            return
        parent = table.find(mount.parts + rel[:-1])
        if parent is None:
            return  # the guest holds nothing there
        name = rel[-1]
        try:
            if named:
                frames[wire.encode_notice(wire.INVAL_ENTRY, parent.id, os.fsencode(name))] = None
                frames[wire.encode_notice(wire.INVAL_INODE, parent.id)] = None
        except LocalProtocolError:
            return  # a name the guest could never have looked up
        child = table.index.get((parent.id, name))
        if child is not None:
            frames[wire.encode_notice(wire.INVAL_INODE, child.id)] = None

    def _emit(self, frames: dict[bytes, None]) -> None:
        if frames and self._send is not None:
            self.sent += len(frames)
            self._send(b"".join(frames))

    # --- giving up ------------------------------------------------------------------------------------

    def _stop(self, w: _Watched, reason: str) -> None:
        log.warning("host_fs mount %s is cached for %s s from now on: %s", w.mount.path, SHORT, reason)
        self.watched.pop(w.mount.provider, None)
        self._looks = {key: n for key, n in self._looks.items() if key[0] is not w.mount.provider}
        _close(w)
        w.mount.provider.cache_seconds = SHORT
        self._invalidate_all()

    def _stop_all(self, reason: str) -> None:
        for w in list(self.watched.values()):
            self._stop(w, reason)

    def _invalidate_all(self) -> None:
        """What the guest cached long is unknown now: drop everything it holds."""
        self._emit(dict.fromkeys(invalidate_all(self.router)))


def invalidate_all(router: Router) -> list[bytes]:
    """Notice frames for every name and node the guest holds (bounded by Limits.max_nodes): its kernel
    and daemon drop all they cache of them. Also what a restored clone's new server sends first."""
    frames = []
    for parent_id, name in router.index:
        try:
            frames.append(wire.encode_notice(wire.INVAL_ENTRY, parent_id, os.fsencode(name)))
        except LocalProtocolError:
            continue
    frames.extend(wire.encode_notice(wire.INVAL_INODE, node_id) for node_id in router.nodes)
    return frames


def _looks_now(provider: Provider, rel: Path) -> Signature:
    try:
        return signature(provider.getattr(rel))
    except FsError:
        return None


def _close(w: _Watched) -> None:
    inotify = w.tree.inotify
    if inotify.fd >= 0:
        with contextlib.suppress(RuntimeError):  # no running loop: the server's loop has ended
            asyncio.get_running_loop().remove_reader(inotify.fd)
    w.tree.close()
    inotify.close()


def _walk(trees: list[_Watched]) -> None:
    for w in trees:
        w.tree.start()
