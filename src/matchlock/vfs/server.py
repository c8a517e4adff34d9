"""Host end of the `matchlock.vfs` port: decodes guest requests (`wire.vfs`) and answers from the router.

Requests are served concurrently, at most `Limits.max_inflight` at once: past that the reader stops
reading, so the guest blocks on a full port instead of growing host memory, and each request holds
at most one frame (about 1 MiB). Blocking filesystem calls run in this server's own thread pool, so
one sandbox's flood cannot take the threads of another. Replies produced in one event-loop turn go
out in one write. A frame that breaks the protocol ends the server (the guest's mounts then fail
with ENOTCONN); the sandbox goes on.

For a snapshot the channel is parked (`park`: no request or reply in flight, the router's state
final, nothing written until the wake) and woken (`wake`), or taken over by a restored clone's new
server (`restored=True`); docs/wire.md, "Parking the channel".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..api.errors import VMError
from ..wire import vfs as wire
from ..wire.boot import WAKE_SIZE
from ..wire.checkpoint import encode_wake
from ..wire.frames import LocalProtocolError, RemoteProtocolError
from .hostfs import HostFile, HostFSProvider
from .memory import MemoryProvider
from .notify import MAX_BACKLOG, invalidate_all
from .router import Router
from .types import FsError, SetAttr

log = logging.getLogger("matchlock.vfs")
READ_SIZE = 256 * 1024
THREADS = 8
MAX_CHECK_LOGS = 20  # SETATTR notices that came out otherwise, logged one by one
STATS_ENV = "MATCHLOCK_VFS_STATS"  # set: the guest daemon logs its request timings to the console


# Provider calls that are one or two syscalls on a local directory, or memory work: run on the event
# loop, they save a thread hop (~0.3 ms on a busy host) per request; host_fs lstat already runs there
# (quick_getattr). Not the overlay's (a copy-up may copy a whole file), not fsync, not big I/O.
_INLINE_METADATA = frozenset(("create", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename", "open",
                              "readlink", "statfs", "setattr"))  # fmt: skip
_INLINE_IO = 64 * 1024


def _inline(fn: object, args: tuple) -> bool:
    owner, name = getattr(fn, "__self__", None), getattr(fn, "__name__", "")
    if isinstance(owner, (HostFSProvider, MemoryProvider)) and name in _INLINE_METADATA:
        # A truncate (memory: zero-filling up to its limit) stays in the pool.
        return name != "setattr" or (isinstance(args[1], SetAttr) and args[1].size is None)
    if isinstance(owner, HostFile):
        if name in ("fstat", "close"):
            return True
        if name == "read":
            return args[1] <= _INLINE_IO
        return name == "write" and len(args[1]) <= _INLINE_IO
    return False


class _Executor(ThreadPoolExecutor):
    """The server's own pool (one sandbox's flood cannot take another's threads); see `_inline`."""

    runs_here = staticmethod(_inline)  # the router makes these calls itself, on the event loop


A = TypeVar("A", bound=wire.Args)


def _with(args: A, **changes: int) -> A:
    """A copy of the request record `args` with the fields named in `changes` replaced."""
    return type(args)(*(changes.get(name, getattr(args, name)) for name in args.__slots__))


def _setid_to_drop(mode: int) -> int:
    """The set-id bits a write, truncate or chown drops, as the kernel's VFS does (setgid only with group x)."""
    if stat.S_ISDIR(mode):
        return 0
    bits = mode & stat.S_ISUID
    if mode & stat.S_ISGID and mode & stat.S_IXGRP:
        bits |= stat.S_ISGID
    return bits


def _wake_record(new_host: bool) -> bytes:
    # The agent's port carries the clock and the RNG seed; the VFS daemon reads neither.
    return encode_wake(new_host=new_host, time_ns=time.time_ns(), seed=bytes(WAKE_SIZE))


