"""The guest agent: one single-threaded event loop over the virtio-serial port.

It runs in PID 1 after init has assembled the root filesystem. The host
drives it through the multiplexer in `matchlock.wire`; every stream is one
operation (exec, write_file, read_file, list_files, shutdown). The loop is a
plain epoll reactor: asyncio (or even `selectors`, `signal` and `socket`,
which import `enum` and `collections`) would cost hundreds of milliseconds of
import time per boot under CPU emulation, and forking workloads from a
single-threaded process is safe.
"""

from __future__ import annotations

import _signal
import _socket
import heapq
import itertools
import os
import select
import sys
import time

from ..wire import agent as msgs
from ..wire.boot import (
    GUEST_ADDRESS,
    GUEST_GATEWAY,
    GUEST_INTERFACE,
    GUEST_MTU,
    GUEST_PREFIX_LENGTH,
)
from ..wire.frames import RemoteProtocolError
from ..wire.mux import (
    ChannelEnded,
    Connection,
    DataReceived,
    HelloReceived,
    MessageReceived,
    Role,
    StreamClosed,
    StreamOpened,
    StreamReset,
    WindowOpened,
)
from ..wire.replies import Fatal, Ready, Result
from . import checkpoint, disks, netconfig, syscalls, timing, users
from .etcfiles import EtcFiles
from .handlers import ExecHandler, PortForwardHandler, ReadFileHandler, StreamHandler, WriteFileHandler, list_files

AGENT_VERSION = "1"
CGROUP_ROOT = "/sys/fs/cgroup"
INIT_CGROUP = CGROUP_ROOT + "/init"
NET_CLASS = "/sys/class/net"
CPU_PERIOD_US = 100_000


def log(message: str) -> None:
    os.write(2, f"matchlock-agent: {message}\n".encode())


class Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback) -> None:
        self.deadline, self.callback, self.cancelled = deadline, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Agent:
    def __init__(
        self, port_fd: int, *, hidden_devices: tuple[str, ...] = (), boot_started: float = 0.0, start_vfs=None
    ) -> None:
        self.port = port_fd
        self.hidden_devices = hidden_devices
        self.start_vfs = start_vfs  # init's: starts the FUSE daemon, returns the VFS port's device
        self.boot_started = boot_started
        self.conn = Connection(Role.GUEST)
        self._poll = select.epoll()
        self._registered: set[int] = set()
        self._callbacks: dict[int, list] = {}  # fd -> [read callback, write callback]
        self._timers: list = []
        self._timer_ids = itertools.count()
        self.handlers: dict[int, StreamHandler] = {}
        self.processes: dict[int, ExecHandler] = {}
        self.privileged = False
        self.restored = False  # woken by a new host from a snapshot (guest/checkpoint.py)
        self.running = True
        self._outbound = bytearray()
        self._port_write_watched = False
        self._read_buffer = bytearray(256 * 1024)
        self._read_view = memoryview(self._read_buffer)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r = wake_r
        _signal.set_wakeup_fd(wake_w)
        _signal.signal(_signal.SIGCHLD, lambda *_: None)
        self.watch_read(wake_r, self._reap_children)
        self.watch_read(port_fd, self._read_port)

    # --- reactor --------------------------------------------------------------

    def _update(self, fd: int) -> None:
        read_cb, write_cb = self._callbacks.get(fd, (None, None))
        events = (select.EPOLLIN if read_cb else 0) | (select.EPOLLOUT if write_cb else 0)
        if not events:
            self._callbacks.pop(fd, None)
            if fd in self._registered:
                self._registered.discard(fd)
                self._poll.unregister(fd)
        elif fd in self._registered:
            self._poll.modify(fd, events)
        else:
            self._poll.register(fd, events)
            self._registered.add(fd)

    def watch_read(self, fd: int, callback) -> None:
        self._callbacks.setdefault(fd, [None, None])[0] = callback
        self._update(fd)

    def unwatch_read(self, fd: int) -> None:
        if fd in self._callbacks:
            self._callbacks[fd][0] = None
            self._update(fd)

    def watch_write(self, fd: int, callback) -> None:
        self._callbacks.setdefault(fd, [None, None])[1] = callback
        self._update(fd)

    def unwatch_write(self, fd: int) -> None:
        if fd in self._callbacks:
            self._callbacks[fd][1] = None
            self._update(fd)

    def call_later(self, delay: float, callback) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._timer_ids), timer))
        return timer

    def _next_timeout(self) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    def say_hello(self) -> None:
        self.conn.send_hello(
            {
                "agent_version": AGENT_VERSION,
                "python": sys.version.split()[0],
                "kernel": os.uname().release,
                # Guest uptime (since the kernel started) when init began and now.
                "init_started_ms": int(self.boot_started * 1000),
                "hello_ms": _uptime_ms(),
            }
        )
        self._flush()

    def run(self) -> None:
        readable = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
        writable = select.EPOLLOUT | select.EPOLLERR
        while self.running:
            timeout = self._next_timeout()
            for fd, events in self._poll.poll(-1 if timeout is None else timeout):
                callbacks = self._callbacks.get(fd)
                if callbacks and events & readable and callbacks[0]:
                    self._guarded(callbacks[0])
                callbacks = self._callbacks.get(fd)
                if callbacks and events & writable and callbacks[1]:
                    self._guarded(callbacks[1])
            self._run_timers()
            self._flush()

    def _guarded(self, callback) -> None:
        try:
            callback()
        except RemoteProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in one handler must not take down PID 1
            log(f"handler error: {type(exc).__name__}: {exc}")

    # --- port I/O -------------------------------------------------------------

    def _flush(self) -> None:
        # Called every loop turn: touch epoll only when the port's write
        # interest actually changes (each syscall is costly under emulation).
        self._outbound += self.conn.data_to_send()
        if self._outbound:
            try:
                del self._outbound[: os.write(self.port, self._outbound)]
            except BlockingIOError:
                pass
        waiting = bool(self._outbound)
        if waiting != self._port_write_watched:
            self._port_write_watched = waiting
            if waiting:
                self.watch_write(self.port, self._flush)
            else:
                self.unwatch_write(self.port)

    def flush_blocking(self) -> None:
        self._outbound += self.conn.data_to_send()
        os.set_blocking(self.port, True)
        while self._outbound:
            del self._outbound[: os.write(self.port, self._outbound)]

    def _read_port(self) -> None:
        # readv into a reused buffer: os.read(fd, 256 KiB) would allocate (and
        # mmap/munmap) a 256 KiB object on every wake-up.
        try:
            count = os.readv(self.port, [self._read_buffer])
        except BlockingIOError:
            return
        data = self._read_view[:count].tobytes()
        if not data:
            log("host closed the channel; powering off")
            syscalls.reboot()
            return
        try:
            events = self.conn.receive_data(data)
        except RemoteProtocolError as exc:
            log(f"FATAL: host broke the protocol: {exc}")
            syscalls.reboot()
            return
        for event in events:
            self._dispatch(event)

    # event type -> how a stream handler receives it
    _HANDLER_CALLS = {
        DataReceived: lambda h, e: h.on_data(e.channel, e.data),
        ChannelEnded: lambda h, e: h.on_eof(e.channel),
        MessageReceived: lambda h, e: h.on_message(e.message),
        WindowOpened: lambda h, e: h.on_window(),
        StreamReset: lambda h, e: h.on_reset(e.reason),
        StreamClosed: lambda h, e: None,
    }

    def _dispatch(self, event) -> None:
        kind = type(event)
        if kind is StreamOpened:
            self._open(event.stream, event.request)
            return
        if kind is HelloReceived:
            self._configure(event.info)
            return
        handler = self.handlers.get(event.stream)
        if handler is None:
            return
        try:
            self._HANDLER_CALLS[kind](handler, event)
        except Exception as exc:  # noqa: BLE001 - a bug in one handler must not take down PID 1
            log(f"handler error: {type(exc).__name__}: {exc}")
        self._forget_if_done(event.stream, handler)

    def _forget_if_done(self, stream: int, handler: StreamHandler) -> None:
        if handler.done and not self.conn.is_open(stream):
            self.handlers.pop(stream, None)

    def _open(self, stream: int, request: dict) -> None:
        try:
            parsed = msgs.parse_request(request)
        except (ValueError, KeyError) as exc:
            self.conn.reset_stream(stream, f"invalid request: {exc}")
            return
        handler: StreamHandler
        try:
            if isinstance(parsed, msgs.ExecRequest):
                handler = ExecHandler(self, stream, parsed)
            elif isinstance(parsed, msgs.WriteFileRequest):
                handler = WriteFileHandler(self, stream, parsed)
            elif isinstance(parsed, msgs.PathRequest) and parsed.op == msgs.OP_READ_FILE:
                handler = ReadFileHandler(self, stream, parsed.path)
            elif isinstance(parsed, msgs.PathRequest):
                handler = StreamHandler(self, stream)
                try:
                    handler.finish(list_files(parsed.path))
                except OSError as exc:
                    handler.fail(f"cannot list {parsed.path}: {exc.strerror}", exc.errno)
            elif isinstance(parsed, msgs.PortForwardRequest):
                handler = PortForwardHandler(self, stream, parsed)
            elif isinstance(parsed, msgs.PingRequest):
                handler = StreamHandler(self, stream)
                handler.finish(Result())
            elif isinstance(parsed, msgs.ShutdownRequest):
                self._shutdown(stream)
                return
            elif isinstance(parsed, msgs.CheckpointRequest):
                self._park(stream)
                return
            else:
                # A request record without a handler here must never power the VM off.
                raise ValueError(f"this agent has no handler for {type(parsed).__name__}")
        except Exception as exc:  # noqa: BLE001
            self.conn.reset_stream(stream, f"{type(exc).__name__}: {exc}")
            return
        self.handlers[stream] = handler

    def _park(self, stream: int) -> None:
        try:
            checkpoint.park(self, stream)
        except (OSError, ValueError) as exc:  # a host that cannot wake us correctly: nothing sane is left
            log(f"FATAL: waking from a checkpoint failed: {exc}")
            syscalls.reboot()

    def _shutdown(self, stream: int) -> None:
        for handler in list(self.processes.values()):
            handler.proc.signal(_signal.SIGKILL)
        os.sync()
        self.conn.send_message(stream, Result().to_wire())
        self.conn.close_stream(stream)
        self.flush_blocking()
        syscalls.reboot()

    # --- children -------------------------------------------------------------

    def _reap_children(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handler = self.processes.pop(pid, None)
            if handler is not None:
                code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
                self._guarded(lambda handler=handler, code=code: handler.on_exit(code))
                self._forget_if_done(handler.stream, handler)

    # --- boot configuration from the host's HELLO --------------------------------

    def _configure(self, info: dict) -> None:
        timing.stamp("host HELLO received")
        try:
            config = msgs.GuestConfig.parse(info)
            if config.vfs and self.start_vfs is not None:
                # Before the extra disks, as mounts have always come up: a disk may be mounted inside one.
                self.hidden_devices += (self.start_vfs(),)
                self.start_vfs = None  # one daemon per boot
            elif config.vfs and not self.restored:  # a clone's daemon came along, parked in the snapshot
                raise RuntimeError("the host asked for mounts, but this guest has started its FUSE daemon already")
            if self.restored:  # a clone from a snapshot: disks mounted, network unchanged
                ca_bundle = checkpoint.apply_restored_config(config, EtcFiles.current(), render_hosts, SYSTEM_BUNDLES)
            else:
                ca_bundle = apply_config(config)
            self.privileged = config.privileged
        except Exception as exc:  # noqa: BLE001 - report instead of hanging the host
            message = f"{type(exc).__name__}: {exc}"
            log(f"FATAL: {message}")
            self.conn.send_message(0, Fatal(message).to_wire())
            self.flush_blocking()
            sys.exit(1)
        stamps = None
        if config.debug_timing:
            timing.stamp("configured")
            stamps = tuple(timing.take())
        else:
            timing.take(last=True)  # nobody reads them
        self.conn.send_message(0, Ready(_uptime_ms(), ca_bundle, stamps).to_wire())


def _uptime_ms() -> int:
    return int(timing.uptime() * 1000)


def _write_etc(path: str, content: str) -> None:
    """A file of the root the agent owns before any mount exists (prepare_root)."""
    EtcFiles(()).write(path, content)


def render_hosts(hostname: str, extra_hosts) -> str:
    lines = [f"127.0.0.1\tlocalhost localhost.localdomain {hostname}"]
    lines += [f"{ip}\t{host}" for host, ip in extra_hosts]
    lines += ["::1\tlocalhost ip6-localhost ip6-loopback", "ff02::1\tip6-allnodes", "ff02::2\tip6-allrouters"]
    return "\n".join(lines) + "\n"


# What apply_config writes in every sandbox, whatever its settings.
ALWAYS_WRITTEN = ("/etc/hostname", "/etc/hosts")


def prepare_root() -> None:
    """In a rooted template, before its snapshot: the first write into the root copies /etc up to the
    upper disk (~65 ms of the handshake under emulation, measured), so make the files that every
    sandbox's `apply_config` rewrites now (empty), and parse the users database each exec reads."""
    for path in ALWAYS_WRITTEN:
        _write_etc(path, "")
    users.preload()


def apply_config(config: msgs.GuestConfig) -> str:
    """Apply the host's settings; returns the system CA bundle the sandbox CA joined ("" if none)."""
    syscalls.set_realtime_clock(config.time_ns)
    _socket.sethostname(config.hostname)
    etc = EtcFiles.current() if config.vfs else EtcFiles(())  # a mounted file is the user's: left as it is
    etc.write("/etc/hostname", config.hostname + "\n")
    etc.write("/etc/hosts", render_hosts(config.hostname, config.extra_hosts))
    if config.dns_servers:
        etc.write("/etc/resolv.conf", "".join(f"nameserver {s}\n" for s in config.dns_servers))
    _apply_network(config.network)
    bundle = _install_ca(config.ca_certificate, etc) if config.ca_certificate else ""
    disks.mount_disks(config.disks)
    if _cpu_quota is not None:
        _set_cpu_quota(config.cpus)
    return bundle


# Where distributions keep their CA bundle; the sandbox CA is appended to whichever exists.
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # Alpine (LibreSSL), macOS-style
)


