"""A hostile guest fuzzing the VFS server: seeded random request sequences over a real socketpair.

Every seed plays a few thousand requests, well-formed and not, against host_fs (read-write and
read-only), memory (nested, private, a read-only single file) and overlay mounts in `tmp_path`:
random, stale and foreign node ids and handles, extreme offsets, sizes, modes and times, names the
host must treat as data, renames and links across mounts, pipelined in small batches. After each
session it checks what a hostile guest must never achieve:

- a reply the guest's own decoder refuses, a status outside 0/-errno, or an op that failed with an
  unexpected exception (the server's "VFS <op> failed" warning: every one is a bug);
- a server that crashes (its task group would cancel this test) or hangs (the pytest timeout);
- any change, creation or read (atime) outside the mount roots, or through a symlink in them;
- any change to a read-only mount's tree or the overlay's host directory;
- node or handle tables above their limits, or anything left in them once the guest has given back
  every lookup and handle it was told about (a leak the guest can never undo);
- a malformed frame that does anything but end the channel with the protocol error.
"""

from __future__ import annotations

import asyncio
import collections
import copy as copy_module
import errno
import hashlib
import logging
import os
import random
import socket
import stat
from pathlib import Path

import pytest
from vfs_peer import Peer, serving

from matchlock.api.errors import VMError
from matchlock.api.vfs import VFSHookRule, VFSInterceptionConfig
from matchlock.vfs import snapshot as snapshot_state
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.overlay import OverlayProvider
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.server import VfsServer
from matchlock.vfs.types import FsError, Limits
from matchlock.wire import vfs as wire

pytestmark = pytest.mark.timeout(120)  # a hang detector, not a performance assertion

LIMITS = Limits(max_nodes=300, max_handles=24, max_inflight=8, memory_bytes=2 << 20)
# Odd seeds: tables so small that the guest keeps running into them (EMFILE, ENFILE, ENOSPC).
TIGHT = Limits(max_nodes=30, max_handles=5, max_inflight=4, memory_bytes=64 << 10)
SEEDS = range(5)
BATCHES = 500  # per seed; 1-6 requests each, or 40
PARKS = 0.01  # the chance after each batch that the host parks the channel
REPLY_WAIT = 60.0  # seconds: only so that a hang fails with the request it hung on

NAMES = [b"f1", b"d1", b"f2", b"d2", b"esc_rel", b"esc_abs", b"esc_dir", b"fifo", b"suid", b"new", b"n2",
         b"mem", b"\xff\xfe", "\u00e9t\u00e9".encode(), b"x" * 255, b" ", b"-", b"...", b"a\\b"]  # fmt: skip
# Ops that reach files (and handles) more often than the rest.
OPS = sorted(wire.ARGS)
WEIGHTS = [{wire.Op.LOOKUP: 3, wire.Op.SETATTR: 3, wire.Op.OPEN: 2, wire.Op.READ: 2, wire.Op.WRITE: 2,
            wire.Op.CREATE: 2, wire.Op.RELEASE: 2}.get(op, 1) for op in OPS]  # fmt: skip
BAD_NAMES = [b"", b".", b"..", b"a/b", b"/", b"a\x00b", b"y" * 256]
U64 = (1 << 64) - 1


def make_tree(root: Path, canary: Path) -> None:
    root.mkdir()
    (root / "f1").write_bytes(b"one" * 1000)
    (root / "d1" / "d2").mkdir(parents=True)
    (root / "d1" / "f2").write_bytes(b"two")
    (root / "esc_rel").symlink_to(os.path.relpath(canary / "secret", root))
    (root / "esc_abs").symlink_to(canary / "secret")
    (root / "esc_dir").symlink_to(canary)
    (root / "d1" / "up").symlink_to("../../canary")
    os.mkfifo(root / "fifo")
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o6755)


def snapshot(top: Path, *, atime: bool) -> dict[str, tuple]:
    """Everything about every entry under `top` (itself included) that a write or create changes; a read
    too with `atime` (its atime is before its mtime, so relatime moves it). Our own reads are undone."""
    out: dict[str, tuple] = {}

    def visit(path: Path) -> None:
        st = os.lstat(path)
        kind, body, below = stat.S_IFMT(st.st_mode), None, []
        if kind == stat.S_IFREG:
            body = hashlib.sha256(path.read_bytes()).hexdigest()
        elif kind == stat.S_IFLNK:
            body = os.readlink(path)
        elif kind == stat.S_IFDIR:
            below = sorted(os.listdir(path))
            body = tuple(below)
        if kind in (stat.S_IFREG, stat.S_IFDIR):
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        out[str(path.relative_to(top))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                           st.st_atime_ns if atime else 0, st.st_ino, body)  # fmt: skip
        for name in below:
            visit(path / name)

    visit(top)
    return out


