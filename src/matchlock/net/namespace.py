"""A private network namespace per sandbox: TAP, nftables redirects, listening sockets.

The namespace is anonymous: it exists only while a file descriptor (held by
the owning process, or a listening socket in it) keeps it alive, so it
disappears with the sandbox even after `kill -9`, leaving nothing to clean
up and nothing in the host's global firewall. Inside it:

    guest eth0 10.200.0.2 ── tap0 10.200.0.1 (gateway; no other interface, no route out)

and nftables redirects every TCP connection from the guest to the proxy's
listeners (80 → HTTP, 443 → TLS, anything else → passthrough) and UDP 53 to
the DNS forwarder; everything else is dropped.

For an ordinary user the namespace is owned by a user namespace of its own
(root, who may own any, skips that step; the rest is the same). A short-lived helper process
(`unshare` + `nshelper.py`) creates both, the TAP, the addresses, the ruleset and the
listening sockets, and passes their descriptors back with SCM_RIGHTS. The
owner's event loop serves the listeners and dials upstream from its own
namespace; QEMU stays in the host namespaces and gets only the TAP
descriptor (`-netdev tap,fd=N`), so it holds no capability anywhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import SetupError

CLONE_NEWNET = 0x40000000
TAP = "tap0"
GATEWAY = "10.200.0.1"
GUEST_ADDRESS = "10.200.0.2"
PREFIX_LENGTH = 24
GUEST_MAC = "52:54:00:c8:00:02"


@dataclass(frozen=True)
class ProxyPorts:
    http: int = 10080
    https: int = 10443
    passthrough: int = 10000
    dns: int = 10053


PORTS = ProxyPorts()


def _setns(fd: int) -> None:
    import ctypes  # only tests join a namespace: `run` never pays for loading libc

    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _in_thread(function):
    """Run `function` on a fresh thread and return its result (namespaces are per thread)."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="netns")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def ruleset(ports: ProxyPorts = PORTS) -> str:
    return f"""
table inet matchlock {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{TAP}" meta nfproto ipv4 tcp dport 80 redirect to :{ports.http}
        iifname "{TAP}" meta nfproto ipv4 tcp dport 443 redirect to :{ports.https}
        iifname "{TAP}" meta nfproto ipv4 meta l4proto tcp redirect to :{ports.passthrough}
        iifname "{TAP}" meta nfproto ipv4 udp dport 53 redirect to :{ports.dns}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        iifname "{TAP}" ct status dnat meta l4proto {{ tcp, udp }} accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
    }}
}}
"""


HELPER = Path(__file__).with_name("nshelper.py")
# The order in which the helper sends its descriptors.
HELPER_FDS = ("user", "net", "tap", "http", "https", "passthrough", "dns")
TUN_FIX = (
    "fix: sudo matchlock setup linux (gives /dev/net/tun mode 0666, the usual default;"
    " creating a TAP still needs a network namespace of one's own)"
)
USERNS_FIX = (
    "this user cannot create a user namespace; fix: sudo matchlock setup linux"
    " (enables unprivileged user namespaces); `matchlock diagnose` shows which setting is off"
)
ROOT_FIX = "root needs CAP_SYS_ADMIN for a network namespace; fix: run outside a container that drops it"


def explain(message: str, root: bool) -> str:
    """The helper's one-line failure, with the fix where we know it."""
    if "/dev/net/tun" in message:
        return f"{message}; {TUN_FIX}"
    if message.startswith("unshare"):
        return f"{message}; {ROOT_FIX if root else USERNS_FIX}"
    return message


