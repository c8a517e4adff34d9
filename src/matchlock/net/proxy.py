"""The transparent proxy of one sandbox: every TCP connection the guest makes ends here.

Connections arrive on listening sockets inside the sandbox's namespace (an
nftables redirect sends them) and the original destination is read back
with SO_ORIGINAL_DST. With interception on, port 80 is HTTP and port 443 is
TLS terminated with a certificate from the sandbox's CA (`intercept`), both
handled request by request under the policy; every other port is a
policy-checked byte relay. With interception off, all ports are relayed,
still refusing private and local destinations.

Every accept loop and connection is a task of one `Supervisor`, so
`aclose()` ends and awaits all of them.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..policy.engine import Blocked, NetworkPolicy
from ..policy.hosts import is_ip_literal
from .dns import DNSForwarder
from .local import host_addresses
from .namespace import PORTS, SandboxNamespace
from .relay import pipe_both_ways
from .tasks import Supervisor

if TYPE_CHECKING:  # imported when first used: TLS, HTTP and the CA take ~100 ms, which `run -- true` never needs
    from .tls import UpstreamTLS

SO_ORIGINAL_DST = 80

Handler = Callable[[socket.socket], Awaitable[None]]


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, address = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(address), port


class NetworkProxy:
    def __init__(self, namespace: SandboxNamespace, policy: NetworkPolicy, dns_upstreams: list[str], *,
                 upstream_tls: UpstreamTLS | None = None) -> None:  # fmt: skip
        """`upstream_tls`: how intercepted connections verify servers; None reads it from the environment."""
        self.namespace = namespace
        self.policy = policy
        self.ca, self.interceptor = None, None
        if policy.intercepting:
            from .intercept import TLSInterceptor
            from .tls import CertificateAuthority, UpstreamTLS

            self.ca = CertificateAuthority()
            self.interceptor = TLSInterceptor(policy, self.ca, upstream_tls or UpstreamTLS.from_environment())
        self.dns = DNSForwarder(policy, dns_upstreams)
        self._tasks = Supervisor("proxy")
        self._listeners: list[socket.socket] = []

    async def start(self) -> None:
        ns = self.namespace
        await self._tasks.start()
        intercept = self.interceptor is not None
        for port, handler in ((PORTS.http, self._on_http if intercept else self._on_passthrough),
                              (PORTS.https, self._on_tls if intercept else self._on_passthrough),
                              (PORTS.passthrough, self._on_passthrough)):  # fmt: skip
            listener = ns.listen_tcp(port)
            self._listeners.append(listener)
            self._tasks.spawn(self._accept(listener, handler), f"proxy accept on {port}")
        await self.dns.start(ns.bind_udp(PORTS.dns))

    async def aclose(self) -> None:
        """Stop accepting, end every connection and the DNS forwarder; safe to call more than once."""
        await self._tasks.aclose()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        await self.dns.aclose()

    async def _accept(self, listener: socket.socket, handle: Handler) -> None:
        """Accept raw sockets: TLS must peek at the ClientHello before any stream exists."""
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._tasks.spawn(self._serve(sock, handle), "proxy connection")

    @staticmethod
    async def _serve(sock: socket.socket, handle: Handler) -> None:
        """One connection; the handler owns `sock` (once streams wrap it, closing them closes it)."""
        try:
            await handle(sock)
        except OSError:
            pass  # the connection's own end (reset, unreachable), not the proxy's

    @staticmethod
    async def _streams(sock: socket.socket) -> tuple[str, int, asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            address, port = original_destination(sock)
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return address, port, reader, writer

    async def _on_http(self, sock: socket.socket) -> None:
        from .http1 import HTTP1Session

        address, port, reader, writer = await self._streams(sock)
        try:
            await HTTP1Session(self.policy, reader, writer, scheme="http", default_host=address, port=port).run()
        finally:
            writer.close()

    async def _on_tls(self, sock: socket.socket) -> None:
        assert self.interceptor is not None
        try:
            address, port = original_destination(sock)
        except OSError:
            sock.close()
            raise
        await self.interceptor.handle(sock, address, port)

    async def _on_passthrough(self, sock: socket.socket) -> None:
        from .exchange import connection_event
        from .upstream import CONNECT_TIMEOUT

        started = time.monotonic()
        address, port, reader, writer = await self._streams(sock)
        url = f"tcp://{address}:{port}"
        try:
            if not (self.policy.host_allowed(address, port) and is_ip_literal(address)):
                raise Blocked(f"{address} port {port} is not in the allow-list")
            self.policy.check_address(address, host_addresses(), port)
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT)
        except asyncio.CancelledError:
            writer.close()
            raise
        except Blocked as exc:
            self.policy.record(connection_event(url, address, started=started, blocked=True, reason=exc.reason))
            writer.close()
            return
        except (TimeoutError, OSError) as exc:
            self.policy.record(connection_event(url, address, started=started, reason=f"connect failed: {exc}"))
            writer.close()
            return
        sent, received = await pipe_both_ways(reader, writer, up_reader, up_writer)
        self.policy.record(connection_event(url, address, started=started, sent=sent, received=received))