class World:
    """The host side of one session: trees in tmp_path, the mounts over them, what must not change."""

    def __init__(self, base: Path, *, nested: bool, secret: bool, limits: Limits = LIMITS) -> None:
        self.base, self.limits, self.secret, self.nested, self.state = base, limits, secret, nested, base / "state"
        canary = base / "canary"
        canary.mkdir()
        (canary / "secret").write_bytes(b"canary")
        (base / "canary_file").write_bytes(b"next to the roots")
        for name in ("rw", "ro", "lower", "own"):
            make_tree(base / name, canary)
        (base / "one.txt").write_bytes(b"a single shared file")
        self.state.mkdir()
        self.mounts = self.fresh_mounts("ov")
        old = 1_000_000_000_000_000_000  # atime before mtime: a read (relatime) would move it
        for path in (canary / "secret", base / "canary_file", canary):
            os.utime(path, ns=(old, old + 10**9))
        self.outside = self.outside_now()
        self.frozen = {name: snapshot(base / name, atime=False) for name in ("ro", "lower")}

    def fresh_mounts(self, upper: str) -> list[Mount]:
        """The session's mounts, built afresh over the same host trees (an overlay upper of its own)."""
        base, limits = self.base, self.limits
        mounts = [
            Mount("/ws", HostFSProvider(str(base / "rw"))),
            Mount("/ro", HostFSProvider(str(base / "ro"), readonly=True), readonly=True),
            Mount("/scratch", MemoryProvider(limits)),
        ]
        if not self.nested:  # a host_fs of one file, and one with fixed owners
            mounts.append(Mount("/one", HostFSProvider(str(base / "one.txt"))))
            mounts.append(Mount("/own", HostFSProvider(str(base / "own"), owner_uid=1000, owner_gid=1000)))
        if self.secret:  # a sandbox holding one is never snapshotted (sandbox/snapshots.py)
            mounts.append(Mount("/secret", MemoryProvider.single_file(b"s3cret", 0o4755, 0, 0, limits), readonly=True))
        if self.nested:  # a memory mount inside host_fs (synthesized parents), and a host-side overlay
            mounts.append(Mount("/ws/deep/mem", MemoryProvider(limits)))
            mounts.append(Mount("/ov", OverlayProvider(str(base / "lower"), str(self.state / "vfs" / upper))))
        return mounts

    def outside_now(self) -> tuple:
        entries = tuple(sorted(p.name for p in self.base.iterdir()))
        return entries, snapshot(self.base / "canary", atime=True), snapshot(self.base / "canary_file", atime=True)

    def check(self) -> None:
        assert self.outside_now() == self.outside, "something outside the mount roots changed or was read"
        for name, before in self.frozen.items():
            assert snapshot(self.base / name, atime=False) == before, f"the host tree {name} changed"
        for m in self.mounts:
            if m.path == "/secret":
                secret = m.provider
                assert isinstance(secret, MemoryProvider)
                assert (bytes(secret.root.data), secret.root.mode) == (b"s3cret", stat.S_IFREG | 0o4755), m.path


