"""Build one sandbox's network namespace in a fresh process and hand its descriptors back.

Run as `unshare --user --map-root-user --net -- python -I -S nshelper.py FD TAP IP_BATCH RULESET
TCP_PORTS UDP_PORT`. A new user namespace is the only way an ordinary user may own a network
namespace, and only a single-threaded process may create one, which the sandbox owner (with its
event loop's threads) is not; `unshare` makes both and maps our uid to 0 in the new one. Root
needs no user namespace, so for root it makes the network namespace alone. The standard library
only, and only its C modules: the interpreter's start is most of what every sandbox pays here.

In here we are root (of the new user namespace, for a user) and own the new network namespace:
we create the TAP (persistent, so it goes with the namespace, see `open_tap`), address
it, load the nftables ruleset and open the proxy's listening sockets. Then every descriptor goes
back over the socket FD with SCM_RIGHTS, in the order `namespace.HELPER_FDS` names, and we exit:
the descriptors keep the namespaces alive. A failure is one line of text with no descriptors.
"""

from __future__ import annotations

import _socket  # the C module: `socket` costs ~20 ms of enum set-up at import, more than all the rest
import array
import fcntl
import os
import struct
import sys

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # QEMU sees it on the descriptor and uses virtio-net offloads


class Failure(Exception):
    """A step failed; the message names it."""


def open_tap(name: str) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise Failure(f"cannot open /dev/net/tun: {exc.strerror} [errno {exc.errno}]") from None
    ifreq = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as exc:
        os.close(fd)
        raise Failure(f"TUNSETIFF {name}: {exc.strerror}") from None
    # Persistent: closing the last descriptor then only detaches it, and the device goes with the
    # namespace, unregistered by the kernel's own cleanup worker. Without it the last close (the
    # owner's, as it exits) unregistered the device and waited out an RCU barrier, ~15 ms of every run.
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        os.close(fd)
        raise Failure(f"TUNSETPERSIST {name}: {exc.strerror}") from None
    return fd


def spawn(argv: list[str], stdin: str) -> tuple[int, int]:
    """Start `argv` reading `stdin`; (pid, stderr pipe). The subprocess module costs more to import than this."""
    in_r, in_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, err_w, 2)]
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
    except FileNotFoundError:
        raise Failure(f"{argv[0]} not found") from None
    finally:
        os.close(in_r)
        os.close(err_w)
    with os.fdopen(in_w, "w") as f:
        f.write(stdin)
    return pid, err_r


def finish(name: str, pid: int, err_r: int) -> None:
    with os.fdopen(err_r) as f:
        errors = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise Failure(f"{name} failed in the sandbox namespace: {errors.strip()}")


def listeners(tcp_ports: list[int], udp_port: int) -> list[int]:
    made = []
    for port in tcp_ports:
        # IPPROTO_TCP explicitly: asyncio enables TCP_NODELAY only on sockets whose protocol it
        # recognises, and accepted sockets inherit it (else ~40 ms stalls on delayed ACKs).
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, _socket.IPPROTO_TCP)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(512)
        made.append(sock.detach())
    udp = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", udp_port))
    made.append(udp.detach())
    return made


def build(tap: str, ip_batch: str, ruleset: str, tcp_ports: str, udp_port: str) -> list[int]:
    userns = os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    for scope in ("all", "default"):
        with open(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "w") as f:
            f.write("1")
    tap_fd = open_tap(tap)
    # In parallel: the ruleset matches the TAP by name, so it need not wait for the addresses.
    ip, nft = spawn(["ip", "-batch", "-"], ip_batch), spawn(["nft", "-f", "-"], ruleset)
    finish("ip", *ip)
    finish("nft", *nft)
    return [userns, netns, tap_fd, *listeners([int(p) for p in tcp_ports.split(",")], int(udp_port))]


def main() -> int:
    channel = _socket.socket(fileno=int(sys.argv[1]))
    try:
        fds = build(*sys.argv[2:7])
    except (Failure, OSError, ValueError) as exc:
        channel.send(f"error: {exc}".encode())
        return 1
    channel.sendmsg([b"ok"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))])
    return 0


if __name__ == "__main__":
    sys.stderr.flush()
    os._exit(main())  # skip the interpreter's teardown: the owner waits for this exit
