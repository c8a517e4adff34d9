"""Drive the proxy's sessions in-process over real loopback connections.

`PlainHTTPProxy` plays port 80: each accepted connection is an
`HTTP1Session` that dials the given upstream port. `TLSInterceptProxy`
plays port 443: each accepted socket goes through the proxy's
`TLSInterceptor`, exactly as one redirected by nftables would (the original
destination is the upstream's port on 127.0.0.1), trusting the test
upstream CA. Neither needs a network namespace.
`RawH2Client` is a minimal guest-side HTTP/2 client that exposes every
event (trailers, resets, GOAWAY) the tests need to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import h2.config
import h2.events
import h2.exceptions

from matchlock.api.network import InterceptionConfig, InterceptionRule, NetworkConfig
from matchlock.net.callbacks import UnixCallbackClient
from matchlock.net.http1 import HTTP1Session
from matchlock.net.http2 import GracefulH2Connection
from matchlock.net.intercept import TLSInterceptor
from matchlock.net.tasks import Supervisor
from matchlock.net.tls import CertificateAuthority
from matchlock.policy.engine import NetworkPolicy
from matchlock.policy.rules import InterceptionRules
from proxy_upstreams import HTTP2Upstream, UpstreamCA


def make_policy(rules=(), callback_socket: str = "", **network) -> tuple[NetworkPolicy, list]:
    """An intercepting policy that may dial loopback, where the stand-in upstreams live: the host's
    own addresses are dialled only when the allow-list names them."""
    events: list = []
    network.setdefault("allowed_hosts", ("localhost", "127.0.0.1"))
    engine = None
    if rules:
        parsed = tuple(InterceptionRule.from_json(rule) for rule in rules)
        callbacks = UnixCallbackClient(callback_socket) if callback_socket else None
        engine = InterceptionRules(InterceptionConfig(parsed, callback_socket), callbacks=callbacks)
    return NetworkPolicy(NetworkConfig(intercept=True, **network), events.append, rules=engine), events


class PlainHTTPProxy:
    def __init__(self, policy: NetworkPolicy, upstream_port: int) -> None:
        self.policy, self.upstream_port = policy, upstream_port
        self.connections = Supervisor("test HTTP proxy")
        self.port = 0

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            self.connections.spawn(self._session(sock))

    async def _session(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            await HTTP1Session(self.policy, reader, writer, scheme="http", default_host="127.0.0.1",
                               port=self.upstream_port).run()  # fmt: skip
        finally:
            writer.close()

    async def __aenter__(self) -> PlainHTTPProxy:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        await self.connections.start()
        self.connections.spawn(self._accept())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.connections.aclose()  # ends the sessions still open (kept-alive guests)
        self.listener.close()


class TLSInterceptProxy:
    def __init__(self, policy: NetworkPolicy, upstream_port: int, upstream_ca: UpstreamCA) -> None:
        self.policy, self.upstream_port = policy, upstream_port
        self.ca = CertificateAuthority()
        self.interceptor = TLSInterceptor(policy, self.ca, upstream_ca.trust())
        self.connections = Supervisor("test TLS proxy")
        self.port = 0

    def client_context(self, alpn=("h2", "http/1.1")) -> ssl.SSLContext:
        """What a guest has: trust in the sandbox CA only."""
        context = ssl.create_default_context(cadata=self.ca.pem)
        context.set_alpn_protocols(list(alpn))
        return context

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            self.connections.spawn(self.interceptor.handle(sock, "127.0.0.1", self.upstream_port))

    async def __aenter__(self) -> TLSInterceptProxy:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        await self.connections.start()
        self.connections.spawn(self._accept())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.connections.aclose()
        self.listener.close()


class RawH2Client:
    """A guest speaking HTTP/2 frame by frame; records every event per stream."""

    def __init__(self, auto_ack: bool = True) -> None:
        # Like curl or Go, and unlike stock h2, finish streams in flight after a GOAWAY.
        self.conn = GracefulH2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.auto_ack = auto_ack
        self.events: list = []
        self.changed = asyncio.Event()
        self.tasks = Supervisor("test h2 guest")

    async def connect(self, port: int, context: ssl.SSLContext) -> RawH2Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                                 server_hostname="localhost")  # fmt: skip
        assert self.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        self.conn.initiate_connection()
        self.flush()
        await self.tasks.start()
        self.tasks.spawn(self._read())
        return self

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    self.events.append(event)
                    if isinstance(event, h2.events.DataReceived) and self.auto_ack:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.flush()
                self.changed.set()
        self.events.append("closed")
        self.changed.set()

    def request(self, path: str, *, method: str = "GET", body: bytes = b"", trailers=None,
                authority: str = "localhost", end: bool = True) -> int:  # fmt: skip
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "https"), (":authority", authority), (":path", path)]
        self.conn.send_headers(stream_id, headers, end_stream=end and not body and not trailers)
        if body:
            self.conn.send_data(stream_id, body, end_stream=end and not trailers)
        if trailers:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        self.flush()
        return stream_id

    def of(self, stream_id: int, kind) -> list:
        return [e for e in self.events if isinstance(e, kind) and e.stream_id == stream_id]

    def body(self, stream_id: int) -> bytes:
        return b"".join(e.data for e in self.of(stream_id, h2.events.DataReceived))

    def status(self, stream_id: int) -> int:
        return int(dict(self.of(stream_id, h2.events.ResponseReceived)[0].headers)[":status"])

    async def wait_for(self, predicate, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def ended(self, stream_id: int, timeout: float = 10) -> None:
        await self.wait_for(lambda: self.of(stream_id, h2.events.StreamEnded)
                            or self.of(stream_id, h2.events.StreamReset), timeout)  # fmt: skip

    async def aclose(self) -> None:
        await self.tasks.aclose()
        self.writer.close()


@contextlib.asynccontextmanager
async def h2_through_proxy(ca: UpstreamCA, policy: NetworkPolicy, auto_ack: bool = True):
    """(upstream, proxy, guest): an HTTP/2 upstream, the intercepting proxy, and a raw guest on it."""
    async with HTTP2Upstream(ca) as upstream, TLSInterceptProxy(policy, upstream.port, ca) as proxy:
        guest = await RawH2Client(auto_ack).connect(proxy.port, proxy.client_context(("h2",)))
        try:
            yield upstream, proxy, guest
        finally:
            await guest.aclose()


async def quiet_tls_exchange(
    port: int, context: ssl.SSLContext, payload: bytes, server_name: str = "localhost"
) -> bytes:
    """A guest that sends `payload` over TLS, never sends close_notify, and reads until the proxy ends TCP.

    Returns the plaintext received. Clients that read a response to the end
    of the connection behave like this; asyncio's own client would answer
    the proxy's close_notify and hide a proxy that waits for one.
    """
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    plaintext = bytearray()
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await loop.sock_sendall(sock, outgoing.read())
                incoming.write(await loop.sock_recv(sock, 65536) or b"")
        tls.write(payload)
        await loop.sock_sendall(sock, outgoing.read())
        while data := await loop.sock_recv(sock, 65536):  # b"" only at the proxy's TCP FIN
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                while chunk := tls.read(65536):
                    plaintext += chunk
    finally:
        sock.close()
    return bytes(plaintext)