class Model:
    """What the hostile guest knows: node ids (with the lookups it holds), handles, names per directory."""

    def __init__(self, rng: random.Random, hello: wire.HelloReply) -> None:
        self.rng = rng
        self.roots = [m.root for m in hello.mounts]
        self.nodes: list[int] = list(self.roots)
        self.dirs: set[int] = set(self.roots)
        self.held: collections.Counter[int] = collections.Counter()
        self.forgotten: list[int] = []
        self.fhs: dict[int, int] = {}  # fh -> node
        self.stale_fhs: list[int] = []
        self.children: dict[int, set[bytes]] = collections.defaultdict(set)

    # --- choices ----------------------------------------------------------------------------------------

    def node(self) -> int:
        r = self.rng.random()
        if r < 0.08 and self.forgotten:
            return self.rng.choice(self.forgotten)
        if r < 0.13:
            return self.rng.choice([1, 2, self.rng.randrange(2, 1 << 12), self.rng.randrange(2, U64), U64])
        if r < 0.45:
            return self.rng.choice(sorted(self.dirs))
        return self.rng.choice(self.nodes)

    def fh(self) -> int:
        r = self.rng.random()
        if r < 0.1 and self.stale_fhs:
            return self.rng.choice(self.stale_fhs)
        if r < 0.15 or not self.fhs:
            return self.rng.choice([0, 1, self.rng.randrange(1, 100), U64])
        return self.rng.choice(sorted(self.fhs))

    def node_fh(self) -> tuple[int, int]:
        """A handle and its own node mostly; a foreign node sometimes."""
        fh = self.fh()
        if fh in self.fhs and self.rng.random() < 0.7:
            return self.fhs[fh], fh
        return self.node(), fh

    def name(self, parent: int) -> bytes:
        known = self.children.get(parent)
        if known and self.rng.random() < 0.5:
            return self.rng.choice(sorted(known))
        return self.rng.choice(NAMES)

    def offset(self) -> int:
        return self.rng.choice([0, 0, 1, 3, 4096, self.rng.randrange(1 << 20), (1 << 62) + 5, (1 << 63) - 1,
                                1 << 63, U64, self.rng.randrange(U64)])  # fmt: skip

    def io_size(self) -> int:
        return self.rng.choice([0, 1, 100, 4096, 65536, wire.MAX_IO])

    def mode(self, kinds: bool = False) -> int:
        perm = self.rng.choice([0o644, 0o755, 0o7777, 0o4755, 0o2755, 0, self.rng.randrange(1 << 12)])
        if not kinds:
            return perm | self.rng.choice([0, 0, stat.S_IFREG, stat.S_IFDIR])
        kind = self.rng.choice([stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK,
                                stat.S_IFDIR, stat.S_IFLNK, 0, 0o170000])  # fmt: skip
        return kind | perm

    def time_ns(self) -> int:
        return self.rng.choice([0, -1, -2, 1_700_000_000_000_000_000, -(1 << 63), (1 << 63) - 1,
                                self.rng.randrange(-(1 << 63), 1 << 63)])  # fmt: skip

    def owner(self) -> int:
        return self.rng.choice([0, 1000, 65534, (1 << 32) - 1, (1 << 32) - 2, self.rng.randrange(1 << 32)])

    def flags(self) -> int:
        bits = [os.O_WRONLY, os.O_RDWR, os.O_TRUNC, os.O_APPEND, os.O_CREAT, os.O_EXCL, os.O_SYNC, wire.KILL_SUIDGID]
        flags = 0
        for bit in bits:
            if self.rng.random() < 0.2:
                flags |= bit
        return flags & ~(os.O_WRONLY if flags & os.O_RDWR else 0)

    def request(self) -> wire.Args:  # noqa: PLR0911, PLR0912 - one branch per op
        rng = self.rng
        op = rng.choices(OPS, WEIGHTS)[0]
        cls = wire.ARGS[op]
        if cls in (wire.Lookup, wire.LookupDir, wire.Unlink, wire.Rmdir):
            parent = self.node()
            return cls(parent, self.name(parent))
        if cls is wire.Forget:
            items = []
            for _ in range(rng.randint(1, 4)):
                node = self.node()
                items.append((node if node > 1 else 2, rng.choice([1, 1, 2, 1000, U64])))
            return wire.Forget(tuple(items))
        if cls in (wire.Getattr, wire.Flush, wire.Release, wire.Releasedir):
            node, fh = self.node_fh()
            return cls(node, fh if cls is not wire.Getattr or rng.random() < 0.5 else 0)
        if cls is wire.Setattr:
            valid = 0
            for bit in (1, 2, 4, 8, 16, 32, 128, 256, 1024, 2048):
                if rng.random() < 0.25:
                    valid |= bit
            node, fh = self.node_fh()
            size = rng.choice([0, 1, 10, 5000, 1 << 30, (1 << 63) - 1, 1 << 63, U64])
            return wire.Setattr(node, valid, fh if rng.random() < 0.5 else 0, size, self.time_ns(), self.time_ns(),
                                self.mode(), self.owner(), self.owner())  # fmt: skip
        if cls in (wire.Readlink, wire.Statfs):
            return cls(self.node())
        if cls is wire.Symlink:
            parent = self.node()
            target = rng.choice([b"../canary/secret", b"/etc/passwd", b"f1", b"../" * 50, b"t" * 4095])
            return wire.Symlink(parent, self.name(parent), target)
        if cls is wire.Mknod:
            parent = self.node()
            return wire.Mknod(parent, self.mode(kinds=True), rng.choice([0, 0x0103, U64 >> 32]), self.name(parent))
        if cls is wire.Mkdir:
            parent = self.node()
            return wire.Mkdir(parent, self.mode(), self.name(parent))
        if cls is wire.Rename:
            parent, newparent = self.node(), self.node()
            return wire.Rename(parent, newparent, rng.choice([0, 0, 1, 2, 3]), self.name(parent), self.name(newparent))
        if cls is wire.Link:
            newparent = self.node()
            return wire.Link(self.node(), newparent, self.name(newparent))
        if cls in (wire.Open, wire.Opendir):
            return cls(self.node(), self.flags() & (wire.OPEN_FLAG_MASK if cls is wire.Opendir else U64))
        if cls is wire.Create:
            parent = self.node()
            return wire.Create(parent, self.flags(), self.mode(), self.name(parent))
        if cls is wire.Read:
            node, fh = self.node_fh()
            return wire.Read(node, fh, self.offset(), self.io_size())
        if cls is wire.Write:
            node, fh = self.node_fh()
            data = rng.choice([b"", b"w", b"hostile" * 100, bytes(70_000)])
            return wire.Write(node, fh, self.offset(), self.flags(), data)
        if cls is wire.Fsync:
            node, fh = self.node_fh()
            return wire.Fsync(node, fh, rng.randrange(3))
        if cls is wire.Readdir:
            node, fh = self.node_fh()
            cookie = rng.choice([0, 0, 1, 2, 3, 7, 1 << 40, U64])
            return wire.Readdir(node, fh, cookie, rng.choice([0, 1, 80, 4096, wire.MAX_IO]), rng.randrange(2))
        if cls is wire.OpendirRead:
            return wire.OpendirRead(self.node(), rng.choice([0, 0, 2, 5, U64]), rng.choice([0, 200, 4096]),
                                    rng.randrange(2))  # fmt: skip
        if cls is wire.Hello:
            return wire.Hello(rng.choice([wire.VERSION, 0, 99]), rng.choice([4096, wire.MAX_IO]), wire.FEATURES_ALL)
        assert cls is wire.Parked
        return wire.Parked(rng.randrange(1, 4))

    # --- what the replies taught the guest ----------------------------------------------------------------

    def entry(self, parent: int | None, name: bytes | None, entry: wire.Entry | None) -> None:
        if entry is None:
            return
        self.held[entry.node] += 1
        if entry.node not in self.nodes:
            self.nodes.append(entry.node)
        if stat.S_ISDIR(entry.attr.mode):
            self.dirs.add(entry.node)
        if parent is not None and name is not None:
            self.children[parent].add(name)

    def learn(self, args: wire.Args, result: wire.Result) -> None:
        parent = getattr(args, "newparent", getattr(args, "parent", getattr(args, "node", None)))
        name = getattr(args, "newname", getattr(args, "name", None))
        if isinstance(result, wire.Entry):
            self.entry(parent, name, result)
        elif isinstance(result, wire.Created):
            self.entry(parent, name, result.entry)
            self.fhs[result.fh] = result.entry.node
        elif isinstance(result, wire.Opened):
            self.fhs[result.fh] = args.node
        elif isinstance(result, (tuple, wire.DirOpened, wire.Listed)):
            if isinstance(result, wire.DirOpened):
                self.fhs[result.fh] = args.node
            items = result if isinstance(result, tuple) else result.entries
            if isinstance(result, wire.Listed):  # LOOKUP's entry, or the listing of `parent` (cookies from 3)
                self.entry(parent, name, result.entry)
            for item in items:
                if item.name not in (b".", b".."):
                    self.entry(parent, item.name, item.entry)

    def gone(self, args: wire.Args) -> None:
        """A request that ends what it names, replied to or not (so the model never holds more than the host)."""
        if isinstance(args, (wire.Release, wire.Releasedir)) and args.fh in self.fhs:
            del self.fhs[args.fh]
            self.stale_fhs.append(args.fh)
        elif isinstance(args, wire.Forget):
            for node, count in args.items:
                self.held[node] -= min(count, self.held[node])
                if not self.held[node] and node in self.nodes and node not in self.roots:
                    self.nodes.remove(node)
                    self.dirs.discard(node)
                    self.forgotten.append(node)


