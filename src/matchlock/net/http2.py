"""HTTP/2 through TLS interception, with h2 on both sides.

The guest's connection (we are its server) and one upstream connection
(we are its client, made with the guest's SNI) are relayed stream by
stream. Each request passes the policy before its upstream stream is
opened; a refused one gets its 403 on that stream alone. Flow control is
end to end: data from one side is acknowledged only once it has been
forwarded to the other, so a slow reader slows its writer and nothing
queues beyond the advertised windows. Resets cross over stream by stream;
a GOAWAY from either side lets streams in flight finish and new requests
move to a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ..policy.engine import Blocked, HttpRequest, NetworkPolicy
from ..policy.hosts import normalise_host
from .http1 import split_target
from .upstream import Upstream

READ_SIZE = 64 * 1024
STREAM_WINDOW = 1 << 20  # per stream: room for bulk transfers at LAN speed
CONNECTION_WINDOW = 4 << 20  # the most either side can have us hold unforwarded
MAX_CONCURRENT_STREAMS = 100
DEFAULT_WINDOW = 65535  # every HTTP/2 connection window starts here (RFC 9113 §6.9.2)
CONNECTION_SPECIFIC = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
StreamError = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError)


class GracefulH2Connection(h2.connection.H2Connection):
    """h2 ends the whole connection on any GOAWAY, sent or received (python-hyper/h2#1181).

    RFC 9113 §6.8 lets streams already in flight finish, and clients such as
    Node's send GOAWAY right after their last request and still read its
    response. So the open state survives a GOAWAY here, and the session
    itself refuses new streams once one was exchanged.
    """

    def _receive_goaway_frame(self, frame):
        previous = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = previous
        return result

    def clear_outbound_data_buffer(self) -> None:
        pass  # h2 calls this only on GOAWAY; acknowledgements queued before it must still go out

    def announce_goaway(self, last_stream_id: int | None = None) -> None:
        previous = self.state_machine.state
        self.close_connection(last_stream_id=last_stream_id)
        self.state_machine.state = previous


class Side:
    """One end of the relay: an h2 connection over a stream pair."""

    def __init__(self, client_side: bool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        self.conn = GracefulH2Connection(config)
        self.reader, self.writer = reader, writer
        self.lost = False
        self._changed = asyncio.Event()

    def start(self, settings: dict) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings(settings)
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)

    def pulse(self) -> None:
        """Wake everything waiting for a window or a stream slot to re-check."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_changed(self) -> None:
        if self.lost:
            raise ConnectionError("the connection is gone")
        await self._changed.wait()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.lost:
            self.writer.write(data)
            await self.writer.drain()

    async def send_data(self, stream_id: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            size = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size, len(view))
            if size <= 0:
                await self.wait_changed()
                continue
            self.conn.send_data(stream_id, view[:size].tobytes())
            view = view[size:]
            await self.flush()

    def reset(self, stream_id: int | None, code=h2.errors.ErrorCodes.CANCEL) -> None:
        if stream_id is not None:
            with contextlib.suppress(*StreamError):
                self.conn.reset_stream(stream_id, code)


class Frames:
    """One direction of one stream, in arrival order; bounded by the flow-control window."""

    def __init__(self) -> None:
        self.items: deque[tuple[str, object, int]] = deque()
        self.ended = False  # the sending side finished this direction
        self._ready = asyncio.Event()

    def put(self, kind: str, payload: object = None, flow: int = 0) -> None:
        self.items.append((kind, payload, flow))
        self.ended = self.ended or kind == "end"
        self._ready.set()

    async def get(self) -> tuple[str, object, int]:
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        return self.items.popleft()

    def next_kind(self) -> str | None:
        return self.items[0][0] if self.items else None


class Exchange:
    def __init__(self, guest_id: int) -> None:
        self.guest_id = guest_id
        self.upstream_id: int | None = None
        self.request = Frames()
        self.response = Frames()
        self.request_sent_upstream = False  # END_STREAM went upstream
        self.sent = self.received = 0
        self.task: asyncio.Task | None = None


def outbound_headers(headers) -> list[tuple[bytes, bytes]]:
    """Regular headers as HTTP/2 wants them: lower-case names, no connection-specific fields."""
    out = []
    for name, value in headers:
        key = (name.encode("latin-1") if isinstance(name, str) else name).lower()
        data = (value.encode("latin-1") if isinstance(value, str) else value).strip()
        if key.startswith(b":") or key in CONNECTION_SPECIFIC or (key == b"te" and data.lower() != b"trailers"):
            continue
        out.append((key, data))
    return out


def text_headers(headers) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if not k.startswith(b":")]