class VfsServer:
    def __init__(self, sock: socket.socket, router: Router, *, restored: bool = False) -> None:
        """`restored`: the guest behind `sock` is a clone restored from a snapshot taken while the
        channel was parked; `router` holds that snapshot's node table (vfs.snapshot)."""
        self.sock = sock
        self.router = router
        self.restored = restored
        self.limits = router.limits
        self.broken: str = ""
        self.served = 0
        self.check_failures = 0  # SETATTR notices that failed or came out otherwise (FEATURE_SETATTR_NOTICE)
        self.notices = 0  # of those served, the ones with id 0 (no reply: RELEASE*, SETATTR notices; benchmarks)
        self.service_seconds = 0.0  # time from starting to serve a request to queueing its reply, summed (benchmarks)
        self.turnaround_seconds = 0.0  # the same from reading its frame off the socket (the event loop's share too)
        self.op_counts: collections.Counter[str] = collections.Counter()  # requests by op name (benchmarks)
        self._writer: asyncio.StreamWriter | None = None
        self._pending = bytearray()
        self._flush_scheduled = False
        self._slots = asyncio.Semaphore(self.limits.max_inflight)
        self._tasks = contextlib.AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._read_task: asyncio.Task | None = None
        self._requests: set[asyncio.Task] = set()
        self._closed = False
        self.features = 0  # the HELLO features this guest asked for and we serve
        self._tokens = 0  # the last PARK token sent (a late PARKED for it, after a timeout, is ignored)
        self._parked: asyncio.Future[None] | None = None  # PARKED for the park under way
        self._held: bytearray | None = None  # host notices held from PARK to the wake; None: not parked
        # Cleared from an accepted PARKED to the wake: a hostile guest's requests after its PARKED wait
        # unread, so they can neither change the router while it is saved nor get replies during the save.
        self._reading = asyncio.Event()
        self._reading.set()
        self._held_over = False  # too many held: the wake invalidates everything instead

    @staticmethod
    def executor() -> ThreadPoolExecutor:
        return _Executor(THREADS, thread_name_prefix="matchlock-vfs")

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self.sock, limit=READ_SIZE)
        if self.restored:
            # The guest said HELLO before the snapshot and asked for every feature it knows; the
            # same config grants the same. Its kernel and daemon then drop all they cache of nodes
            # and names this host holds: the host side may have changed since the snapshot.
            self._grant(wire.FEATURES_ALL)
            self._send(b"".join([_wake_record(True), *invalidate_all(self.router)]))
        self._group = await self._tasks.enter_async_context(asyncio.TaskGroup())
        self._read_task = self._group.create_task(self._read_loop(reader))
        self.router.notifier.start(self._notice, self._writer)

    async def park(self, timeout: float) -> None:
        """Quiesce the channel for a snapshot: send PARK, serve until the guest's PARKED, then wait for
        every request handler still running, so the router's state is final and nothing is in flight.
        Until `wake` the host writes nothing more to the port (host notices are held).

        A guest that does not park within `timeout` seconds: the channel is woken again (so a late
        park does not hang the guest) and VMError is raised; the server goes on serving."""
        if self._held is not None:
            raise VMError("the VFS channel is parked already")
        if self._writer is None or self._read_task is None or self._read_task.done() or self._closed:
            raise VMError(f"the VFS channel cannot be parked: {self.broken or 'it is not serving'}")
        deadline = asyncio.get_running_loop().time() + timeout
        self._tokens += 1
        self._parked = asyncio.get_running_loop().create_future()
        self._held, self._held_over = bytearray(), False
        self._send(wire.encode_notice(wire.PARK, self._tokens))
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.wait([self._parked, self._read_task], return_when=asyncio.FIRST_COMPLETED)
                if not self._parked.done():
                    raise VMError(f"the VFS channel ended while parking: {self.broken or 'closed'}")
                while self._requests:  # RELEASE notices and replies still being served
                    await asyncio.wait(set(self._requests))
                self._flush()
                await self._writer.drain()
        except TimeoutError:
            self._parked = None
            self.wake()
            raise VMError(f"the guest's VFS daemon did not park within {timeout:g} s") from None
        except BaseException:
            self._parked = None
            self.wake()
            raise
        self._parked = None

    def wake(self) -> None:
        """The same guest goes on after a park (the snapshot is saved): wake it, then send the host
        notices held meanwhile. Call on the server's event loop."""
        held, over = self._held, self._held_over
        if held is None:
            raise VMError("the VFS channel is not parked")
        self._held, self._held_over = None, False
        self._send(b"".join([_wake_record(False), *(invalidate_all(self.router) if over else [held])]))
        self._reading.set()

    def _notice(self, frames: bytes) -> None:
        """Host-change notices (vfs.notify): held while parked, bounded (past it: invalidate all at the wake)."""
        if self._held is None:
            self._send(frames)
        elif not self._held_over:
            if len(self._held) + len(frames) > MAX_BACKLOG:
                self._held_over = True
                self._held.clear()
            else:
                self._held += frames

    def _on_parked(self, token: int) -> None:
        if token > self._tokens:
            raise RemoteProtocolError(f"PARKED with token {token}, never sent")
        if self._parked is None or token != self._tokens:
            log.info("VFS: a late PARKED (token %d) ignored", token)  # the park timed out
            return
        if not self._parked.done():
            self._reading.clear()
            self._parked.set_result(None)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = wire.RequestDecoder()
        try:
            while True:
                data = await reader.read(READ_SIZE)
                received = time.perf_counter()
                if not data:
                    decoder.close()
                    return
                for request in decoder.feed(data):
                    await self._reading.wait()
                    await self._dispatch(request, received)
        except RemoteProtocolError as exc:
            self.broken = f"the guest broke the VFS protocol: {exc}"
            log.warning("%s", self.broken)
        except ConnectionError as exc:
            self.broken = f"VFS channel closed: {exc}"
        except Exception as exc:  # noqa: BLE001 - a bug here must end this channel, not the owner's task group
            self.broken = f"the VFS server failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.broken)
        if self.broken and self._writer is not None:
            # Hang up: the guest's daemon reads EOF and exits, so its mounts fail at once (ENOTCONN)
            # instead of every request in flight, and each made after, waiting forever.
            self._writer.close()

    async def _dispatch(self, request: wire.Request, received: float) -> None:
        checked = request.op == wire.Op.SETATTR and not request.id
        self.op_counts["SETATTR_NOTICE" if checked else wire.OP_NAMES.get(request.op, "?")] += 1
        if request.op == wire.Op.PARKED:
            assert isinstance(request.args, wire.Parked)
            self._on_parked(request.args.token)
            return
        if request.op == wire.Op.FORGET:
            assert isinstance(request.args, wire.Forget)
            self.router.forget(request.args.items)
            return
        if request.op == wire.Op.HELLO:
            assert isinstance(request.args, wire.Hello)
            self._hello(request.id, request.args)
            return
        if checked and not self.features & wire.FEATURE_SETATTR_NOTICE:
            raise RemoteProtocolError("a SETATTR with id 0 without FEATURE_SETATTR_NOTICE")
        await self._slots.acquire()  # backpressure: at most max_inflight requests held at once
        if checked:
            # The guest already answered it: served before anything read after it, so a later change
            # to the node (which its kernel may send at once) cannot run first.
            await self._serve(request, received)
            return
        assert self._group is not None
        task = self._group.create_task(self._serve(request, received))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def _hello(self, request_id: int, hello: wire.Hello) -> None:
        if hello.version != wire.VERSION:
            self._send(wire.encode_error(request_id, errno.EPROTO))
            return
        max_io = min(hello.max_io, self.limits.max_io, wire.MAX_IO)
        stats = os.environ.get(STATS_ENV, "") not in ("", "0")
        self._grant(hello.features)
        reply = wire.HelloReply(wire.VERSION, max_io, self.router.hello(), stats, self.features)
        self._send(wire.encode_reply(request_id, reply))

    def _grant(self, asked: int) -> None:
        self.features = asked & wire.FEATURES_ALL
        if self.router.interceptor.enabled:  # rules and events must see every LOOKUP, and refuse SETATTRs
            self.features &= ~(wire.FEATURE_LOOKUP_DIR | wire.FEATURE_SETATTR_NOTICE)
        if self.router.mixed_readonly():  # the guest could not tell which of its nodes answer EROFS
            self.features &= ~wire.FEATURE_SETATTR_NOTICE
        if not all(isinstance(m.provider, (HostFSProvider, MemoryProvider)) for m in self.router.mounts):
            # A notice is served in the read loop: an overlay's copy-up there would stall every request.
            self.features &= ~wire.FEATURE_SETATTR_NOTICE
        self.router.guest_opendir = bool(self.features & wire.FEATURE_GUEST_OPENDIR)
        self.router.lookup_dir = bool(self.features & wire.FEATURE_LOOKUP_DIR)

    async def _serve(self, request: wire.Request, received: float) -> None:
        started = time.perf_counter()
        try:
            try:
                frame = await self._answer(request)
            except FsError as exc:
                frame = wire.encode_error(request.id, exc.errno)
            except OSError as exc:  # a host error the provider did not translate
                frame = wire.encode_error(request.id, exc.errno or errno.EIO)
            except (LocalProtocolError, ValueError, OverflowError) as exc:
                log.warning("VFS %s failed: %s", wire.OP_NAMES.get(request.op, request.op), exc)
                frame = wire.encode_error(request.id, errno.EIO)
            except Exception as exc:  # noqa: BLE001 - a bug in one op must not end the mounts
                log.warning("VFS %s failed: %s", wire.OP_NAMES.get(request.op, request.op), type(exc).__name__)
                frame = wire.encode_error(request.id, errno.EIO)
            self.served += 1
            done = time.perf_counter()
            self.service_seconds += done - started
            self.turnaround_seconds += done - received
            if request.id:  # id 0: a notice (RELEASE answered in the guest), no reply
                self._send(frame)
            else:
                self.notices += 1
                if isinstance(request.args, wire.Setattr) and (status := wire.REPLY_HEADER.unpack_from(frame)[2]):
                    self._check_outcome(request.args, None, -status)
        finally:
            self._slots.release()

    def _check_outcome(self, args: wire.Setattr, attr: wire.Attr | None, error: int = 0) -> None:
        """A SETATTR the guest answered itself (FEATURE_SETATTR_NOTICE) failed with `error`, or left
        `attr` other than it asked (mode, owner or times): the guest's cached attributes of the node go
        (INVAL_INODE)."""
        problem = os.strerror(error) if error else ""
        if attr is not None:
            if args.valid & wire.SET_MODE and stat.S_IMODE(attr.mode) != stat.S_IMODE(args.mode):
                problem = f"mode {stat.S_IMODE(attr.mode):o}, not {stat.S_IMODE(args.mode):o}"
            elif (
                args.valid & wire.SET_UID and attr.uid != args.uid or args.valid & wire.SET_GID and attr.gid != args.gid
            ):
                problem = f"owner {attr.uid}:{attr.gid}, not {args.uid}:{args.gid}"
            elif args.valid & wire.SET_ATIME and attr.atime_ns != args.atime_ns:
                problem = f"atime {attr.atime_ns} ns, not {args.atime_ns}"  # e.g. a coarser host filesystem
            elif args.valid & wire.SET_MTIME and attr.mtime_ns != args.mtime_ns:
                problem = f"mtime {attr.mtime_ns} ns, not {args.mtime_ns}"
        if not problem:
            return
        self.check_failures += 1
        if self.check_failures <= MAX_CHECK_LOGS:  # a hostile guest must not flood the host's log
            log.warning("VFS: a SETATTR the guest answered itself came out otherwise here (%s): its attributes "
                        "of node %d are dropped%s", problem, args.node,
                        "; further ones are not logged" if self.check_failures == MAX_CHECK_LOGS else "")  # fmt: skip
        if args.node == wire.ROOT_ALIAS:
            return  # the guest's own alias of its FUSE root, never a host node: no notice can name it
        transport = self._writer.transport if self._writer is not None else None
        if transport is None or transport.get_write_buffer_size() <= MAX_BACKLOG:  # else the guest is not reading
            self._notice(wire.encode_notice(wire.INVAL_INODE, args.node))

    async def _answer(self, request: wire.Request) -> bytes:
        args = request.args
        if self.features & wire.FEATURE_KILLPRIV:
            result = await self._with_killpriv(request)
        else:
            result = await self.router.handle(request)
        parent = None
        if self.features & wire.FEATURE_PARENT_ATTR and request.op in wire.PARENT_OPS:
            # The directory changed: its new attributes let the guest answer the GETATTR and the
            # mkdir -p revalidations that follow from its cache instead of a round trip each.
            node = args.newparent if isinstance(args, wire.Link) else getattr(args, "parent", 0)
            parent = await self._attr_or_none(request, node, 0)
        elif self.features & wire.FEATURE_WRITE_ATTR and isinstance(args, wire.Write):
            # The file's new size and times: tar's chown and chmod after it are then answered in the guest.
            parent = await self._attr_or_none(request, args.node, args.fh)
        if not request.id and isinstance(args, wire.Setattr) and isinstance(result, wire.AttrReply):
            self._check_outcome(args, result.attr)
        return wire.encode_reply(request.id, result, parent)

    async def _attr_or_none(self, request: wire.Request, node: int, fh: int) -> wire.AttrReply | None:
        ask = wire.Request(0, wire.Op.GETATTR, request.uid, request.gid, request.pid, wire.Getattr(node, fh))
        try:
            got = await self.router.handle(ask)
        except FsError:  # e.g. a stat block rule on the directory: the guest just asks again itself
            return None
        return got if isinstance(got, wire.AttrReply) else None

    async def _with_killpriv(self, request: wire.Request) -> wire.Result:
        """Serve `request`, dropping set-id bits where the guest kernel leaves that to us (KILLPRIV_V2):
        on chown, and on a write, truncate or O_TRUNC open by a caller without CAP_FSETID (KILL flags).
        The drop is a chmod through the router, as the guest kernel itself would have sent it."""
        args = request.args
        kill = False
        if isinstance(args, wire.Setattr):
            kill = bool(args.valid & (wire.SET_UID | wire.SET_GID) or args.valid & wire.SET_KILL_SUIDGID
                        and args.valid & wire.SET_SIZE) and not args.valid & wire.SET_MODE  # fmt: skip
            if args.valid & wire.SET_KILL_SUIDGID:
                args = _with(args, valid=args.valid & ~wire.SET_KILL_SUIDGID)
        elif isinstance(args, (wire.Write, wire.Open, wire.Create)) and args.flags & wire.KILL_SUIDGID:
            # Not for CREATE: every provider's create makes a new file, which keeps the mode it was made
            # with (as on a local filesystem: O_TRUNC of a file just created truncates nothing). Not for an
            # OPEN without O_TRUNC, which changes nothing (the guest kernel sends the flag only with it).
            kill = isinstance(args, wire.Write) or isinstance(args, wire.Open) and bool(args.flags & os.O_TRUNC)
            args = _with(args, flags=args.flags & ~wire.KILL_SUIDGID)
        if args is not request.args:
            request = wire.Request(request.id, request.op, request.uid, request.gid, request.pid, args)
        result = await self.router.handle(request)
        if not kill:
            return result
        try:
            return await self._kill_setid(request, args, result)
        except Exception:  # (cancelled: the server is closing, and closes every handle itself)
            if isinstance(result, wire.Opened) and isinstance(args, wire.Open):  # the guest never gets this handle
                release = wire.Release(args.node, result.fh)
                with contextlib.suppress(FsError):
                    await self.router.handle(wire.Request(0, wire.Op.RELEASE, request.uid, request.gid, 0, release))
            raise

    async def _kill_setid(self, request: wire.Request, args: wire.Args | None, result: wire.Result) -> wire.Result:
        """After `result` of `args`: drop the node's set-id bits with a chmod, as KILLPRIV_V2 leaves to us."""
        if isinstance(result, wire.AttrReply) and isinstance(args, wire.Setattr):
            node, fh, mode = args.node, args.fh, result.attr.mode
        elif isinstance(args, (wire.Write, wire.Open)):
            node = args.node
            fh = result.fh if isinstance(result, wire.Opened) else args.fh if isinstance(args, wire.Write) else 0
            got = await self._attr_or_none(request, node, fh)
            if got is None:
                return result
            mode = got.attr.mode
        else:
            return result
        drop = _setid_to_drop(mode)
        if not drop:
            return result
        chmod = wire.Setattr(node, wire.SET_MODE, fh, 0, 0, 0, mode & ~drop & 0o7777, 0, 0)
        changed = await self.router.handle(
            wire.Request(0, wire.Op.SETATTR, request.uid, request.gid, request.pid, chmod)
        )
        return changed if isinstance(result, wire.AttrReply) else result

    def _send(self, frame: bytes) -> None:
        self._pending += frame
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and self._writer is not None and not self._writer.is_closing():
            self._writer.write(bytes(self._pending))
        self._pending.clear()

    async def wait(self) -> None:
        """Until the guest closes the channel or breaks the protocol."""
        if self._read_task is not None:
            await asyncio.wait([self._read_task])

    async def aclose(self) -> None:
        """Stop reading, cancel requests in flight, close the socket and the router's files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._read_task is not None:
                self._read_task.cancel()
            for task in list(self._requests):
                task.cancel()
            await self._tasks.aclose()
        finally:
            if self._writer is not None:
                self._writer.close()
            else:
                self.sock.close()
            # Threads still in a provider call finish before the provider's files close under them.
            await asyncio.to_thread(self.router.executor.shutdown, True, cancel_futures=True)
            self.router.close()
