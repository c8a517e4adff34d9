"""Drive the proxy's sessions in-process over real loopback connections.

`PlainHTTPProxy` plays port 80: each accepted connection is an
`HTTP1Session` that dials the given upstream port. `TLSInterceptProxy`
plays port 443: each accepted socket goes through
`NetworkProxy.intercept_tls`, exactly as one redirected by nftables would
(the original destination is the upstream's port on 127.0.0.1).
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
from matchlock.net.http1 import HTTP1Session
from matchlock.net.http2 import GracefulH2Connection
from matchlock.net.proxy import NetworkProxy
from matchlock.policy.engine import NetworkPolicy
from matchlock.policy.rules import InterceptionRules
from proxy_upstreams import HTTP2Upstream, UpstreamCA


def make_policy(rules=(), callback_socket: str = "", **network) -> tuple[NetworkPolicy, list]:
    """An intercepting policy that may dial loopback (the stand-in upstreams live there)."""
    events: list = []
    network.setdefault("block_private_ips", False)
    policy = NetworkPolicy(NetworkConfig(intercept=True, **network), events.append)
    if rules:
        parsed = tuple(InterceptionRule.from_json(rule) for rule in rules)
        policy.rules = InterceptionRules(InterceptionConfig(parsed, callback_socket))
    return policy, events


class PlainHTTPProxy:
    def __init__(self, policy: NetworkPolicy, upstream_port: int) -> None:
        self.policy, self.upstream_port = policy, upstream_port
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.sessions: set[asyncio.Task] = set()

    async def _session(self, reader, writer) -> None:
        self.writers.add(writer)
        self.sessions.add(asyncio.current_task())
        try:
            await HTTP1Session(self.policy, reader, writer, scheme="http", default_host="127.0.0.1",
                               port=self.upstream_port).run()  # fmt: skip
        finally:
            self.writers.discard(writer)
            self.sessions.discard(asyncio.current_task())

    async def __aenter__(self) -> PlainHTTPProxy:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for writer in list(self.writers):  # sessions end on their own once the guest side closes
            writer.close()
        if self.sessions:
            await asyncio.wait(set(self.sessions), timeout=5)


class TLSInterceptProxy:
    def __init__(self, policy: NetworkPolicy, upstream_port: int) -> None:
        self.policy, self.upstream_port = policy, upstream_port
        self.proxy = NetworkProxy(None, policy, ["127.0.0.1"])  # type: ignore[arg-type]  # no namespace needed
        self.tasks: set[asyncio.Task] = set()
        self.port = 0

    def client_context(self, alpn=("h2", "http/1.1")) -> ssl.SSLContext:
        """What a guest has: trust in the sandbox CA only."""
        context = ssl.create_default_context(cadata=self.proxy.ca.pem)
        context.set_alpn_protocols(list(alpn))
        return context

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            task = asyncio.ensure_future(self.proxy.intercept_tls(sock, "127.0.0.1", self.upstream_port))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def __aenter__(self) -> TLSInterceptProxy:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.acceptor = asyncio.ensure_future(self._accept())
        return self

    async def __aexit__(self, *exc) -> None:
        self.acceptor.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(self.acceptor, *self.tasks, return_exceptions=True)
        self.listener.close()


class RawH2Client:
    """A guest speaking HTTP/2 frame by frame; records every event per stream."""

    def __init__(self, auto_ack: bool = True) -> None:
        # Like curl or Go, and unlike stock h2, finish streams in flight after a GOAWAY.
        self.conn = GracefulH2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.auto_ack = auto_ack
        self.events: list = []
        self.changed = asyncio.Event()

    async def connect(self, port: int, context: ssl.SSLContext) -> RawH2Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                                 server_hostname="localhost")  # fmt: skip
        assert self.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        self.conn.initiate_connection()
        self.flush()
        self.reading = asyncio.ensure_future(self._read())
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

    def close(self) -> None:
        self.reading.cancel()
        self.writer.close()


@contextlib.asynccontextmanager
async def h2_through_proxy(ca: UpstreamCA, policy: NetworkPolicy, auto_ack: bool = True):
    """(upstream, proxy, guest): an HTTP/2 upstream, the intercepting proxy, and a raw guest on it."""
    async with HTTP2Upstream(ca) as upstream, TLSInterceptProxy(policy, upstream.port) as proxy:
        guest = await RawH2Client(auto_ack).connect(proxy.port, proxy.client_context(("h2",)))
        try:
            yield upstream, proxy, guest
        finally:
            guest.close()