class HTTP2Session:
    def __init__(self, policy: NetworkPolicy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 server_name: str, port: int, upstream: Upstream) -> None:  # fmt: skip
        self.policy = policy
        self.server_name = normalise_host(server_name)
        self.port = port
        self.guest = Side(False, reader, writer)
        self.upstream = Side(True, upstream.reader, upstream.writer)
        self.by_guest: dict[int, Exchange] = {}
        self.by_upstream: dict[int, Exchange] = {}
        self.closing = False  # a GOAWAY was exchanged or upstream is gone: no new streams
        self._finished = asyncio.Event()

    async def run(self) -> None:
        readers: list[asyncio.Task] = []
        try:
            self.guest.start({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                              h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})  # fmt: skip
            self.upstream.start({h2.settings.SettingCodes.ENABLE_PUSH: 0,
                                 h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})  # fmt: skip
            await self._flush_both()
            readers = [
                asyncio.ensure_future(self._read(self.guest, self._on_guest_event, self._guest_gone)),
                asyncio.ensure_future(self._read(self.upstream, self._on_upstream_event, self._upstream_gone)),
            ]
            await self._finished.wait()
        except (ConnectionError, OSError):
            pass
        finally:
            for task in readers + [ex.task for ex in self.by_guest.values() if ex.task is not None]:
                task.cancel()
            with contextlib.suppress(Exception):
                self.guest.conn.announce_goaway()
                self.upstream.conn.announce_goaway()
                await asyncio.wait_for(self._flush_both(), 1)
            for side in (self.guest, self.upstream):
                side.lost = True
                side.writer.close()

    # --- reading ---------------------------------------------------------------------

    async def _read(self, side: Side, handle, gone) -> None:
        cancelled = False
        try:
            while data := await side.reader.read(READ_SIZE):
                try:
                    events = side.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    with contextlib.suppress(Exception):
                        await side.flush()  # h2 queued a GOAWAY saying why
                    break
                for event in events:
                    handle(event)
                side.pulse()
                await self._flush_both()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            cancelled = True  # the session is already ending on its own terms
            raise
        finally:
            if not cancelled:
                gone()

    async def _flush_both(self) -> None:
        await self.guest.flush()
        await self.upstream.flush()

    def _on_guest_event(self, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            if self.closing:
                self.guest.reset(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            exchange = Exchange(event.stream_id)
            self.by_guest[event.stream_id] = exchange
            exchange.task = asyncio.ensure_future(self._serve(exchange, event.headers))
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self._closing_down(finish_now=event.error_code != h2.errors.ErrorCodes.NO_ERROR)
            return
        self._on_stream_event(event, self.guest, self.by_guest.get(getattr(event, "stream_id", None)))

    def _on_upstream_event(self, event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            for exchange in list(self.by_guest.values()):
                if exchange.upstream_id is not None and exchange.upstream_id > (event.last_stream_id or 0):
                    self._abandon(exchange, h2.errors.ErrorCodes.REFUSED_STREAM)  # never processed: safe to retry
            self._closing_down(finish_now=False)
            return
        exchange = self.by_upstream.get(getattr(event, "stream_id", None))
        if exchange is not None and isinstance(event, h2.events.InformationalResponseReceived):
            exchange.response.put("info", event.headers)
        elif exchange is not None and isinstance(event, h2.events.ResponseReceived):
            exchange.response.put("headers", event.headers)
        else:
            self._on_stream_event(event, self.upstream, exchange)

    def _on_stream_event(self, event, source: Side, exchange: Exchange | None) -> None:
        """Data, trailers, end and reset of a stream: queued for the pump that forwards them."""
        if isinstance(event, h2.events.DataReceived) and exchange is None:
            # Nobody will forward it: give the window back at once.
            source.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if exchange is None:
            return
        from_guest = source is self.guest
        frames = exchange.request if from_guest else exchange.response
        if isinstance(event, h2.events.DataReceived):
            frames.put("data", event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            frames.put("trailers", event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            frames.put("end")
        elif isinstance(event, h2.events.StreamReset):
            if from_guest:
                self.upstream.reset(exchange.upstream_id, event.error_code)
            elif exchange.response.ended:
                return  # upstream answered in full and only refuses the rest of the upload
            else:
                self.guest.reset(exchange.guest_id, event.error_code)
            exchange.task.cancel()

    def _guest_gone(self) -> None:
        self.guest.lost = True
        self.guest.pulse()
        self._finished.set()

    def _upstream_gone(self) -> None:
        """Upstream closed: responses already complete still reach the guest, the rest are cut."""
        self.upstream.lost = True
        self.upstream.pulse()
        for exchange in list(self.by_guest.values()):
            if not exchange.response.ended:
                refused = exchange.upstream_id is None
                self._abandon(exchange, h2.errors.ErrorCodes.REFUSED_STREAM if refused else h2.errors.ErrorCodes.CANCEL)
        self._closing_down(finish_now=False)

    def _abandon(self, exchange: Exchange, code) -> None:
        self.guest.reset(exchange.guest_id, code)
        self.upstream.reset(exchange.upstream_id)
        if exchange.task is not None:
            exchange.task.cancel()

    def _closing_down(self, *, finish_now: bool) -> None:
        """No new streams from now on; the session ends once the streams in flight are done.

        The guest hears GOAWAY only then: many clients (h2-based ones among
        them) drop every response still in flight when a GOAWAY arrives."""
        self.closing = True
        if finish_now or not self.by_guest:
            self._finished.set()

    # --- one exchange ------------------------------------------------------------------

    def _request(self, headers) -> tuple[HttpRequest, bytes]:
        pseudo = {k: v for k, v in headers if k.startswith(b":")}
        authority = pseudo.get(b":authority") or next((v for k, v in headers if k == b"host"), b"")
        path, query = split_target(pseudo.get(b":path", b"").decode("latin-1"))
        request = HttpRequest(method=pseudo.get(b":method", b"").decode("latin-1"), scheme="https",
                              host=normalise_host(authority.decode("latin-1")) or self.server_name, port=self.port,
                              path=path, query=query, headers=text_headers(headers))  # fmt: skip
        return request, authority

    def _check(self, request: HttpRequest, headers) -> None:
        if request.method == "CONNECT" or not any(k == b":path" for k, _ in headers):
            raise Blocked("CONNECT is not supported through the proxy", 405)
        if request.host != self.server_name:  # one upstream connection serves one name
            raise Blocked(f"request for {request.host} on a TLS connection to {self.server_name}", 421)

    async def _serve(self, exchange: Exchange, headers) -> None:
        started = time.monotonic()
        try:
            request, authority = self._request(headers)
            try:
                self._check(request, headers)
                await self.policy.prepare_request(request)
            except Blocked as exc:
                self.policy.event(method=request.method, url=request.url, host=request.host, status=exc.status,
                                  started=started, blocked=True, reason=exc.reason)  # fmt: skip
                await self._refuse(exchange, exc.status, f"Blocked by policy: {exc.reason}")
                return
            await self._open_upstream(exchange, request, authority)
            status = await self._relay(exchange, request)
            if status:
                self.policy.event(method=request.method, url=request.url, host=request.host, status=status,
                                  request_bytes=exchange.sent, response_bytes=exchange.received,
                                  started=started)  # fmt: skip
        except (*StreamError, ConnectionError):
            self._abandon_quietly(exchange)
        except Exception:
            self._abandon_quietly(exchange)  # never leave the guest's stream hanging, even on a bug
            raise
        finally:
            await self._forget(exchange)

    def _abandon_quietly(self, exchange: Exchange) -> None:
        self.guest.reset(exchange.guest_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.upstream.reset(exchange.upstream_id)

    async def _open_upstream(self, exchange: Exchange, request: HttpRequest, authority: bytes) -> None:
        conn = self.upstream.conn
        while not self.closing and conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams:
            await self.upstream.wait_changed()
        if self.closing:
            self.guest.reset(exchange.guest_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            raise ConnectionError("upstream connection is closing")
        stream_id = conn.get_next_available_stream_id()
        ends_here = exchange.request.next_kind() == "end"
        head = [(b":method", request.method.encode("latin-1")), (b":scheme", b"https"), (b":authority", authority),
                (b":path", request.target.encode("latin-1"))]  # fmt: skip
        conn.send_headers(stream_id, head + outbound_headers(request.headers), end_stream=ends_here)
        exchange.upstream_id = stream_id
        exchange.request_sent_upstream = ends_here
        self.by_upstream[stream_id] = exchange
        await self.upstream.flush()

    async def _relay(self, exchange: Exchange, request: HttpRequest) -> int:
        """Both directions at once; returns the response status (0 when refused by an after-rule)."""
        requests = asyncio.ensure_future(self._pump_request(exchange))
        responses = asyncio.ensure_future(self._pump_response(exchange, request))
        try:
            await asyncio.wait({requests, responses}, return_when=asyncio.FIRST_COMPLETED)
            # The upload may fail once upstream has answered in full and reset the stream
            # (RFC 9113 §8.1); that answer still goes to the guest.
            if requests.done() and requests.exception() is not None and not exchange.response.ended:
                raise requests.exception()
            status = await responses
            if not exchange.request.ended:  # answered before the guest finished sending: stop its upload
                self.guest.reset(exchange.guest_id, h2.errors.ErrorCodes.NO_ERROR)
            if not requests.done():
                self.upstream.reset(exchange.upstream_id, h2.errors.ErrorCodes.NO_ERROR)
            return status
        finally:
            for task in (requests, responses):
                task.cancel()

    async def _pump_request(self, exchange: Exchange) -> None:
        while True:
            kind, payload, flow = await exchange.request.get()
            if kind == "data":
                await self.upstream.send_data(exchange.upstream_id, payload)
                exchange.sent += len(payload)
                self.guest.conn.acknowledge_received_data(flow, exchange.guest_id)
                await self.guest.flush()
            elif kind == "trailers":
                self.upstream.conn.send_headers(exchange.upstream_id, outbound_headers(payload), end_stream=True)
                exchange.request_sent_upstream = True
                await self.upstream.flush()
            else:
                if not exchange.request_sent_upstream:
                    self.upstream.conn.end_stream(exchange.upstream_id)
                    exchange.request_sent_upstream = True
                    await self.upstream.flush()
                return

    async def _pump_response(self, exchange: Exchange, request: HttpRequest) -> int:
        guest, stream = self.guest, exchange.guest_id
        while True:
            kind, payload, _ = await exchange.response.get()
            if kind != "info":
                break
            guest.conn.send_headers(stream, [(k, v) for k, v in payload if k == b":status"] + outbound_headers(payload))
            await guest.flush()
        status = int(dict(payload)[b":status"])
        try:
            headers, body_filter = await self.policy.prepare_response(request, status, text_headers(payload))
        except Blocked as exc:
            self.upstream.reset(exchange.upstream_id)
            self.policy.event(method=request.method, url=request.url, host=request.host, status=exc.status,
                              request_bytes=exchange.sent, blocked=True, reason=exc.reason)  # fmt: skip
            await self._refuse(exchange, exc.status, f"Blocked by policy: {exc.reason}")
            return 0
        if body_filter is not None:
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        ends_here = body_filter is None and exchange.response.next_kind() == "end"
        head = [(b":status", str(status).encode())] + outbound_headers(headers)
        guest.conn.send_headers(stream, head, end_stream=ends_here)
        await guest.flush()
        while not ends_here:
            kind, payload, flow = await exchange.response.get()
            if kind == "data":
                await guest.send_data(stream, body_filter.feed(payload) if body_filter is not None else payload)
                exchange.received += len(payload)
                self.upstream.conn.acknowledge_received_data(flow, exchange.upstream_id)
                await self.upstream.flush()
                continue
            if body_filter is not None:
                await guest.send_data(stream, body_filter.finish())
            if kind == "trailers":
                guest.conn.send_headers(stream, outbound_headers(payload), end_stream=True)
            else:
                guest.conn.end_stream(stream)
            await guest.flush()
            break
        return status

    async def _refuse(self, exchange: Exchange, status: int, message: str) -> None:
        body = f"{message}\n".encode()
        head = [(b":status", str(status).encode()), (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode())]  # fmt: skip
        self.guest.conn.send_headers(exchange.guest_id, head)
        await self.guest.send_data(exchange.guest_id, body)
        self.guest.conn.end_stream(exchange.guest_id)
        if not exchange.request.ended:  # RFC 9113 §8.1: a complete answer may stop the upload
            self.guest.reset(exchange.guest_id, h2.errors.ErrorCodes.NO_ERROR)
        await self.guest.flush()

    async def _forget(self, exchange: Exchange) -> None:
        """Drop the exchange and give back the window of anything it still held."""
        self.by_guest.pop(exchange.guest_id, None)
        if exchange.upstream_id is not None:
            self.by_upstream.pop(exchange.upstream_id, None)
        for frames, side, stream in ((exchange.request, self.guest, exchange.guest_id),
                                     (exchange.response, self.upstream, exchange.upstream_id)):  # fmt: skip
            for _, _, flow in frames.items:
                if flow and stream is not None:
                    side.conn.acknowledge_received_data(flow, stream)
            frames.items.clear()
        if self.closing and not self.by_guest:
            self._finished.set()
        with contextlib.suppress(Exception):
            await self._flush_both()
