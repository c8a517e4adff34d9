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
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ..policy.engine import HttpRequest, NetworkPolicy
from ..policy.hosts import normalise_host
from .exchange import Refusal, admit, admit_response, h2_text_headers, request_event, request_from_h2
from .upstream import Upstream

READ_SIZE = 64 * 1024
STREAM_WINDOW = 1 << 20  # per stream: room for bulk transfers at LAN speed
CONNECTION_WINDOW = 4 << 20  # the most either side can have us hold unforwarded
MAX_CONCURRENT_STREAMS = 100
DEFAULT_WINDOW = 65535  # every HTTP/2 connection window starts here (RFC 9113 §6.9.2)
CONNECTION_SPECIFIC = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
StreamError = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError)
StreamGone = (*StreamError, ConnectionError)  # what ends one stream without being a bug


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
        self.items: deque[tuple[str, Any, int]] = deque()  # (kind, payload, flow-controlled length)
        self.ended = False  # the sending side finished this direction
        self._ready = asyncio.Event()

    def put(self, kind: str, payload: Any = None, flow: int = 0) -> None:
        self.items.append((kind, payload, flow))
        self.ended = self.ended or kind == "end"
        self._ready.set()

    async def get(self) -> tuple[str, Any, int]:
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        return self.items.popleft()

    def next_kind(self) -> str | None:
        return self.items[0][0] if self.items else None


class Exchange:
    """One guest stream and the upstream stream it is relayed to."""

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


