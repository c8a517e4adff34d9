"""Stream multiplexer with per-stream flow control (sans-IO, stdlib only).

One `Connection` sits on each end of a virtio-serial port. Bytes from the
port go into `receive_data()`, which returns events; calls such as
`open_stream()` or `send_data()` queue frames that the caller collects with
`data_to_send()` and writes to the port. No I/O happens here, so the same
code runs in the guest agent (selectors) and on the host (asyncio) and is
unit-tested without a VM.

Streams opened by the host have odd ids, streams opened by the guest even
ids. Each stream carries up to three byte channels (stdin, stdout, stderr)
and JSON control messages. DATA bytes are flow-controlled per stream: a side
may only send as many bytes as the peer has granted with WINDOW frames, so a
slow consumer of one stream never blocks the others and never makes its peer
buffer without bound.
"""

from __future__ import annotations

import struct

from . import jsonlite
from ._records import Record
from .frames import KIND_NAMES, MAX_PAYLOAD, MAX_STREAM_ID, Frame, FrameDecoder, FrameKind, ProtocolError, encode_frame

PROTOCOL_NAME = "matchlock-wire"
PROTOCOL_VERSION = 1
INITIAL_WINDOW = 256 * 1024
MAX_HELLO = 64 * 1024
MAX_WINDOW = (1 << 31) - 1
DATA_CHUNK = 64 * 1024

STDIN, STDOUT, STDERR = 0, 1, 2
CHANNELS = (STDIN, STDOUT, STDERR)

_U32 = struct.Struct(">I")


# Frames with a tiny fixed payload; their exact size is checked with the
# payload, this bound only stops a header from making us wait for megabytes.
_SMALL_FRAMES = (FrameKind.EOF, FrameKind.WINDOW, FrameKind.CLOSE)
_SMALL_FRAME_LIMIT = 16


class Role:
    HOST = "host"
    GUEST = "guest"


class HandshakeError(ProtocolError):
    """The peer speaks a different protocol or version."""


class FlowControlError(Exception):
    """Local misuse: tried to send more than the peer granted."""


# --- events -----------------------------------------------------------------


class HelloReceived(Record):
    __slots__ = ("info",)


class StreamOpened(Record):
    __slots__ = ("stream", "request")


class DataReceived(Record):
    __slots__ = ("stream", "channel", "data")


class ChannelEnded(Record):
    __slots__ = ("stream", "channel")


class MessageReceived(Record):
    __slots__ = ("stream", "message")


class StreamClosed(Record):
    """The peer will send nothing more on this stream."""

    __slots__ = ("stream",)


class StreamReset(Record):
    __slots__ = ("stream", "reason")


class WindowOpened(Record):
    """The peer granted more send credit on this stream."""

    __slots__ = ("stream",)


Event = (
    HelloReceived
    | StreamOpened
    | DataReceived
    | ChannelEnded
    | MessageReceived
    | StreamClosed
    | StreamReset
    | WindowOpened
)


class _Stream:
    __slots__ = ("send_window", "recv_window", "unacked", "local_closed", "remote_closed", "ended_remote_channels")

    def __init__(self, window: int) -> None:
        self.send_window = window
        self.recv_window = window
        self.unacked = 0
        self.local_closed = False
        self.remote_closed = False
        self.ended_remote_channels: set[int] = set()


def _decode_json(payload: bytes, what: str) -> dict:
    try:
        value = jsonlite.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed JSON in {what} frame: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} frame must carry a JSON object, got {type(value).__name__}")
    return value


def _encode_json(value: dict) -> bytes:
    return jsonlite.dumps(value)