def _install_ca(pem: str, etc: EtcFiles) -> str:
    """The proxy's CA for this sandbox: its own file, and appended to the image's bundle (unless a VFS
    mount has the bundle). Returns the bundle, or the CA's file where it is not CA_PATH, or "" (CA_PATH)."""
    ca_file = etc.ca_path()
    etc.write(ca_file, pem)
    alone = etc.ca_alone(ca_file)
    for bundle in SYSTEM_BUNDLES:
        if os.path.isfile(bundle):
            real = os.path.realpath(bundle)
            if etc.on_mount(real):
                return alone  # the user's mounted bundle: TLS clients get the CA's own file
            try:
                with open(real, "a") as f:
                    f.write("\n" + pem)
            except OSError:
                continue  # a read-only or odd bundle: the CA file and env vars still work
            return bundle
    return alone


_cpu_quota: int | None = None  # the quota cpu.max holds, None without the cpu controller


def prepare_cgroups() -> None:
    """Move PID 1 into its own cgroup, delegate every controller and cap CPU time at the vCPU count.

    Done at boot, before a template's snapshot; only a fractional --cpus changes the cap later.
    """
    os.makedirs(INIT_CGROUP, exist_ok=True)
    with open(f"{INIT_CGROUP}/cgroup.procs", "w") as f:
        f.write("1")
    with open(f"{CGROUP_ROOT}/cgroup.controllers") as f:
        controllers = f.read().split()
    if controllers:
        with open(f"{CGROUP_ROOT}/cgroup.subtree_control", "w") as f:
            f.write(" ".join("+" + c for c in controllers))
    if "cpu" in controllers:
        _set_cpu_quota(os.cpu_count() or 1)