class SandboxNamespace:
    def __init__(self, mtu: int) -> None:
        self.mtu = mtu
        self.fd: int | None = None
        self.userns_fd: int | None = None
        self.tap_fd: int | None = None
        self.inode: int | None = None
        self._sockets: dict[int, socket.socket] = {}
        self._helper: tuple[socket.socket, subprocess.Popen[bytes]] | None = None  # spawned, not yet collected

    def helper_argv(self, channel: int) -> list[str]:
        """The helper's command line: user + net namespaces by `unshare`, then TAP, addresses, ruleset, ports."""
        unshare = shutil.which("unshare")
        if unshare is None:
            raise SetupError("unshare not found; fix: apt-get install util-linux")
        ip_batch = f"link set lo up\naddr add {GATEWAY}/{PREFIX_LENGTH} dev {TAP}\nlink set {TAP} mtu {self.mtu} up\n"
        ports = f"{PORTS.http},{PORTS.https},{PORTS.passthrough}"
        # Root owns any network namespace already: a user namespace would only add a dependency on
        # unprivileged user namespaces being enabled. Everything after this is the same for both.
        owner = ["--net"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--net"]
        return [unshare, *owner, "--", sys.executable, "-I", "-S", str(HELPER),
                str(channel), TAP, ip_batch, ruleset(), ports, str(PORTS.dns)]  # fmt: skip

    def spawn_helper(self) -> None:
        """Start the helper without waiting for it; `create()` collects what it made. Idempotent."""
        if self._helper is not None or self.fd is not None:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                self.helper_argv(child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._helper = (parent, proc)

    def create(self) -> None:
        self.spawn_helper()
        assert self._helper is not None
        (parent, proc), self._helper = self._helper, None
        with parent:
            try:
                message, fds, _, _ = socket.recv_fds(parent, 4096, len(HELPER_FDS) + 1)
            finally:
                _, stderr = proc.communicate()  # the helper has sent everything (or died): this is short
        if not message and stderr.strip():
            message = b"error: " + stderr.strip().splitlines()[-1]
        self._adopt(message, fds, proc.returncode)

    async def acreate(self) -> None:
        """`create()` on a thread, so the owner's loop goes on while the helper sets the namespace up.

        A cancelled caller still waits for the helper, then releases what it made: nothing leaks.
        """
        import asyncio  # here: `run` starts the helper before it has imported asyncio (sandbox/early.py)

        from ..util.aio import finish_in_thread

        try:
            await finish_in_thread(self.create)
        except asyncio.CancelledError:
            self.close()
            raise

    def _adopt(self, message: bytes, fds: list[int], returncode: int | None) -> None:
        """Take the helper's descriptors, or raise its error (closing any stray descriptor)."""
        if len(fds) != len(HELPER_FDS) or message != b"ok":
            for fd in fds:
                os.close(fd)
            text = message.decode(errors="replace").removeprefix("error: ") or f"helper exit status {returncode}"
            raise SetupError(f"creating the sandbox network namespace failed: {explain(text, os.geteuid() == 0)}")
        got = dict(zip(HELPER_FDS, fds))
        self.userns_fd, self.fd, self.tap_fd = got["user"], got["net"], got["tap"]
        self.inode = os.fstat(self.fd).st_ino
        for name in ("http", "https", "passthrough", "dns"):
            sock = socket.socket(fileno=got[name])
            sock.setblocking(False)
            self._sockets[getattr(PORTS, name)] = sock

    def run_inside(self, function):
        """Call `function` on a thread that has joined the network namespace (needs root: tests)."""
        fd = self.fd
        assert fd is not None

        def joined():
            _setns(fd)
            return function()

        return _in_thread(joined)

    def _take(self, port: int) -> socket.socket:
        try:
            return self._sockets.pop(port)
        except KeyError:
            raise SetupError(f"no listening socket for port {port} in the sandbox namespace") from None

    def listen_tcp(self, port: int) -> socket.socket:
        """The listener the helper opened on `port`; the caller owns it from now on."""
        return self._take(port)

    def bind_udp(self, port: int) -> socket.socket:
        return self._take(port)

    def close(self) -> None:
        """Drop our hold on the namespaces and the TAP (QEMU keeps its own copy); idempotent.

        Synchronous, as releasing a descriptor is: the boot-template builder calls it from a
        plain callback. `aclose()` is the same for async owners."""
        if self._helper is not None:  # spawned, never collected: it dies, and what it made with it
            (parent, proc), self._helper = self._helper, None
            parent.close()
            proc.kill()
            proc.communicate()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        for name in ("tap_fd", "fd", "userns_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    async def aclose(self) -> None:
        """`close()`, with the TAP's descriptor closed on a thread of its own: closing the last one
        detaches the (persistent, nshelper.py) device, which waits out an RCU grace period that the
        owner's remaining cleanup need not wait for (a QEMU still running holds a copy of its own)."""
        tap, self.tap_fd = self.tap_fd, None
        try:
            self.close()
        finally:  # a failing close() still lets the TAP go
            if tap is not None:
                threading.Thread(target=os.close, args=(tap,), name="tap close").start()


def namespace_alive(inode: int) -> bool:
    """Whether any process is in, or holds a descriptor of, this network namespace."""
    link = f"net:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                return True
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    return True
            except OSError:  # closed meanwhile (the listing's own descriptor always is)
                continue
    return False
