"""Host allow-list globs and the address ranges a sandbox may never reach.

Globs follow matchlock's contract: `*` matches anything; `*.x.y` matches
subdomains of x.y but not x.y itself; `name.*` is a prefix match; any other
`*` is a wildcard within an ordered pattern; everything else is exact.
Unlike matchlock, names are compared case-insensitively and without a
trailing dot: DNS ignores both, so `EXAMPLE.com.` must not slip past a rule
written as `example.com` (nor dodge a secret's host binding).
"""

from __future__ import annotations

import ipaddress

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


def is_blocked_address(address: str) -> bool:
    """True for private, loopback, link-local, ULA and other non-public addresses."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True  # not an address at all: never dial it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in BLOCKED_NETWORKS if net.version == ip.version)


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


def any_glob_matches(patterns, host: str) -> bool:
    return any(glob_matches(pattern, host) for pattern in patterns)
