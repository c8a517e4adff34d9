"""HTTP/1.1 through the proxy, with h11 on both sides.

One guest connection carries any number of requests (keep-alive). Each
request passes the policy (allow-list, interception rules, secrets; see
`exchange`) before anything is sent upstream; a refused one gets
`403 Blocked by policy`.
Bodies stream in both directions as they arrive (SSE, chunked, unknown
length): nothing is buffered unless a rule must rewrite a whole body. An
`Upgrade` (WebSocket) that the server accepts with 101 turns both sides into
a raw byte relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import h11

from ..policy.body_filters import BodyFilter
from ..policy.engine import Blocked, HttpRequest, NetworkPolicy
from .exchange import (
    Refusal,
    admit,
    admit_response,
    h1_text_headers,
    refusal_for,
    request_event,
    request_from_h1,
)  # fmt: skip
from .relay import Ender, pipe_both_ways
from .tls import UpstreamTLS
from .upstream import Upstream, UpstreamError, connect

READ_SIZE = 256 * 1024
MAX_HEADERS = 64 * 1024

WRITE_BUFFER_HIGH = 4 * 1024 * 1024
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 1024 * 1024


def tune_transport(writer: asyncio.StreamWriter) -> None:
    """Let a few MiB queue before `drain()` waits.

    asyncio's default (64 KiB) makes the proxy stop reading upstream whenever
    one side is briefly slower, turning a bulk transfer into a ping-pong.
    The flow stays bounded: reads pause once this much is queued.
    """
    transport = writer.transport
    if transport is not None and not transport.is_closing():
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)


class H11Stream:
    """An h11 connection driven over an asyncio stream pair."""

    def __init__(self, role, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEADERS)
        self.reader = reader
        self.writer = writer

    async def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.reader.read(READ_SIZE))

    async def send(self, event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def leftover(self) -> bytes:
        return self.conn.trailing_data[0]


def _byte_headers(headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class HTTP1Session:
    def __init__(
        self,
        policy: NetworkPolicy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        scheme: str,
        default_host: str,
        port: int,
        upstream: Upstream | None = None,
        upstream_tls: UpstreamTLS | None = None,
        end_guest: Ender | None = None,
    ) -> None:
        self.policy = policy
        self.end_guest = end_guest  # how to end the guest connection whole (TLS) when a relay's upstream ends
        self.upstream_tls = upstream_tls  # how to dial (and verify) upstream for https
        tune_transport(writer)
        self.guest = H11Stream(h11.SERVER, reader, writer)
        self.scheme = scheme
        self.default_host = default_host
        self.port = port
        # HTTPS: the connection made with the guest's SNI, and the one host every request must be for.
        self.pinned = upstream
        self.connection_host = upstream.host if upstream is not None else None
        self.upstreams: dict[tuple[str, int], tuple[Upstream, H11Stream]] = {}

    async def run(self) -> None:
        try:
            while await self._one_exchange():
                if self.guest.conn.our_state is h11.MUST_CLOSE or self.guest.conn.their_state is h11.MUST_CLOSE:
                    break
                self.guest.conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for upstream, _ in self.upstreams.values():
                upstream.close()
            if self.pinned is not None:
                self.pinned.close()
        await self._linger()

    async def _linger(self) -> None:
        """Half-close, then read and drop what the guest still sends, for a bounded while.

        Closing a socket with unread input resets the connection, and the
        reset can destroy our last response (a 403 before a large upload)
        before the guest reads it. A FIN first lets the guest read to the end
        and close (RFC 9112 §9.6). TLS has no half-close; `intercept` ends
        those connections itself."""
        writer, reader = self.guest.writer, self.guest.reader
        if not writer.can_write_eof() or writer.is_closing():
            return
        try:
            writer.write_eof()
            async with asyncio.timeout(LINGER_SECONDS):
                dropped = 0
                while dropped < LINGER_BYTES and (data := await reader.read(READ_SIZE)):
                    dropped += len(data)
        except (TimeoutError, OSError):
            pass  # the guest went on sending, or is gone: the caller closes now

    async def reply(self, refusal: Refusal) -> None:
        """Answer the guest with a plain-text status of our own (blocked, bad gateway, ...) and close."""
        with contextlib.suppress(h11.LocalProtocolError):
            await self.guest.send(h11.Response(status_code=refusal.status,
                                               headers=refusal.headers() + [(b"connection", b"close")]))  # fmt: skip
            await self.guest.send(h11.Data(data=refusal.body))
            await self.guest.send(h11.EndOfMessage())

    async def _refuse(self, request: HttpRequest, refusal: Refusal, started: float, sent: int = 0) -> bool:
        self.policy.record(request_event(request, started=started, sent=sent, refusal=refusal))
        await self.reply(refusal)
        return False

    async def _one_exchange(self) -> bool:
        event = await self.guest.next_event()
        if not isinstance(event, h11.Request):
            return False
        started = time.monotonic()
        request = request_from_h1(event, scheme=self.scheme, default_host=self.default_host, port=self.port)
        refusal = await admit(self.policy, request, connection_host=self.connection_host)
        if refusal is not None:
            return await self._refuse(request, refusal, started)
        try:
            upstream, client = await self._upstream_for(request)
        except (Blocked, UpstreamError) as exc:
            return await self._refuse(request, refusal_for(exc), started)
        await client.send(
            h11.Request(method=request.method, target=request.target, headers=_byte_headers(request.headers))
        )
        sent = await self._copy_body(self.guest, client)
        return await self._relay_response(request, upstream, client, started, sent)

    async def _upstream_for(self, request: HttpRequest) -> tuple[Upstream, H11Stream]:
        key = (request.host, request.port)
        existing = self.upstreams.get(key)
        if existing is not None and existing[1].conn.our_state is h11.IDLE:
            return existing
        if existing is not None:
            existing[0].close()
            del self.upstreams[key]
        if self.pinned is not None:
            upstream, self.pinned = self.pinned, None
        else:
            tls = self.upstream_tls if self.scheme == "https" else None
            upstream = await connect(self.policy, request.host, request.port, tls=tls)
        pair = (upstream, H11Stream(h11.CLIENT, upstream.reader, upstream.writer))
        self.upstreams[key] = pair
        return pair

    async def _copy_body(self, source: H11Stream, sink: H11Stream, body_filter: BodyFilter | None = None) -> int:
        copied = 0
        while True:
            event = await source.next_event()
            if isinstance(event, h11.Data):
                copied += len(event.data)
                data = body_filter.feed(event.data) if body_filter is not None else event.data
                if data:
                    await sink.send(h11.Data(data=data))
            elif isinstance(event, h11.EndOfMessage):
                if body_filter is not None:
                    tail = body_filter.finish()
                    if tail:
                        await sink.send(h11.Data(data=tail))
                await sink.send(h11.EndOfMessage(headers=event.headers))
                return copied
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a message body")

    async def _relay_response(
        self, request: HttpRequest, upstream: Upstream, client: H11Stream, started: float, sent: int
    ) -> bool:
        while True:
            event = await client.next_event()
            if isinstance(event, h11.InformationalResponse):
                await self.guest.send(event)
                if event.status_code == 101:  # Upgrade accepted (WebSocket): from now on raw bytes
                    self.policy.record(request_event(request, 101, started=started, sent=sent))
                    await self._switch_protocols(upstream, client)
                    return False
                continue
            if not isinstance(event, h11.Response):
                raise h11.RemoteProtocolError("upstream sent no response")
            break
        plan = await admit_response(self.policy, request, event.status_code, h1_text_headers(event.headers))
        if isinstance(plan, Refusal):  # an after-rule refused it: the unread upstream body goes with its connection
            upstream.close()
            self.upstreams.pop((upstream.host, upstream.port), None)
            return await self._refuse(request, plan, started, sent)
        headers, body_filter = plan.headers, plan.body_filter
        if body_filter is not None:
            headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
            headers.append(("Transfer-Encoding", "chunked"))
        await self.guest.send(h11.Response(status_code=event.status_code, headers=_byte_headers(headers),
                                           reason=event.reason))  # fmt: skip
        received = await self._copy_body(client, self.guest, body_filter)
        self.policy.record(request_event(request, event.status_code, started=started, sent=sent, received=received))
        if client.conn.our_state is h11.MUST_CLOSE or client.conn.their_state is h11.MUST_CLOSE:
            upstream.close()
            self.upstreams.pop((upstream.host, upstream.port), None)
        else:
            client.conn.start_next_cycle()
        return True

    async def _switch_protocols(self, upstream: Upstream, client: H11Stream) -> None:
        guest_extra, upstream_extra = self.guest.leftover(), client.leftover()
        if upstream_extra:
            self.guest.writer.write(upstream_extra)
        if guest_extra:
            upstream.writer.write(guest_extra)
        self.upstreams.pop((upstream.host, upstream.port), None)
        await pipe_both_ways(self.guest.reader, self.guest.writer, upstream.reader, upstream.writer,
                             end_a=self.end_guest)  # fmt: skip