def _stream_of(event) -> int:
    return getattr(event, "stream_id", None) or 0  # 0 is the connection itself: never an exchange


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
        # Upstream said GOAWAY or went: guest requests not yet sent there can no longer be. A guest's
        # own GOAWAY stops only its new requests; those it already made still go upstream.
        self.upstream_closing = False
        self._finished = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None  # owns the readers and every stream's task

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self.guest.start({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                                  h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})  # fmt: skip
                self.upstream.start({h2.settings.SettingCodes.ENABLE_PUSH: 0,
                                     h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})  # fmt: skip
                await self._flush_both()
                readers = [
                    group.create_task(self._read(self.guest, self._on_guest_event, self._guest_gone)),
                    group.create_task(self._read(self.upstream, self._on_upstream_event, self._upstream_gone)),
                ]
                try:
                    await self._finished.wait()
                finally:
                    # Also when the proxy cancels us: streams ending now must not wait to flush.
                    self._finished.set()
                    for task in readers + [ex.task for ex in self.by_guest.values() if ex.task is not None]:
                        task.cancel()
        except* (ConnectionError, OSError):
            pass
        finally:
            self._group = None
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
            assert self._group is not None  # events are only read inside run()'s group
            exchange = Exchange(event.stream_id)
            self.by_guest[event.stream_id] = exchange
            exchange.task = self._group.create_task(self._serve(exchange, event.headers))
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self._closing_down(finish_now=event.error_code != h2.errors.ErrorCodes.NO_ERROR)
            return
        self._on_stream_event(event, self.guest, self.by_guest.get(_stream_of(event)))

    def _on_upstream_event(self, event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            for open_exchange in list(self.by_guest.values()):
                if open_exchange.upstream_id is not None and open_exchange.upstream_id > (event.last_stream_id or 0):
                    self._abandon(open_exchange, h2.errors.ErrorCodes.REFUSED_STREAM)  # never processed: retryable
            self.upstream_closing = True
            self._closing_down(finish_now=False)
            return
        exchange = self.by_upstream.get(_stream_of(event))
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
            if exchange.task is not None:
                exchange.task.cancel()

    def _guest_gone(self) -> None:
        self.guest.lost = True
        self.guest.pulse()
        self._finished.set()

    def _upstream_gone(self) -> None:
        """Upstream closed: responses already complete still reach the guest, the rest are cut."""
        self.upstream.lost = True
        self.upstream_closing = True
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

    async def _serve(self, exchange: Exchange, headers) -> None:
        try:
            await self._exchange(exchange, headers)
        except* StreamGone:
            self._abandon_quietly(exchange)
        except* Exception:
            self._abandon_quietly(exchange)  # never leave the guest's stream hanging, even on a bug
            raise
        finally:
            await self._forget(exchange)

    async def _exchange(self, exchange: Exchange, headers) -> None:
        started = time.monotonic()
        request, authority = request_from_h2(headers, server_name=self.server_name, port=self.port)
        # One upstream connection serves one name.
        refusal = await admit(self.policy, request, connection_host=self.server_name,
                              has_path=any(k == b":path" for k, _ in headers))  # fmt: skip
        if refusal is not None:
            self.policy.record(request_event(request, started=started, refusal=refusal))
            await self._refuse(exchange, refusal)
            return
        await self._open_upstream(exchange, request, authority)
        status = await self._relay(exchange, request, started)
        if status:
            self.policy.record(request_event(request, status, started=started, sent=exchange.sent,
                                             received=exchange.received))  # fmt: skip

    def _abandon_quietly(self, exchange: Exchange) -> None:
        self.guest.reset(exchange.guest_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.upstream.reset(exchange.upstream_id)

    async def _open_upstream(self, exchange: Exchange, request: HttpRequest, authority: bytes) -> None:
        conn = self.upstream.conn
        while not self.upstream_closing and conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams:
            await self.upstream.wait_changed()
        if self.upstream_closing:
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

    async def _relay(self, exchange: Exchange, request: HttpRequest, started: float) -> int:
        """Both directions at once; returns the response status (0 when refused by an after-rule)."""
        async with asyncio.TaskGroup() as group:
            upload = group.create_task(self._upload(exchange))
            status = await self._pump_response(exchange, request, started)
            if not exchange.request.ended:  # answered before the guest finished sending: stop its upload
                self.guest.reset(exchange.guest_id, h2.errors.ErrorCodes.NO_ERROR)
            if not upload.done():
                self.upstream.reset(exchange.upstream_id, h2.errors.ErrorCodes.NO_ERROR)
                upload.cancel()
        return status

    async def _upload(self, exchange: Exchange) -> None:
        try:
            await self._pump_request(exchange)
        except StreamGone:
            # The upload may fail once upstream has answered in full and reset the stream
            # (RFC 9113 §8.1); that answer still goes to the guest.
            if not exchange.response.ended:
                raise

    async def _pump_request(self, exchange: Exchange) -> None:
        assert exchange.upstream_id is not None  # opened before the pumps start
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

    async def _pump_response(self, exchange: Exchange, request: HttpRequest, started: float) -> int:
        guest, stream = self.guest, exchange.guest_id
        while True:
            kind, payload, _ = await exchange.response.get()
            if kind != "info":
                break
            guest.conn.send_headers(stream, [(k, v) for k, v in payload if k == b":status"] + outbound_headers(payload))
            await guest.flush()
        status = int(dict(payload)[b":status"])
        plan = await admit_response(self.policy, request, status, h2_text_headers(payload))
        if isinstance(plan, Refusal):
            self.upstream.reset(exchange.upstream_id)
            self.policy.record(request_event(request, started=started, sent=exchange.sent, refusal=plan))
            await self._refuse(exchange, plan)
            return 0
        headers, body_filter = plan.headers, plan.body_filter
        if body_filter is not None:
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        ends_here = body_filter is None and exchange.response.next_kind() == "end"
        assert exchange.upstream_id is not None
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

    async def _refuse(self, exchange: Exchange, refusal: Refusal) -> None:
        self.guest.conn.send_headers(
            exchange.guest_id, [(b":status", str(refusal.status).encode())] + refusal.headers()
        )
        await self.guest.send_data(exchange.guest_id, refusal.body)
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
        if self._finished.is_set():
            return  # the session is ending: nothing more goes out on either side
        if self.closing and not self.by_guest:
            self._finished.set()
        with contextlib.suppress(Exception):
            await self._flush_both()
