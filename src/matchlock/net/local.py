"""The addresses of the host itself, which a sandbox must never dial unless allowed by name.

Read from the kernel at every dial, because interfaces come and go while a
sandbox runs. /proc/self/net shows the owner's own namespace (where the
proxy dials from), not the sandbox's. IPv4 comes from the FIB, whose local
and broadcast /32 entries name every address of every interface and each
subnet's broadcast address; IPv6 from if_inet6. On an ordinary host that
is about 0.1 ms per dial, against milliseconds for the TLS handshake that
follows.
"""

from __future__ import annotations

import ipaddress

from ..policy.hosts import Address

FIB = "/proc/self/net/fib_trie"
INET6 = "/proc/self/net/if_inet6"


def _read(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:  # no IPv6 in this kernel, or no /proc: nothing to add
        return []


def parse_fib(lines: list[str]) -> set[Address]:
    """Addresses of `/32 host LOCAL` and `/32 link BROADCAST` leaves (each follows its `|-- a.b.c.d` line)."""
    found: set[str] = set()  # the main and local tables repeat each entry: convert each address once
    last = ""
    for line in lines:
        text = line.lstrip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text.startswith("/32 ") and (text.endswith(" LOCAL") or text.endswith(" BROADCAST")):
            found.add(last)
    return {ipaddress.IPv4Address(address) for address in found if address}


def parse_inet6(lines: list[str]) -> set[Address]:
    return {ipaddress.IPv6Address(int(line[:32], 16)) for line in lines if len(line) > 32 and line[32] == " "}


def host_addresses() -> frozenset[Address]:
    return frozenset(parse_fib(_read(FIB)) | parse_inet6(_read(INET6)))
