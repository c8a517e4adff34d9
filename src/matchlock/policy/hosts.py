"""Host allow-list globs and the address ranges a sandbox may never reach.

Globs follow matchlock's contract: `*` matches anything; `*.x.y` matches
subdomains of x.y but not x.y itself; `name.*` is a prefix match; any other
`*` is a wildcard within an ordered pattern; everything else is exact.
An entry may end in `:PORT` (`[v6]:PORT` for IPv6): it then allows that
port only (matchlock strips the port, which allows every port).
Unlike matchlock, names are compared case-insensitively and without a
trailing dot: DNS ignores both, so `EXAMPLE.com.` must not slip past a rule
written as `example.com` (nor dodge a secret's host binding).
"""

from __future__ import annotations

import ipaddress

from ..api.network import split_host_entry

# Destinations blocked unless explicitly allowed: the host's own networks
# and anything that is not a routable public address. The documentation
# ranges (192.0.2.0/24 and friends) are deliberately not here: tests use them
# as stand-in internet hosts, and on a real host they route nowhere.
BLOCKED_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT, also VPN overlays
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata services
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated, still routed by some)
        "ff00::/8",
    )
)


def normalise_host(host: str) -> str:
    """Lower-case, no trailing dot, no port, no IPv6 brackets."""
    host = host.strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".").lower()


# Refused in every mode, private ranges allowed or not, unless the allow-list names the address:
# each reaches the host itself (connect() to 0.0.0.0 or :: lands on the host's own services)
# or no single host at all.
NEVER_DIALLED = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "224.0.0.0/4",  # multicast
        "255.255.255.255/32",  # limited broadcast
        "::/128",
        "::1/128",
        "ff00::/8",  # multicast
    )
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(address: str) -> Address | None:
    """The address, with an IPv4 address carried inside IPv6 (mapped, NAT64, 6to4) unwrapped,
    so `::ffff:127.0.0.1` and `64:ff9b::7f00:1` are judged as 127.0.0.1; None if not an address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def _within(ip: Address, networks) -> bool:
    return any(ip in net for net in networks if net.version == ip.version)


def is_blocked_address(address: str) -> bool:
    """True for private, loopback, link-local, ULA and other non-public addresses."""
    ip = parse_address(address)
    return ip is None or _within(ip, BLOCKED_NETWORKS)  # not an address at all: never dial it


def is_never_dialled(address: str, host_addresses: frozenset[Address] = frozenset()) -> bool:
    """True for the host's own addresses (as read by the caller when it dials) and the ranges in
    NEVER_DIALLED: refused even when private ranges are allowed."""
    ip = parse_address(address)
    return ip is None or ip in host_addresses or _within(ip, NEVER_DIALLED)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def glob_matches(pattern: str, host: str) -> bool:
    pattern, host = normalise_host(pattern), normalise_host(host)
    if pattern == "*":
        return True
    if "*" not in pattern:
        return pattern == host
    if pattern.startswith("*.") and "*" not in pattern[2:]:
        return host.endswith(pattern[1:])
    if pattern.endswith(".*") and "*" not in pattern[:-2]:
        return host.startswith(pattern[:-1])
    return _ordered_wildcards(pattern.split("*"), host)


def _ordered_wildcards(parts: list[str], host: str) -> bool:
    if not host.startswith(parts[0]) or not host.endswith(parts[-1]):
        return False
    position, end = len(parts[0]), len(host) - len(parts[-1])
    if position > end:
        return False
    for middle in parts[1:-1]:
        found = host.find(middle, position, end)
        if found < 0:
            return False
        position = found + len(middle)
    return True


def entry_matches(entry: str, host: str, port: int | None = None) -> bool:
    """Whether an allow-list entry (a glob, optionally `:PORT`) covers `host` on `port`.

    An entry with a port covers only that port; `port=None` asks about the
    name alone (a DNS query, before any connection), which any entry for
    the name covers: the connection is checked again with its port."""
    pattern, entry_port = split_host_entry(entry)
    if entry_port is not None and port is not None and entry_port != port:
        return False
    return glob_matches(pattern, host)


def any_entry_matches(entries, host: str, port: int | None = None) -> bool:
    return any(entry_matches(entry, host, port) for entry in entries)


def is_match_all(entry: str) -> bool:
    """`*` or `*:PORT`: allows every host, so it names no address in particular."""
    return split_host_entry(entry)[0] == "*"
