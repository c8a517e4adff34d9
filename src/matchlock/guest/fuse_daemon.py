"""The guest's FUSE daemon: serves the host's mounts over the VFS port, many requests in flight.

Started by init at boot when the `matchlock.vfs` port exists (`start`), before the agent, as a child
of PID 1 in the root PID namespace, so workloads (each in its own PID namespace) can neither see,
signal nor ptrace it, as with the agent. It says HELLO, mounts every mount point the host lists
(creating missing ones on the overlay root), waits until the kernel has INIT-ed each, and only then
tells init it is ready; init starts the agent after that, so no command ever runs before the mounts
exist. A failure before ready is reported to init, which stops the boot with FATAL.

Threads, no global lock around a round trip: one per mount reads /dev/fuse and forwards each
request at once; one reads the host's replies and writes each to /dev/fuse as it arrives. The only
lock serialises writes to the port, one frame at a time. The mount threads' notices (no reply: RELEASE,
FORGET, SETATTRs answered here) wait for the next frame and go in one write with it; a mount thread
sends what waits before it waits for its kernel, so a notice never waits for long.

For a snapshot the host parks the channel (docs/wire.md, "Parking the channel"): after its PARK
notice no mount thread forwards anything (each waits at `Channel.forward` with what it read), the
reply thread handles replies until none is pending, sends PARKED and then accepts only the wake
record. A wake for a new host (a restored clone) first empties every translator's caches.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import sys
import threading
import time

from ..wire import vfs
from ..wire.checkpoint import decode_wake
from ..wire.frames import RemoteProtocolError
from . import fuse, fuse_overlay, syscalls

READY = b"ok"
READY_TIMEOUT = 60.0
# /dev/fuse needs room for the largest WRITE plus its headers.
FUSE_BUFFER = vfs.MAX_IO + 64 * 1024
PORT_BUFFER = 256 * 1024
MAX_DEFERRED = 64 * 1024  # notices waiting for the next frame, at most
HELLO_ID = 1
_PARK_KIND = bytes((vfs.PARK,))  # a notice payload's first byte
FUSE_DEVICE = "/dev/fuse"


def log(message: str) -> None:
    os.write(2, f"matchlock-vfs: {message}\n".encode())


class Stats:
    """Per-request timings, logged to the console every few seconds (when the host's HELLO asks for it).

    For each forwarded request: `request` is from reading it off /dev/fuse to its frame being ready
    to send, `send` the port write, `wait` from then until its reply was read (the channel both ways
    and the host), `reply` from then until the reply is ready for /dev/fuse, `write` writing it there
    (which may include the woken caller's own run on the one vCPU).
    """

    INTERVAL_NS = 5_000_000_000

    def __init__(self) -> None:
        self.sent: dict[int, list[int]] = {}  # id -> [read, framed, sent]
        self.count = self.request_ns = self.send_ns = self.wait_ns = self.reply_ns = self.write_ns = 0
        self.batches = 0
        self._logged = time.perf_counter_ns()

    def done(self, request_id: int, got: int, ready: int) -> None:
        read, framed, sent = self.sent.pop(request_id, None) or (got, got, got)
        sent = sent or framed  # the reply came before the sender noted the end of its write
        self.count += 1
        self.request_ns += framed - read
        self.send_ns += sent - framed
        self.wait_ns += got - sent
        self.reply_ns += ready - got
        self.write_ns += time.perf_counter_ns() - ready

    def maybe_log(self) -> None:
        now = time.perf_counter_ns()
        if now - self._logged < self.INTERVAL_NS or not self.count:
            return
        self._logged = now
        n = self.count
        log(
            f"stats at {time.monotonic():.0f} s: {n} requests in {self.batches} port reads; per request: "
            f"request {self.request_ns / n / 1e3:.0f} us, send {self.send_ns / n / 1e3:.0f} us, "
            f"wait {self.wait_ns / n / 1e3:.0f} us, reply {self.reply_ns / n / 1e3:.0f} us, "
            f"write {self.write_ns / n / 1e3:.0f} us"
        )
        self.count = self.request_ns = self.send_ns = self.wait_ns = self.reply_ns = self.write_ns = 0
        self.batches = 0


class Channel:
    """The client end of the VFS port: request ids, pending replies, one writer at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._write_lock = threading.Lock()
        self._deferred = bytearray()  # notices waiting for the next frame (`send`)
        self._id_lock = threading.Lock()
        self._next_id = HELLO_ID
        # None marks a synchronous call (setup), answered before the reply thread runs.
        self.pending: dict[int, tuple[Mount, fuse.Pending] | None] = {}
        self.decoder = vfs.ReplyDecoder()
        self._buffer = bytearray(PORT_BUFFER)
        self._view = memoryview(self._buffer)
        self._readable = select.poll()
        self._readable.register(fd, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(fd, select.POLLOUT)
        self.stats: Stats | None = None
        self.features = 0  # the HELLO features the host serves
        # The mount threads forwarding right now (`forward`), so PARKED goes out with none of theirs
        # half sent. Not a lock around each forward: under emulation that doubled the cost of every
        # request (a first `git status` in a mount 6 s -> 12 s, bench_vfs).
        self._forwarding: set[Mount] = set()
        self._gate = threading.Lock()  # parking, parked and the wait for the wake
        self._woken = threading.Condition(self._gate)
        self.parking = 0  # the token of the host's PARK being answered; 0: not parking
        self.parked = False  # PARKED sent: only the wake record may come now

    def _new_id(self, entry: tuple[Mount, fuse.Pending] | None) -> int:
        with self._id_lock:
            while True:
                self._next_id = self._next_id % vfs.MAX_ID + 1
                if self._next_id not in self.pending:
                    self.pending[self._next_id] = entry
                    return self._next_id

    def send(self, frame: bytes, defer: bool = False) -> None:
        """Write `frame` to the port after any deferred ones. `defer`: a notice that waits for the next
        frame or `flush` instead (the mount threads' notices, flushed before a mount thread waits for
        the kernel), so several go in one write: each write costs ~0.2 ms of the one vCPU under emulation."""
        # The port is non-blocking: a blocking write to a virtio port spins the vCPU until the host
        # has taken the buffer, which under emulation stalls every other guest thread meanwhile.
        with self._write_lock:
            if self._deferred or defer:
                self._deferred += frame
                if defer and len(self._deferred) < MAX_DEFERRED:
                    return
                frame = bytes(self._deferred)
                self._deferred.clear()
            view = memoryview(frame)
            while view:
                try:
                    view = view[os.write(self.fd, view) :]
                except BlockingIOError:
                    self._writable.poll()

    def request(self, mount: Mount, action: fuse.Action, started: int = 0) -> None:
        assert action.pending is not None
        request_id = self._new_id((mount, action.pending))
        if action.wire is not None:  # the translator's ready payload (the hottest ops)
            op, payload = action.wire
            fixed, data = payload if isinstance(payload, tuple) else (payload, b"")  # a WRITE's data apart
            header = vfs.REQUEST_HEADER.pack(len(fixed) + len(data), request_id, op, action.uid, action.gid, action.pid)
            frame = b"".join((header, fixed, data))
        else:
            assert action.args is not None
            frame = vfs.encode_request(request_id, action.uid, action.gid, action.pid, action.args)
        if self.stats is None:
            self.send(frame)
            return
        times = self.stats.sent[request_id] = [started, time.perf_counter_ns(), 0]  # before the reply can come
        self.send(frame)
        times[2] = time.perf_counter_ns()

    @property
    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def flush(self) -> None:
        if self._deferred:
            self.send(b"")

    def notify_wire(self, action: fuse.Action, defer: bool = False) -> None:
        """A request the translator answered itself (`action.wire` without `pending`): id 0, no reply."""
        assert action.wire is not None
        op, payload = action.wire
        assert isinstance(payload, bytes)
        self.send(vfs.REQUEST_HEADER.pack(len(payload), 0, op, action.uid, action.gid, action.pid) + payload, defer)

    def notify(self, notice: vfs.Args, defer: bool = False) -> None:
        """A request that gets no reply (id 0): FORGET, RELEASE, RELEASEDIR."""
        if isinstance(notice, (vfs.Release, vfs.Releasedir)):  # one per close: packed directly
            body = notice._fixed.pack(notice.node, notice.fh)
            self.send(vfs.REQUEST_HEADER.pack(len(body), 0, notice._op, 0, 0, 0) + body, defer)
            return
        self.send(vfs.encode_request(0, 0, 0, 0, notice), defer)

    def read(self) -> list[vfs.Reply]:
        """Wait for replies and return every one that is complete, reading until a frame boundary.

        A virtio port read returns at most one 4 KiB buffer. At a frame boundary one poll waits for
        the next reply (no failed read first); inside a frame, such as a 1 MiB READ reply, reads go
        back to back and only an empty port costs a poll. Each syscall is dear under emulation.
        """
        replies: list[vfs.Reply] = []
        while True:
            if not self.decoder.pending:
                if replies:
                    return replies
                self._readable.poll()
            try:
                count = os.readv(self.fd, [self._view])
            except BlockingIOError:
                self._readable.poll()
                continue
            if not count:
                raise EOFError("the host closed the VFS port")
            replies += self.decoder.feed(self._view[:count].tobytes())

    def forward(self, mount: Mount, action: fuse.Action, started: int) -> None:
        """A mount thread's action (`act`); what it sends the host waits while the channel is parked.
        Not for the reply thread, which must go on reading replies while parking."""
        if not action.notices and action.pending is None and action.wire is None:
            act(self, mount, action, started)
            return
        # Announce, then look: the reply thread sets `parking` before it looks at `_forwarding`, so
        # either it sees this thread busy, or this thread sees it parking (set add/discard and the
        # attribute reads are atomic under the GIL).
        while True:
            self._forwarding.add(mount)
            if not self.parking:
                break
            self._forwarding.discard(mount)
            with self._gate:
                while self.parking:
                    self._woken.wait()
        try:
            act(self, mount, action, started)
        finally:
            self._forwarding.discard(mount)
        if self.parking:  # it began meanwhile: what this sent may have been the last thing in the way
            self.settle_park()

    def park_frame(self, reply: vfs.Reply, mounts: list[Mount]) -> None:
        """The reply thread got the host's PARK notice or a wake record (`WAKE_STATUS`)."""
        if reply.status != vfs.WAKE_STATUS:
            _, token, _ = vfs.decode_notice(reply.payload)
            if self.parking:
                raise RemoteProtocolError("a PARK while the channel is parked")
            with self._gate:
                self.parking = token
            return
        if not self.parking:
            raise RemoteProtocolError("a wake record while the channel is not parked")
        try:
            new_host, _, _ = decode_wake(reply.payload)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from None
        if new_host:  # a restored clone: nothing this daemon cached from the old host holds
            for served in mounts:
                for forget in served.translator.reset_for_new_host():
                    self.notify(forget)  # lookups held for listings, given back to the new host
        with self._gate:
            self.parking, self.parked = 0, False
            self._woken.notify_all()

    def settle_park(self) -> None:
        """While parking, after each batch of replies and after a mount thread's forward: once nothing
        is pending or being forwarded, PARKED, once (a host that gave up on the park may wake the
        channel before)."""
        with self._gate:  # no mount thread is forwarding, and none will until the wake
            if self.parked or not self.parking or self.pending or self._forwarding:
                return
            self.parked = True
            token = self.parking
        self.notify(vfs.Parked(token))

    def call(self, args: vfs.Args) -> object:
        """One synchronous request, before the reply thread runs (HELLO and the root GETATTRs)."""
        request_id = self._new_id(None)
        self.send(vfs.encode_request(request_id, 0, 0, os.getpid(), args))
        while True:
            for reply in self.read():
                if reply.id == vfs.NOTICE_ID:
                    continue  # about a cache no mount has yet
                if reply.id != request_id:
                    raise RemoteProtocolError(f"reply to unknown request {reply.id}")
                del self.pending[request_id]
                if reply.status:
                    raise OSError(-reply.status, f"{type(args).__name__.upper()}: {os.strerror(-reply.status)}")
                return vfs.decode_result(args._op, reply.payload)


class Mount:
    """One FUSE connection: the mount point, its /dev/fuse descriptor and its translator."""

    def __init__(self, info: vfs.Mount, fd: int, max_io: int, features: int = 0) -> None:
        self.info = info
        self.fd = fd
        self.translator = fuse.MountTranslator(
            info.root, max_io=max_io, negative_valid_ns=info.negative_valid_ns, features=features
        )
        self.initialized = threading.Event()

    def write(self, buffers: list[bytes]) -> None:
        try:
            os.writev(self.fd, buffers)
        except FileNotFoundError:
            pass  # the request was interrupted and the kernel no longer waits for it
        except OSError as exc:
            if exc.errno != errno.ENODEV:  # unmounted
                raise

    def notify_kernel(self, notice: bytes) -> None:
        try:
            os.write(self.fd, notice)
        except OSError as exc:  # ENOENT: not cached (or another mount's node); ENOTDIR: no longer a directory
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENODEV):
                log(f"a cache notice failed: {exc}")


class Notices:
    """Host notices (a host_fs directory changed), and the translators' own after a reply, written to
    /dev/fuse by their own thread.

    Not by the reply thread: a notify write waits for the inode and page locks that an in-flight
    request holds, and that request ends only when the reply thread writes its reply.
    """

    def __init__(self) -> None:
        self.mounts: list[Mount] = []
        self._queue: list[tuple[int, int, bytes]] = []
        self._own: list[tuple[Mount, bytes]] = []  # the translators' own (after_reply), one mount each
        self._ready = threading.Condition()

    def put(self, payload: bytes) -> None:
        """A notice read off the port (the reply thread): the translators drop what it names now, before
        the replies behind it are handled (a listing or a leave to open a directory the host decided
        before it is not kept: fuse_cache, fuse_dirs); the kernel is told on the notices' thread."""
        notice = kind, node, name = vfs.decode_notice(payload)
        for mount in self.mounts:
            if kind == vfs.INVAL_ENTRY:
                mount.translator.drop_absent(node, name)
            else:
                mount.translator.drop_node(node)
        with self._ready:
            self._queue.append(notice)
            self._ready.notify()

    def kernel(self, mount: Mount, notice: bytes) -> None:
        """A notice of the translator's own after a reply (the reply thread), for this thread to write."""
        with self._ready:
            self._own.append((mount, notice))
            self._ready.notify()

    def serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._own:
                    self._ready.wait()
                batch, self._queue = self._queue, []
                own, self._own = self._own, []
            for mount, notice in own:
                mount.notify_kernel(notice)
            for kind, node, name in dict.fromkeys(batch):  # a notice repeated in one batch: once
                for mount in self.mounts:
                    if mount.initialized.is_set():
                        self._write(mount, kind, node, name)

    @staticmethod
    def _write(mount: Mount, kind: int, node: int, name: bytes) -> None:
        nodeid = fuse.ROOT_ID if node == mount.info.root else node
        if kind == vfs.INVAL_ENTRY:
            notice = fuse.inval_entry_notice(nodeid, name)
        else:
            notice = fuse.inval_inode_notice(nodeid)
        mount.notify_kernel(notice)


def _fatal_on_error(target, *args) -> None:
    """Run a daemon thread; if it fails, end the daemon so the mounts fail fast (ENOTCONN), not hang."""
    try:
        target(*args)
    except BaseException as exc:  # noqa: BLE001
        log(f"FATAL: {type(exc).__name__}: {exc}")
        os._exit(1)


def serve_mount(channel: Channel, mount: Mount) -> None:
    buffer = bytearray(FUSE_BUFFER)
    view = memoryview(buffer)
    queued = select.poll()
    queued.register(mount.fd, select.POLLIN)
    while True:
        if channel.has_deferred and not queued.poll(0):
            channel.flush()  # this thread may wait now: notices never wait with it
        try:
            count = os.readv(mount.fd, [buffer])
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                continue
            if exc.errno == errno.ENODEV:
                return  # unmounted
            raise
        if not count:
            return  # /dev/fuse never reads empty; treat it as the connection going away
        stats, started = channel.stats, 0
        if stats is not None:
            started = time.perf_counter_ns()
        channel.forward(mount, mount.translator.handle(view[:count]), started)


def act(channel: Channel, mount: Mount, action: fuse.Action, started: int = 0) -> None:
    """Do what the translator said: the reply to the kernel, the notices, the request to the host."""
    if action.wire is not None and action.pending is None:
        channel.notify_wire(action, defer=True)  # answered here: on the port before anything sent after
    if action.reply is not None:
        mount.write([action.reply])
        if mount.translator.initialized and not mount.initialized.is_set():
            mount.initialized.set()
    for notice in action.notices:
        channel.notify(notice, defer=True)
    if action.pending is not None:
        channel.request(mount, action, started)


def serve_replies(channel: Channel, notices: Notices | None = None) -> None:
    mounts = notices.mounts if notices is not None else []
    while True:
        replies = channel.read()
        stats = channel.stats
        got = 0
        if stats is not None:
            got = time.perf_counter_ns()
            stats.batches += 1
        for reply in replies:
            if reply.id == vfs.NOTICE_ID:
                if reply.status or reply.payload[:1] == _PARK_KIND:
                    channel.park_frame(reply, mounts)
                elif channel.parking:  # the host holds its notices from PARK to the wake
                    raise RemoteProtocolError("a host notice while the channel is parked")
                elif notices is not None:
                    notices.put(reply.payload)
                continue
            entry = channel.pending.pop(reply.id, None)
            if entry is None:
                raise RemoteProtocolError(f"reply to unknown request {reply.id}")
            mount, pending = entry
            buffers, forget = mount.translator.complete(pending, reply.status, reply.payload)
            ready = time.perf_counter_ns() if stats is not None else 0
            mount.write(buffers)
            if stats is not None:
                stats.done(reply.id, got, ready)
            if (after := mount.translator.after_reply(pending, reply.status)) is not None:
                if notices is None:
                    mount.notify_kernel(after)
                else:  # not here: it may wait for a page lock held by a READ whose reply is behind this one
                    notices.kernel(mount, after)
            if forget is not None:
                channel.notify(forget)
        if channel.parking:
            channel.settle_park()
        if stats is not None:
            stats.maybe_log()


def _make_mount_point(path: str, is_dir: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        if is_dir:
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        return
    if stat.S_ISDIR(st.st_mode) != is_dir:
        kind = "directory" if is_dir else "file"
        raise RuntimeError(f"mount point {path} exists in the image but the host's mount there is a {kind}")


def handshake(channel: Channel) -> tuple[int, list[tuple[vfs.Mount, int]]]:
    """HELLO, and the file type of each mount's root: (max_io, [(mount, S_IFDIR or S_IFREG)]), parents first."""
    hello = channel.call(vfs.Hello(vfs.VERSION, vfs.MAX_IO, vfs.FEATURES_ALL))
    assert isinstance(hello, vfs.HelloReply)
    if hello.version != vfs.VERSION:
        raise RuntimeError(f"host speaks VFS protocol {hello.version}, this guest {vfs.VERSION}")
    if hello.stats:
        channel.stats = Stats()
    channel.features = hello.features & vfs.FEATURES_ALL
    roots = []
    for info in sorted(hello.mounts, key=lambda m: m.path.count("/")):
        root = channel.call(vfs.Getattr(info.root, 0))
        assert isinstance(root, vfs.AttrReply)
        mode = stat.S_IFMT(root.attr.mode)
        if mode not in (stat.S_IFDIR, stat.S_IFREG):
            raise RuntimeError(f"mount {info.path}: the host's root is neither a directory nor a file")
        roots.append((info, mode))
    return hello.max_io, roots


def mount(info: vfs.Mount, mode: int, max_io: int, features: int = 0) -> Mount:
    """Mount one FUSE filesystem at `info.path` (creating the mount point); the kernel then sends INIT."""
    _make_mount_point(info.path, mode == stat.S_IFDIR)
    fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | (syscalls.MS_RDONLY if info.readonly else 0)
    options = f"fd={fd},rootmode={mode:o},user_id=0,group_id=0,allow_other,default_permissions"
    syscalls.mount("matchlock", info.path, "fuse.matchlock", flags, options)
    return Mount(info, fd, max_io, features)


def _raise_readahead(path: str, max_io: int) -> None:
    """Let sequential reads ask for max_io at a time instead of the kernel's default 128 KiB.

    FUSE caps readahead at the device's read_ahead_kb, and each READ is a round trip.
    """
    st = os.stat(path)
    try:
        with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb", "w") as f:
            f.write(str(max_io // 1024))
    except OSError as exc:
        log(f"readahead of {path} left at the default: {exc}")


def _replies_until_eof(channel: Channel, notices: Notices) -> None:
    try:
        serve_replies(channel, notices)
    except EOFError as exc:
        log(f"stopped: {exc}")
        os._exit(0)


def _spawn(target, *args) -> threading.Thread:
    thread = threading.Thread(target=_fatal_on_error, args=(target, *args), daemon=True)
    thread.start()
    return thread


def serve(port: str, ready_fd: int) -> None:
    """The daemon's body: report READY (or the error) on `ready_fd`, then serve until the host goes."""
    try:
        channel = Channel(os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        max_io, roots = handshake(channel)
        notices = Notices()
        _spawn(notices.serve)
        replies = _spawn(_replies_until_eof, channel, notices)
        # One at a time and parents first, each served before the next is made: a mount point
        # inside an earlier mount is created through it.
        for info, mode in roots:
            lower = fuse_overlay.hidden_lower(info)  # `info`, unless the guest overlays it itself
            if lower is not info:  # the overlay's mount point, made before there is a lower to detach
                _make_mount_point(info.path, True)
            served = mount(lower, mode, max_io, channel.features)
            _spawn(serve_mount, channel, served)
            notices.mounts.append(served)
            if not served.initialized.wait(READY_TIMEOUT):
                raise RuntimeError(f"the kernel never sent FUSE INIT for {info.path}")
            _raise_readahead(lower.path, max_io)
            fuse_overlay.cover(info, lower)
    except Exception as exc:  # noqa: BLE001 - init shows it as FATAL
        os.write(ready_fd, f"{type(exc).__name__}: {exc}".encode()[:4000])
        return
    os.write(ready_fd, READY)
    os.close(ready_fd)
    replies.join()


def start(port: str) -> int:
    """Fork the daemon (from init, before any thread exists) and wait until its mounts are up."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(ready_r)
            serve(port, ready_w)
        except BaseException as exc:  # noqa: BLE001 - a child of init must never return into init
            log(f"FATAL: {exc}")
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(ready_w)
    try:
        readable, _, _ = select.select([ready_r], [], [], READY_TIMEOUT)
        message = os.read(ready_r, 4096) if readable else b"timed out"
    finally:
        os.close(ready_r)
    if message != READY:
        raise RuntimeError(f"VFS mounts failed: {message.decode(errors='replace') or 'the daemon died'}")
    return pid
