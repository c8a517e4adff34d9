"""A private network namespace per sandbox: TAP, nftables redirects, listening sockets.

The namespace is anonymous: it exists only while a file descriptor (held by
the owning process) or a process in it (QEMU) keeps it alive, so it
disappears with the sandbox even after `kill -9`, leaving nothing to clean
up and nothing in the host's global firewall. Inside it:

    guest eth0 10.200.0.2 ── tap0 10.200.0.1 (gateway; no other interface, no route out)

and nftables redirects every TCP connection from the guest to the proxy's
listeners (80 → HTTP, 443 → TLS, anything else → passthrough) and UDP 53 to
the DNS forwarder; everything else is dropped. The listening sockets are
created inside the namespace by a short-lived thread that joins it, and are
then served by the owner's event loop, which dials upstream from its own
namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from dataclasses import dataclass

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

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


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


class SandboxNamespace:
    def __init__(self, mtu: int) -> None:
        self.mtu = mtu
        self.fd: int | None = None
        self.inode: int | None = None

    def create(self) -> None:
        def make() -> int:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._configure()
            except BaseException:
                os.close(fd)
                raise
            return fd

        try:
            self.fd = _in_thread(make)
        except PermissionError:
            raise SetupError("creating a network namespace needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)") from None
        self.inode = os.fstat(self.fd).st_ino

    def _configure(self) -> None:
        # The thread is inside the namespace: /proc/sys/net and child processes belong to it.
        for scope in ("all", "default"):
            with open(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "w") as f:
                f.write("1")
        commands = (
            "link set lo up\n"
            f"tuntap add dev {TAP} mode tap\n"
            f"addr add {GATEWAY}/{PREFIX_LENGTH} dev {TAP}\n"
            f"link set {TAP} mtu {self.mtu} up\n"
        )
        _run(["ip", "-batch", "-"], commands, "iproute2")
        _run(["nft", "-f", "-"], ruleset(), "nftables")

    def run_inside(self, function):
        """Call `function` on a thread that has joined the namespace."""
        assert self.fd is not None

        def joined():
            _check(_libc.setns(self.fd, CLONE_NEWNET), "setns")
            return function()

        return _in_thread(joined)

    def listen_tcp(self, port: int) -> socket.socket:
        def make() -> socket.socket:
            # IPPROTO_TCP explicitly: asyncio enables TCP_NODELAY only on sockets
            # whose protocol it recognises, and accepted sockets inherit it.
            # Without it every kept-alive response stalls ~40 ms on delayed ACKs.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(512)
            sock.setblocking(False)
            return sock

        return self.run_inside(make)

    def bind_udp(self, port: int) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", port))
            sock.setblocking(False)
            return sock

        return self.run_inside(make)

    def qemu_wrapper(self) -> tuple[list[str], tuple[int, ...]]:
        """Argv prefix and inherited fds that start QEMU inside the namespace (for the TAP)."""
        assert self.fd is not None
        return ["nsenter", f"--net=/proc/self/fd/{self.fd}", "--"], (self.fd,)

    def close(self) -> None:
        """Drop our hold on the namespace (it lives on while QEMU is in it); idempotent.

        Synchronous, as releasing a descriptor is: the boot-template builder calls it from a
        plain callback. `aclose()` is the same for async owners."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    async def aclose(self) -> None:
        self.close()


def _run(argv: list[str], stdin: str, package: str) -> None:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise SetupError(f"{argv[0]} not found; fix: apt-get install {package}") from None
    if proc.returncode != 0:
        raise SetupError(f"{argv[0]} failed in the sandbox namespace: {proc.stderr.strip()}")


def namespace_alive(inode: int) -> bool:
    """Whether any process is in, or holds a descriptor of, this network namespace."""
    link = f"net:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                return True
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    return True
        except OSError:
            continue
    return False