def decoded(op: int, payload: bytes, features: int) -> wire.Result:
    """The reply as the guest's own decoder reads it (a host reply it refuses fails the test)."""
    if op == wire.Op.WRITE and features & wire.FEATURE_WRITE_ATTR and len(payload) == 4 + wire.PARENT_STRUCT.size:
        payload = payload[:4]  # without them when the file's attributes could not be read
    elif features & wire.FEATURE_PARENT_ATTR:
        payload, _ = wire.split_parent(op, payload)
    return wire.decode_result(op, payload)


BAD_FRAMES = [
    lambda rng: wire.REQUEST_HEADER.pack(wire.MAX_PAYLOAD + rng.randrange(1, 1 << 20), 5, 2, 0, 0, 0),
    lambda rng: wire.REQUEST_HEADER.pack(9, 0, wire.Op.LOOKUP, 0, 0, 0) + bytes(8) + b"\x00\x01a",  # id 0
    lambda rng: (
        wire.REQUEST_HEADER.pack(13, 7, wire.Op.LOOKUP, 0, 0, 0) + (2).to_bytes(8, "big") + b"\x00\x01a" + b"zz"
    ),  # stray bytes
    lambda rng: wire.REQUEST_HEADER.pack(8, 7, wire.Op.GETATTR, 0, 0, 0) + bytes(8),  # short
    lambda rng: wire.REQUEST_HEADER.pack(16, 7, wire.Op.GETATTR, 0, 0, 0) + bytes(16),  # node 0
    lambda rng: wire.REQUEST_HEADER.pack(1, 0, wire.Op.PARKED, 0, 0, 0) + b"\x00",
    lambda rng: wire.REQUEST_HEADER.pack(8, 0, wire.Op.PARKED, 0, 0, 0) + (1 << 60).to_bytes(8, "big"),
    lambda rng: truncated(rng),
]


