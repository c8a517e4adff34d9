"""Bring up the guest's network interface with ioctls (the kernel has no `ip=` and
the image may have no tools): address, netmask, MTU, link up, default route."""

from __future__ import annotations

import _socket
import ctypes
import fcntl
import struct

SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFMTU = 0x8916, 0x891C, 0x8922
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP, RTF_GATEWAY = 0x1, 0x2


# struct rtentry on x86_64 (linux/route.h), 120 bytes; rt_dev is a pointer to the name.
_RTENTRY = struct.Struct("=Q16s16s16sHh4xQQh6xQQQH6x")


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("=H2s4s8x", _socket.AF_INET, b"\0\0", _socket.inet_aton(address))


def _ifreq_addr(name: bytes, address: str) -> bytes:
    return struct.pack("16sH2s4s8x", name, _socket.AF_INET, b"\0\0", _socket.inet_aton(address))


def _prefix_to_mask(prefix: int) -> str:
    return _socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))


def set_link_up(sock, name: bytes) -> None:
    flags = struct.unpack("16sH22x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16sH22x", name, 0)))[1]
    fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", name, flags | IFF_UP))


def configure_interface(name: str, address: str, prefix: int, gateway: str, mtu: int) -> None:
    device = name.encode()
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(sock.fileno(), SIOCSIFMTU, struct.pack("16si20x", device, mtu))
        fcntl.ioctl(sock.fileno(), SIOCSIFADDR, _ifreq_addr(device, address))
        fcntl.ioctl(sock.fileno(), SIOCSIFNETMASK, _ifreq_addr(device, _prefix_to_mask(prefix)))
        set_link_up(sock, device)
        ifname = ctypes.create_string_buffer(device, 16)  # stays alive across the ioctl
        route = _RTENTRY.pack(0, _sockaddr_in("0.0.0.0"), _sockaddr_in(gateway), _sockaddr_in("0.0.0.0"),
                              RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, ctypes.addressof(ifname), 0, 0, 0)  # fmt: skip
        fcntl.ioctl(sock.fileno(), SIOCADDRT, route)
    finally:
        sock.close()


def clear_address(name: str) -> None:
    """Remove the interface's IPv4 address, and with it every route through it."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        fcntl.ioctl(sock.fileno(), SIOCSIFADDR, _ifreq_addr(name.encode(), "0.0.0.0"))
    finally:
        sock.close()