class Connection:
    def __init__(
        self,
        role: Role,
        *,
        features: tuple[str, ...] = (),
        initial_window: int = INITIAL_WINDOW,
    ) -> None:
        self.role = role
        self.features = frozenset(features)
        self.peer_info: dict | None = None
        self.negotiated_features: frozenset[str] = frozenset()
        self._initial_window = initial_window
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if role == Role.HOST else 2
        # Highest stream id ever opened by each side: frames for a lower id
        # whose stream is gone are late arrivals and are dropped.
        self._highest_local = 0
        self._highest_remote = 0
        self._hello_sent = False
        self._broken: str | None = None

    # --- handshake ------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self._hello_sent and self.peer_info is not None

    def send_hello(self, info: dict | None = None) -> None:
        if self._hello_sent:
            raise RuntimeError("hello already sent")
        body = {
            "protocol": PROTOCOL_NAME,
            "version": PROTOCOL_VERSION,
            "role": self.role,
            "features": sorted(self.features),
        }
        if info:
            body["info"] = info
        self._emit(FrameKind.HELLO, 0, _encode_json(body))
        self._hello_sent = True

    def _on_hello(self, payload: bytes) -> HelloReceived:
        if self.peer_info is not None:
            raise ProtocolError("duplicate HELLO")
        hello = _decode_json(payload, "HELLO")
        if hello.get("protocol") != PROTOCOL_NAME:
            raise HandshakeError(f"peer speaks {hello.get('protocol')!r}, not {PROTOCOL_NAME!r}")
        version = hello.get("version")
        if version != PROTOCOL_VERSION:
            raise HandshakeError(
                f"peer speaks {PROTOCOL_NAME} version {version!r} but this side speaks "
                f"version {PROTOCOL_VERSION}; the host and the guest runtime are from "
                "different matchlock releases (rebuild the guest runtime disk)"
            )
        expected_role = Role.GUEST if self.role == Role.HOST else Role.HOST
        if hello.get("role") != expected_role:
            raise HandshakeError(f"peer claims role {hello.get('role')!r}, expected {expected_role!r}")
        features = hello.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ProtocolError("HELLO features must be a list of strings")
        info = hello.get("info", {})
        if not isinstance(info, dict):
            raise ProtocolError("HELLO info must be a JSON object")
        self.negotiated_features = self.features & frozenset(features)
        self.peer_info = info
        return HelloReceived(info)

    # --- sending --------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _emit(self, kind: int, stream: int, payload: bytes = b"") -> None:
        self._out += encode_frame(kind, stream, payload)

    def _require_ready(self) -> None:
        if self._broken:
            raise ProtocolError(f"connection is broken: {self._broken}")
        if not self.handshake_complete:
            raise RuntimeError("handshake not complete")

    def open_stream(self, request: dict) -> int:
        self._require_ready()
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise ProtocolError("stream ids exhausted")
        self._next_id += 2
        self._highest_local = stream_id
        self._streams[stream_id] = _Stream(self._initial_window)
        self._emit(FrameKind.OPEN, stream_id, _encode_json(request))
        return stream_id

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return stream.send_window

    def send_data(self, stream_id: int, channel: int, data: bytes) -> None:
        stream = self._open_local(stream_id)
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel}")
        if len(data) > stream.send_window:
            raise FlowControlError(
                f"stream {stream_id}: {len(data)} bytes exceed the send window of {stream.send_window}"
            )
        stream.send_window -= len(data)
        prefix = bytes((channel,))
        for start in range(0, len(data), DATA_CHUNK):
            self._emit(FrameKind.DATA, stream_id, prefix + data[start : start + DATA_CHUNK])

    def end_channel(self, stream_id: int, channel: int) -> None:
        self._open_local(stream_id)
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel}")
        self._emit(FrameKind.EOF, stream_id, bytes((channel,)))

    def send_message(self, stream_id: int, message: dict) -> None:
        if stream_id != 0:
            self._open_local(stream_id)
        else:
            self._require_ready()
        payload = _encode_json(message)
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"message of {len(payload)} bytes is too large for one frame")
        self._emit(FrameKind.MESSAGE, stream_id, payload)

    def close_stream(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        stream.local_closed = True
        self._emit(FrameKind.CLOSE, stream_id)
        self._maybe_forget(stream_id, stream)

    def reset_stream(self, stream_id: int, reason: str) -> None:
        if self._streams.pop(stream_id, None) is None:
            return
        self._emit(FrameKind.RESET, stream_id, _encode_json({"reason": reason[:4096]}))

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """Report that the application processed `nbytes` of received DATA.

        Credit goes back to the peer in batches, so a busy stream costs one
        WINDOW frame per quarter window rather than one per chunk.
        """
        stream = self._streams.get(stream_id)
        if stream is None or nbytes <= 0:
            return
        stream.unacked += nbytes
        if stream.unacked >= self._initial_window // 4 and not stream.remote_closed:
            stream.recv_window += stream.unacked
            self._emit(FrameKind.WINDOW, stream_id, _U32.pack(stream.unacked))
            stream.unacked = 0

    def _open_local(self, stream_id: int) -> _Stream:
        self._require_ready()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise KeyError(f"stream {stream_id} is not open")
        if stream.local_closed:
            raise RuntimeError(f"stream {stream_id} already closed by this side")
        return stream

    def _maybe_forget(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._streams.pop(stream_id, None)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def open_streams(self) -> list[int]:
        return list(self._streams)

    # --- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        if self._broken:
            raise ProtocolError(f"connection is broken: {self._broken}")
        self._decoder.push(data)
        events: list[Event] = []
        try:
            while (frame := self._decoder.next_frame(self._check_header)) is not None:
                event = self._on_frame(frame)
                if event is not None:
                    events.append(event)
        except ProtocolError as exc:
            self._broken = str(exc)
            raise
        return events

    def _check_header(self, kind: int, stream_id: int, length: int) -> None:
        """Reject a frame from its header alone, before waiting for its payload."""
        if self.peer_info is None:
            if kind != FrameKind.HELLO:
                raise ProtocolError(f"{KIND_NAMES[kind]} frame before HELLO (stream {stream_id})")
            if stream_id != 0:
                raise ProtocolError("HELLO on a stream other than 0")
            if length > MAX_HELLO:
                raise ProtocolError(f"HELLO of {length} bytes exceeds {MAX_HELLO}")
            return
        if kind == FrameKind.DATA:
            stream = self._streams.get(stream_id)
            if stream is not None and length - 1 > stream.recv_window:
                raise ProtocolError(
                    f"stream {stream_id}: peer sent {length - 1} bytes with only {stream.recv_window} granted"
                )
        elif kind in _SMALL_FRAMES and length > _SMALL_FRAME_LIMIT:
            raise ProtocolError(f"{KIND_NAMES[kind]} frame of {length} bytes is malformed")

    def receive_eof(self) -> None:
        try:
            self._decoder.close()
        except ProtocolError as exc:
            self._broken = str(exc)
            raise

    def _is_remote_id(self, stream_id: int) -> bool:
        remote_parity = 0 if self.role == Role.HOST else 1
        return stream_id % 2 == remote_parity

    def _on_frame(self, frame: Frame) -> Event | None:
        kind, stream_id, payload = frame.kind, frame.stream, frame.payload
        if kind == FrameKind.HELLO:
            if stream_id != 0:
                raise ProtocolError("HELLO on a stream other than 0")
            return self._on_hello(payload)
        if self.peer_info is None:
            raise ProtocolError(f"{KIND_NAMES[kind]} frame before HELLO")
        if kind == FrameKind.OPEN:
            return self._on_open(stream_id, payload)
        if stream_id == 0:
            if kind == FrameKind.MESSAGE:
                return MessageReceived(0, _decode_json(payload, "MESSAGE"))
            raise ProtocolError(f"{KIND_NAMES[kind]} frame on stream 0")
        stream = self._streams.get(stream_id)
        if stream is None:
            known = stream_id <= (self._highest_remote if self._is_remote_id(stream_id) else self._highest_local)
            if known:
                return None  # late frame for a stream that has already ended
            raise ProtocolError(f"{KIND_NAMES[kind]} frame for stream {stream_id}, which was never opened")
        if kind == FrameKind.RESET:
            del self._streams[stream_id]
            reason = _decode_json(payload, "RESET").get("reason", "")
            return StreamReset(stream_id, str(reason)[:4096])
        if kind == FrameKind.WINDOW:
            return self._on_window(stream_id, stream, payload)
        if stream.remote_closed:
            raise ProtocolError(f"{KIND_NAMES[kind]} frame on stream {stream_id} after the peer closed it")
        if kind == FrameKind.DATA:
            return self._on_stream_data(stream_id, stream, payload)
        if kind == FrameKind.EOF:
            channel = self._channel(payload)
            stream.ended_remote_channels.add(channel)
            return ChannelEnded(stream_id, channel)
        if kind == FrameKind.MESSAGE:
            return MessageReceived(stream_id, _decode_json(payload, "MESSAGE"))
        if kind == FrameKind.CLOSE:
            if payload:
                raise ProtocolError(f"CLOSE frame with a {len(payload)}-byte payload")
            stream.remote_closed = True
            self._maybe_forget(stream_id, stream)
            return StreamClosed(stream_id)
        raise ProtocolError(f"unexpected {KIND_NAMES[kind]} frame")  # pragma: no cover - enum is exhaustive

    def _on_open(self, stream_id: int, payload: bytes) -> StreamOpened:
        if stream_id == 0 or not self._is_remote_id(stream_id):
            raise ProtocolError(f"peer opened stream {stream_id}, which is not in its id space")
        if stream_id <= self._highest_remote:
            raise ProtocolError(f"peer reused stream id {stream_id}")
        self._highest_remote = stream_id
        request = _decode_json(payload, "OPEN")
        self._streams[stream_id] = _Stream(self._initial_window)
        return StreamOpened(stream_id, request)

    def _on_window(self, stream_id: int, stream: _Stream, payload: bytes) -> WindowOpened:
        if len(payload) != 4:
            raise ProtocolError(f"WINDOW frame with {len(payload)}-byte payload")
        (increment,) = _U32.unpack(payload)
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            raise ProtocolError(f"invalid WINDOW increment {increment} on stream {stream_id}")
        stream.send_window += increment
        return WindowOpened(stream_id)

    def _on_stream_data(self, stream_id: int, stream: _Stream, payload: bytes) -> DataReceived:
        channel = self._channel(payload[:1])
        if channel in stream.ended_remote_channels:
            raise ProtocolError(f"DATA on channel {channel} of stream {stream_id} after its EOF")
        data = payload[1:]
        if len(data) > stream.recv_window:
            raise ProtocolError(
                f"stream {stream_id}: peer sent {len(data)} bytes with only {stream.recv_window} granted"
            )
        stream.recv_window -= len(data)
        return DataReceived(stream_id, channel, data)

    @staticmethod
    def _channel(payload: bytes) -> int:
        if len(payload) != 1:
            raise ProtocolError("missing or malformed channel byte")
        channel = payload[0]
        if channel not in CHANNELS:
            raise ProtocolError(f"unknown channel {channel}")
        return channel