def truncated(rng: random.Random) -> bytes:
    """A header and part of its payload, then the end of input (the ending closes the socket)."""
    payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    header = wire.REQUEST_HEADER.pack(len(payload) + rng.randrange(1, 100), 3, rng.randrange(256), 0, 0, 0)
    return (header + payload)[: rng.randrange(1, len(header) + len(payload) + 1)]


def bad_name_frame(rng: random.Random, root: int) -> bytes:
    name = rng.choice(BAD_NAMES)
    payload = root.to_bytes(8, "big") + len(name).to_bytes(2, "big") + name
    op = rng.choice([wire.Op.LOOKUP, wire.Op.UNLINK, wire.Op.RMDIR, wire.Op.LOOKUP_DIR])
    return wire.REQUEST_HEADER.pack(len(payload), 9, op, 0, 0, 0) + payload


def nested_hello(rng: random.Random) -> bytes:
    payload = b"[" * rng.randrange(50_000, wire.MAX_HELLO)
    return wire.REQUEST_HEADER.pack(len(payload), 9, wire.Op.HELLO, 0, 0, 0) + payload


def _paths(router: Router) -> dict[int, object]:
    out: dict[int, object] = {}
    for node in router.nodes.values():
        try:
            out[node.id] = router._parts(node)
        except FsError as exc:  # a detached node (unlinked or renamed over) that the guest still holds
            out[node.id] = exc.errno
    return out


