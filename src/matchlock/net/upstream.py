"""Dial the real servers, from the owner's own namespace, through the policy.

Names are resolved on the host, and the addresses are checked *before* the
dial, against the host's own addresses as they are at that moment: the
address that is connected to is the address that was checked, so a DNS
answer that flips to a private or host address (rebinding) gains nothing.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from ..policy.engine import Blocked, NetworkPolicy
from ..policy.hosts import is_ip_literal, normalise_host
from .local import host_addresses
from .tls import UpstreamTLS

CONNECT_TIMEOUT = 30.0


class UpstreamError(Exception):
    """The upstream could not be reached (502 to the guest)."""


@dataclass
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    host: str
    port: int
    address: str
    alpn: str | None = None

    def close(self) -> None:
        self.writer.close()


async def resolve(host: str, port: int) -> list[str]:
    if is_ip_literal(host):
        return [host]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UpstreamError(f"cannot resolve {host}: {exc.strerror}") from None
    addresses: list[str] = []
    for family, *_, sockaddr in infos:
        address = str(sockaddr[0])
        if family in (socket.AF_INET, socket.AF_INET6) and address not in addresses:
            addresses.append(address)
    return addresses


async def connect(
    policy: NetworkPolicy, host: str, port: int, *, tls: UpstreamTLS | None = None, alpn: tuple[str, ...] = ()
) -> Upstream:
    """Dial `host` over TLS when given the contexts to verify it with, else plain TCP."""
    host = normalise_host(host)
    addresses = await resolve(host, port)
    usable = policy.usable_addresses(addresses, host_addresses(), port)
    if not usable:
        raise Blocked(
            f"{host} resolves only to private or local addresses, or the host's own ({', '.join(addresses[:3])})"
        )
    errors = []
    for address in usable:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    address, port, ssl=tls.context(alpn) if tls else None, server_hostname=host if tls else None,
                    limit=256 * 1024,
                ),
                CONNECT_TIMEOUT,
            )  # fmt: skip
        except (TimeoutError, OSError) as exc:
            errors.append(f"{address}: {exc.__class__.__name__}: {exc}")
            continue
        writer.transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selected = writer.get_extra_info("ssl_object").selected_alpn_protocol() if tls else None
        return Upstream(reader, writer, host, port, address, selected)
    raise UpstreamError(f"cannot connect to {host}:{port}: {'; '.join(errors)[:500]}")
