"""The transparent proxy of one sandbox: every TCP connection the guest makes ends here.

Connections arrive on listening sockets inside the sandbox's namespace (an
nftables redirect sends them) and the original destination is read back
with SO_ORIGINAL_DST. With interception on, port 80 is HTTP and port 443 is
TLS terminated with a certificate from the sandbox's CA, both handled
request by request under the policy; every other port is a policy-checked
byte relay. With interception off, all ports are relayed, still refusing
private and local destinations.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from ..policy.engine import Blocked, NetworkPolicy
from ..policy.hosts import is_ip_literal
from .clienthello import ClientHello, NotTLS
from .clienthello import parse as parse_client_hello
from .dns import DNSForwarder
from .http1 import HTTP1Session
from .http2 import HTTP2Session
from .namespace import PORTS, SandboxNamespace
from .relay import pipe_both_ways
from .tls import CertificateAuthority
from .upstream import CONNECT_TIMEOUT, UpstreamError, connect

SO_ORIGINAL_DST = 80
HELLO_TIMEOUT = 10.0
TLS_HANDSHAKE_TIMEOUT = 30.0
SUPPORTED_ALPN = ("h2", "http/1.1")


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, address = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(address), port


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def peek_client_hello(sock: socket.socket) -> ClientHello:
    """Read the ClientHello without consuming it, so the TLS layer still sees it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HELLO_TIMEOUT
    while loop.time() < deadline:
        readable = loop.create_future()
        loop.add_reader(sock.fileno(), _set_once, readable)
        try:
            await asyncio.wait_for(readable, max(0.01, deadline - loop.time()))
        finally:
            loop.remove_reader(sock.fileno())
        data = sock.recv(65536, socket.MSG_PEEK)
        if not data:
            raise NotTLS("the guest closed the connection before its ClientHello")
        hello = parse_client_hello(data)
        if hello is not None:
            return hello
        await asyncio.sleep(0.005)  # a hello split over segments: wait for the rest
    raise NotTLS("no complete ClientHello in time")


class NetworkProxy:
    def __init__(self, namespace: SandboxNamespace, policy: NetworkPolicy, dns_upstreams: list[str]) -> None:
        self.namespace = namespace
        self.policy = policy
        self.ca = CertificateAuthority() if policy.intercepting else None
        self.dns = DNSForwarder(policy, dns_upstreams)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._tls_listener: socket.socket | None = None

    async def start(self) -> None:
        ns = self.namespace
        http, passthrough = ns.listen_tcp(PORTS.http), ns.listen_tcp(PORTS.passthrough)
        self._tls_listener = ns.listen_tcp(PORTS.https)
        intercept = self.policy.intercepting
        self._servers = [
            await asyncio.start_server(self._on_http if intercept else self._on_passthrough, sock=http),
            await asyncio.start_server(self._on_passthrough, sock=passthrough),
        ]
        self._spawn(self._accept(self._tls_listener, self._on_tls if intercept else self._on_raw_socket))
        await self.dns.start(ns.bind_udp(PORTS.dns))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._tls_listener is not None:
            self._tls_listener.close()
        self.dns.close()

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- port 80 -----------------------------------------------------------------

    async def _on_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            address, port = original_destination(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        await HTTP1Session(self.policy, reader, writer, scheme="http", default_host=address, port=port).run()

    # --- port 443 ----------------------------------------------------------------

    async def _accept(self, listener: socket.socket, handle) -> None:
        """Accept raw sockets (TLS needs to peek at the ClientHello before any stream exists)."""
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(handle(sock))

    async def _on_raw_socket(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        await self._on_passthrough(reader, writer)

    async def _on_tls(self, sock: socket.socket) -> None:
        try:
            address, port = original_destination(sock)
        except OSError:
            sock.close()
            return
        await self.intercept_tls(sock, address, port)

    async def intercept_tls(self, sock: socket.socket, address: str, port: int) -> None:
        """Terminate the guest's TLS with a minted certificate and relay HTTP/1.1 or HTTP/2 under the policy.

        The upstream connection is made first, offering what the guest offered,
        so the guest is given the protocol the real server chose."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            hello = await peek_client_hello(sock)
        except (TimeoutError, OSError, NotTLS):
            sock.close()
            return
        server_name = hello.server_name or address
        offered = tuple(p for p in hello.alpn if p in SUPPORTED_ALPN)
        upstream, refusal = None, None
        try:
            self.policy.check_host(server_name)
            upstream = await connect(self.policy, server_name, port, tls=True, alpn=offered)
        except Blocked as exc:
            refusal = (exc.status, f"Blocked by policy: {exc.reason}", True, exc.reason)
        except UpstreamError as exc:
            refusal = (502, f"Failed to connect: {exc}", False, str(exc))
        except OSError as exc:  # upstream certificate or handshake failure
            refusal = (502, f"Failed to connect: TLS with {server_name}:{port} failed: {exc}", False, str(exc))
        chosen = upstream.alpn if upstream is not None and upstream.alpn in offered else None
        assert self.ca is not None
        context = self.ca.server_context(server_name, (chosen,) if chosen else ())
        try:
            reader = asyncio.StreamReader(limit=256 * 1024)
            transport, protocol = await loop.connect_accepted_socket(
                lambda: asyncio.StreamReaderProtocol(reader), sock, ssl=context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )  # fmt: skip
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        except (TimeoutError, OSError):
            sock.close()
            if upstream is not None:
                upstream.close()
            return
        if refusal is not None:
            status, message, blocked, reason = refusal
            self.policy.event(url=f"https://{server_name}:{port}", host=server_name, status=status,
                              started=started, blocked=blocked, reason=reason)  # fmt: skip
            session = HTTP1Session(self.policy, reader, writer, scheme="https", default_host=server_name, port=port)
            await session.reply(status, message)
            writer.close()
            return
        assert upstream is not None
        if chosen == "h2" and transport.get_extra_info("ssl_object").selected_alpn_protocol() == "h2":
            await HTTP2Session(self.policy, reader, writer, server_name=server_name, port=port, upstream=upstream).run()
            return
        await HTTP1Session(self.policy, reader, writer, scheme="https", default_host=server_name, port=port,
                           upstream=upstream).run()  # fmt: skip

    # --- every other port ----------------------------------------------------------

    async def _on_passthrough(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        try:
            address, port = original_destination(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        url = f"tcp://{address}:{port}"
        try:
            if not (self.policy.host_allowed(address) and is_ip_literal(address)):
                raise Blocked(f"{address} is not in the allow-list")
            self.policy.check_address(address)
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT)
        except Blocked as exc:
            self.policy.event(url=url, host=address, started=started, blocked=True, reason=exc.reason)
            writer.close()
            return
        except (TimeoutError, OSError) as exc:
            self.policy.event(url=url, host=address, started=started, reason=f"connect failed: {exc}")
            writer.close()
            return
        sent, received = await pipe_both_ways(reader, writer, up_reader, up_writer)
        self.policy.event(url=url, host=address, request_bytes=sent, response_bytes=received, started=started)