async def clone_session(world: World, router: Router, model: Model, seed: int, caplog) -> None:
    """A full snapshot of the router the hostile guest left (its names, modes, sizes, detached nodes and
    open handles) restores into a fresh one with the same nodes and handles; a clone guest then goes on
    with what it held, against a server that took the channel over (`restored=True`)."""
    where = world.state / f"snapshot-{seed}"
    snapshot_state.save(router, where, with_nodes=True)
    copy = Router(world.fresh_mounts(f"ov-{seed}"), Interceptor(None), VfsServer.executor(), world.limits)
    snapshot_state.restore(copy, where, with_nodes=True)
    assert _paths(copy) == _paths(router)
    assert sorted(copy.handles) == sorted(router.handles)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server = VfsServer(theirs, copy, restored=True)
    await server.start()
    try:
        clone = copy_module.copy(model)
        clone.rng = random.Random(seed + 1000)
        clone.held, clone.fhs = collections.Counter(model.held), dict(model.fhs)
        clone.nodes, clone.dirs, clone.forgotten = list(model.nodes), set(model.dirs), list(model.forgotten)
        peer = Peer(ours)
        statuses: collections.Counter = collections.Counter()
        if await batches(peer, server, clone, world, BATCHES // 5, statuses, caplog):
            await give_back(peer, server, clone, seed)
        assert {op for (op, status) in statuses if status == 0} >= {wire.Op.GETATTR, wire.Op.LOOKUP}
    finally:
        await server.aclose()
        ours.close()


def vfs_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    expected = ("the guest broke the VFS protocol", "VFS: a SETATTR the guest answered itself")
    return [r.getMessage() for r in caplog.records if r.name == "matchlock.vfs" and r.levelno >= logging.WARNING
            and not r.getMessage().startswith(expected)]  # fmt: skip


async def batches(peer: Peer, server: VfsServer, model: Model, world: World, count: int,
                  statuses: collections.Counter, caplog) -> bool:  # fmt: skip
    """`count` batches of random requests, pipelined; every reply checked and learnt from. False: the
    guest broke the channel (in a park)."""
    rng, ids = model.rng, iter(range(1000, 1 << 31))
    for step in range(count):
        batch = []
        for _ in range(rng.choice([1, 2, 3, 4, 5, 6, 40])):  # 40: past max_inflight, the reader waits
            args = model.request()
            no_reply = isinstance(args, (wire.Forget, wire.Parked)) or (
                isinstance(args, (wire.Release, wire.Releasedir, wire.Setattr))
                and rng.random() < 0.3
                and (not isinstance(args, wire.Setattr) or server.features & wire.FEATURE_SETATTR_NOTICE)
            )
            request_id = 0 if no_reply else next(ids)
            if isinstance(args, wire.Parked):
                continue  # a PARKED with no PARK sent is a protocol error: the ending frames try it
            await peer.send(request_id, args, uid=rng.choice([0, 0, 1000]))
            model.gone(args)
            batch.append((request_id, args))
        for request_id, args in batch:
            if not request_id:
                continue
            async with asyncio.timeout(REPLY_WAIT):
                reply = await peer.reply(request_id)
            statuses[args._op, reply.status] += 1
            assert -4096 < reply.status <= 0 and not (reply.status and reply.payload), (args, reply)
            if reply.status == 0:
                model.learn(args, decoded(args._op, reply.payload, server.features))
        assert len(server.router.handles) <= world.limits.max_handles
        assert len(server.router.nodes) <= world.limits.max_nodes
        assert not vfs_warnings(caplog), vfs_warnings(caplog)
        if rng.random() < PARKS and not await park_round(peer, server, model, world, step):
            return False
    return True


async def park_round(peer: Peer, server: VfsServer, model: Model, world: World, step: int) -> bool:
    """The host parks the channel (a snapshot) while the hostile guest answers as it likes: PARKED
    after more requests, an old or a never-sent token, or not at all. The park completes (the router then
    saves) or raises VMError; only a never-sent token breaks the channel. False once it is broken."""
    rng = model.rng
    choice = rng.random()
    park = asyncio.ensure_future(server.park(0.3 if choice < 0.2 else REPLY_WAIT))
    while not any(wire.decode_notice(n.payload)[0] == wire.PARK for n in peer.notices if n.status == 0):
        await peer.call(wire.Statfs(model.roots[0]))  # reading replies reads the notice too
    token = server._tokens
    if choice < 0.2:
        with pytest.raises(VMError, match="did not park"):
            await park  # the guest never answers: the host gives up (and wakes it)
        await peer.send(0, wire.Parked(token))  # a late PARKED is ignored
    elif choice < 0.3:
        await peer.send(0, wire.Parked(token + rng.randint(1, 5)))  # a token never sent
        with pytest.raises(VMError, match="ended while parking"):
            await park
        assert "PARKED with token" in server.broken
        return False
    else:
        if choice < 0.5 and token > 1:
            await peer.send(0, wire.Parked(rng.randrange(1, token)))  # an old one: ignored
        await peer.call(wire.Getattr(model.node(), 0))  # still served before PARKED
        await peer.send(0, wire.Parked(token))
        await peer.send(1 << 30, wire.Statfs(model.roots[0]))  # read only after the wake
        await park
        assert not server._requests
        snapshot_state.save(server.router, world.state / f"parked-{step}", with_nodes=not world.secret)
        server.wake()
        assert (await peer.reply(1 << 30)).status == 0
    peer.notices.clear()
    return True


async def give_back(peer: Peer, server: VfsServer, model: Model, seed: int) -> None:
    """Every handle and lookup the guest was told about, given back: nothing may stay in the host's tables."""
    for fh, node in sorted(model.fhs.items()):
        await peer.call(wire.Release(node, fh))
        await peer.call(wire.Releasedir(node, fh))
    held = [(node, count) for node, count in sorted(model.held.items()) if count]
    for start in range(0, len(held), wire.MAX_FORGETS):
        await peer.send(0, wire.Forget(tuple(held[start : start + wire.MAX_FORGETS])))
    await peer.ok(wire.Statfs(model.roots[0]))  # after the FORGETs: the server read them first
    roots = {node.id for node in server.router.root_nodes}
    assert set(server.router.nodes) == roots, f"seed {seed}: nodes left after every FORGET"
    assert not server.router.handles, f"seed {seed}: handles left after every RELEASE"


async def play(
    world: World, seed: int, features: int, caplog: pytest.LogCaptureFixture, interception=None
) -> collections.Counter:
    """One seeded session; returns how often each op got each status (for the test's own sanity)."""
    rng = random.Random(seed)
    statuses: collections.Counter = collections.Counter()
    async with serving(world.mounts, features, interception, limits=world.limits) as (peer, server, hello):
        model = Model(rng, hello)
        if not await batches(peer, server, model, world, BATCHES, statuses, caplog):
            world.check()
            return statuses
        await peer.ok(wire.Statfs(model.roots[0]))  # every notice (id-0 RELEASE) read, then served:
        while server._requests:
            await asyncio.wait(set(server._requests))
        if not world.secret:
            await clone_session(world, server.router, model, seed, caplog)
        await give_back(peer, server, model, seed)
        world.check()
        # And a frame that breaks the protocol ends the channel, cleanly.
        ending = rng.choice([*BAD_FRAMES, lambda rng: bad_name_frame(rng, model.roots[0]), nested_hello])
        await asyncio.get_running_loop().sock_sendall(peer.sock, ending(rng))
        peer.sock.shutdown(socket.SHUT_WR)  # a frame the server took for a good one would end it cleanly: a failure
        async with asyncio.timeout(REPLY_WAIT):
            await server.wait()
        assert server.broken.startswith("the guest broke the VFS protocol"), server.broken
    world.check()
    return statuses


# Interception on: events for every op, and block rules (the guest must get EPERM, never a crash).
RULES = VFSInterceptionConfig(emit_events=True, rules=(
    VFSHookRule(ops=("open", "write", "truncate", "remove", "rename"), path="/ws/d1/*", action="block"),
    VFSHookRule(ops=("stat",), path="/ro/esc_*", action="block"),
    VFSHookRule(ops=("readdir", "create", "mkdir"), path="/scratch", action="block"),
))  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", ["nested-overlay", "flat-notices", "intercepted"])
async def test_hostile_request_sequences(tmp_path: Path, seed: int, variant: str, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="matchlock.vfs")
    nested = variant != "flat-notices"
    world = World(tmp_path, nested=nested, secret=variant != "nested-overlay", limits=TIGHT if seed % 2 else LIMITS)
    interception = RULES if variant == "intercepted" else None
    statuses = await play(world, seed * 3 + ["nested-overlay", "flat-notices", "intercepted"].index(variant),
                          wire.FEATURES_ALL, caplog, interception)  # fmt: skip
    # Not vacuous: the sequences reached the filesystems, not only the refusals.
    ok = {op for (op, status) in statuses if status == 0}
    assert {wire.Op.LOOKUP, wire.Op.OPEN, wire.Op.READ, wire.Op.CREATE, wire.Op.MKDIR} <= ok, sorted(ok)
    assert any(status == -errno.ESTALE for (_, status) in statuses)
    if seed % 2:
        assert {-errno.EMFILE, -errno.ENFILE} & {status for (_, status) in statuses}  # the tables filled up