def _set_cpu_quota(cpus: float) -> None:
    global _cpu_quota
    quota = max(1000, int(cpus * CPU_PERIOD_US))
    if quota != _cpu_quota:
        with open(f"{INIT_CGROUP}/cpu.max", "w") as f:
            f.write(f"{quota} {CPU_PERIOD_US}")
        _cpu_quota = quota


def release_from_cgroup(pid: int) -> None:
    """Put a helper of init (the FUSE daemon) back in the root cgroup, outside the workloads' CPU cap."""
    with open(f"{CGROUP_ROOT}/cgroup.procs", "w") as f:
        f.write(str(pid))


# What the interface holds now: (interface, address, prefix, gateway, mtu), or None.
_network: tuple[str, str, int, str, int] | None = None


def prepare_network() -> None:
    """Bring every interface up and give the NIC the usual address (at boot, before a template's snapshot):
    under emulation each step takes tens of milliseconds, which a restored guest then skips."""
    global _network
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        names = sorted(os.listdir(NET_CLASS))
        for name in names:
            netconfig.set_link_up(sock, name.encode())
    finally:
        sock.close()
    if GUEST_INTERFACE in names:
        usual = (GUEST_INTERFACE, GUEST_ADDRESS, GUEST_PREFIX_LENGTH, GUEST_GATEWAY, GUEST_MTU)
        try:
            netconfig.configure_interface(*usual)
        except OSError:
            return  # left to the host's settings, which report what fails
        _network = usual


def _apply_network(net: msgs.GuestNetwork | None) -> None:
    """Make the interface what the host asked for; nothing to do when it already is."""
    global _network
    wanted = None if net is None else (net.interface, net.address, net.prefix, net.gateway, net.mtu)
    if wanted == _network:
        return
    if _network is not None:
        netconfig.clear_address(_network[0])  # no network, or another one: the usual address and route go
        _network = None
    if wanted is not None:
        netconfig.configure_interface(*wanted)
        _network = wanted
