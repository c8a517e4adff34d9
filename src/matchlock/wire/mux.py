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

Each stream is in one of the StreamState states, and every change of state
goes through STREAM_TRANSITIONS: sending, receiving, closing and resetting all
look up (state, action) there, and a pair that is missing is illegal. Errors
say whose fault they are: RemoteProtocolError for what the peer sent,
LocalProtocolError for calls this side should not have made.
"""

from __future__ import annotations

import struct

from . import jsonlite
from ._records import Record
from .frames import (
    KIND_NAMES,
    MAX_PAYLOAD,
    MAX_STREAM_ID,
    Frame,
    FrameDecoder,
    FrameKind,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    encode_frame,
)

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


class HandshakeError(RemoteProtocolError):
    """The peer speaks a different protocol or version."""


class StreamState:
    """Where a stream is in its life (plain ints: `enum` is too slow to import in the guest)."""

    OPEN = 0
    HALF_CLOSED_LOCAL = 1  # this side sent CLOSE; the peer may still send
    HALF_CLOSED_REMOTE = 2  # the peer sent CLOSE; this side may still send
    CLOSED = 3  # both sides sent CLOSE; the stream is forgotten
    RESET = 4  # either side sent RESET; the stream is forgotten


class StreamAction:
    SEND = 0  # DATA, EOF or MESSAGE from this side
    RECEIVE = 1  # DATA, EOF or MESSAGE from the peer
    CLOSE_LOCAL = 2
    CLOSE_REMOTE = 3
    RESET = 4  # by either side
    GRANT = 5  # this side sends WINDOW (only while the peer may still send)
    GRANTED = 6  # the peer sends WINDOW


STATE_NAMES = {value: name for name, value in vars(StreamState).items() if name.isupper()}
ACTION_NAMES = {value: name for name, value in vars(StreamAction).items() if name.isupper()}

_S, _A = StreamState, StreamAction
# The whole stream life cycle: (state, action) -> next state. Anything missing is illegal.
STREAM_TRANSITIONS = {
    (_S.OPEN, _A.SEND): _S.OPEN,
    (_S.OPEN, _A.RECEIVE): _S.OPEN,
    (_S.OPEN, _A.CLOSE_LOCAL): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _A.CLOSE_REMOTE): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _A.RESET): _S.RESET,
    (_S.OPEN, _A.GRANT): _S.OPEN,
    (_S.OPEN, _A.GRANTED): _S.OPEN,
    (_S.HALF_CLOSED_LOCAL, _A.RECEIVE): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _A.CLOSE_REMOTE): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _A.RESET): _S.RESET,
    (_S.HALF_CLOSED_LOCAL, _A.GRANT): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _A.GRANTED): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_REMOTE, _A.SEND): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _A.CLOSE_LOCAL): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _A.RESET): _S.RESET,
    (_S.HALF_CLOSED_REMOTE, _A.GRANTED): _S.HALF_CLOSED_REMOTE,
}
# States with no way out: the stream is dropped from the connection.
TERMINAL_STATES = frozenset(state for state in STATE_NAMES if not any(k[0] == state for k in STREAM_TRANSITIONS))


# --- events -----------------------------------------------------------------


class HelloReceived(Record):
    __slots__ = ("info",)
    info: dict


class StreamOpened(Record):
    __slots__ = ("stream", "request")
    stream: int
    request: dict


class DataReceived(Record):
    __slots__ = ("stream", "channel", "data")
    stream: int
    channel: int
    data: bytes


class ChannelEnded(Record):
    __slots__ = ("stream", "channel")
    stream: int
    channel: int


class MessageReceived(Record):
    __slots__ = ("stream", "message")
    stream: int
    message: dict


class StreamClosed(Record):
    """The peer will send nothing more on this stream."""

    __slots__ = ("stream",)
    stream: int


class StreamReset(Record):
    __slots__ = ("stream", "reason")
    stream: int
    reason: str


class WindowOpened(Record):
    """The peer granted more send credit on this stream."""

    __slots__ = ("stream",)
    stream: int


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
    __slots__ = ("send_window", "recv_window", "unacked", "state", "ended_remote_channels")

    def __init__(self, window: int) -> None:
        self.send_window = window
        self.recv_window = window
        self.unacked = 0
        self.state = StreamState.OPEN
        self.ended_remote_channels: set[int] = set()

    def allows(self, action: int) -> bool:
        return (self.state, action) in STREAM_TRANSITIONS


# What receiving each stream frame does to the stream's state.
_RECEIVED_ACTIONS = {
    FrameKind.DATA: StreamAction.RECEIVE,
    FrameKind.EOF: StreamAction.RECEIVE,
    FrameKind.MESSAGE: StreamAction.RECEIVE,
    FrameKind.CLOSE: StreamAction.CLOSE_REMOTE,
    FrameKind.RESET: StreamAction.RESET,
    FrameKind.WINDOW: StreamAction.GRANTED,
}


def _decode_json(payload: bytes, what: str) -> dict:
    try:
        value = jsonlite.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"malformed JSON in {what} frame: {exc}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} frame must carry a JSON object, got {type(value).__name__}")
    return value


def _encode_json(value: dict) -> bytes:
    return jsonlite.dumps(value)


class Connection:
    def __init__(
        self,
        role: str,
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
            raise LocalProtocolError("hello already sent")
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
            raise RemoteProtocolError("duplicate HELLO")
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
            raise RemoteProtocolError("HELLO features must be a list of strings")
        info = hello.get("info", {})
        if not isinstance(info, dict):
            raise RemoteProtocolError("HELLO info must be a JSON object")
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
            raise LocalProtocolError(f"connection is broken: {self._broken}")
        if not self.handshake_complete:
            raise LocalProtocolError("handshake not complete")

    def open_stream(self, request: dict) -> int:
        self._require_ready()
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted")
        self._next_id += 2
        self._highest_local = stream_id
        self._streams[stream_id] = _Stream(self._initial_window)
        self._emit(FrameKind.OPEN, stream_id, _encode_json(request))
        return stream_id

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None or not stream.allows(StreamAction.SEND):
            return 0
        return stream.send_window

    def send_data(self, stream_id: int, channel: int, data: bytes) -> None:
        stream = self._open_local(stream_id)
        if channel not in CHANNELS:
            raise LocalProtocolError(f"unknown channel {channel}")
        if len(data) > stream.send_window:
            raise LocalProtocolError(
                f"stream {stream_id}: {len(data)} bytes exceed the send window of {stream.send_window}"
            )
        stream.send_window -= len(data)
        prefix = bytes((channel,))
        for start in range(0, len(data), DATA_CHUNK):
            self._emit(FrameKind.DATA, stream_id, prefix + data[start : start + DATA_CHUNK])

    def end_channel(self, stream_id: int, channel: int) -> None:
        self._open_local(stream_id)
        if channel not in CHANNELS:
            raise LocalProtocolError(f"unknown channel {channel}")
        self._emit(FrameKind.EOF, stream_id, bytes((channel,)))

    def send_message(self, stream_id: int, message: dict) -> None:
        if stream_id != 0:
            self._open_local(stream_id)
        else:
            self._require_ready()
        payload = _encode_json(message)
        if len(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(f"message of {len(payload)} bytes is too large for one frame")
        self._emit(FrameKind.MESSAGE, stream_id, payload)

    def close_stream(self, stream_id: int) -> None:
        """Half-close: send nothing more on this stream. A no-op if already closed or gone."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.allows(StreamAction.CLOSE_LOCAL):
            return
        self._emit(FrameKind.CLOSE, stream_id)
        self._move(stream_id, stream, StreamAction.CLOSE_LOCAL)

    def reset_stream(self, stream_id: int, reason: str) -> None:
        """Abort the stream both ways. A no-op if the stream is already gone."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._emit(FrameKind.RESET, stream_id, _encode_json({"reason": reason[:4096]}))
        self._move(stream_id, stream, StreamAction.RESET)

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """Report that the application processed `nbytes` of received DATA.

        Credit goes back to the peer in batches, so a busy stream costs one
        WINDOW frame per quarter window rather than one per chunk.
        """
        stream = self._streams.get(stream_id)
        if stream is None or nbytes <= 0:
            return
        stream.unacked += nbytes
        if stream.unacked >= self._initial_window // 4 and stream.allows(StreamAction.GRANT):
            stream.recv_window += stream.unacked
            self._emit(FrameKind.WINDOW, stream_id, _U32.pack(stream.unacked))
            stream.unacked = 0

    def _open_local(self, stream_id: int) -> _Stream:
        """The stream, if this side may still send on it."""
        self._require_ready()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        if not stream.allows(StreamAction.SEND):
            raise LocalProtocolError(f"stream {stream_id} already closed by this side")
        return stream

    def _move(self, stream_id: int, stream: _Stream, action: int) -> None:
        """Apply a legal transition (the caller checked it) and drop the stream once it ends."""
        stream.state = STREAM_TRANSITIONS[stream.state, action]
        if stream.state in TERMINAL_STATES:
            self._streams.pop(stream_id, None)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def stream_state(self, stream_id: int) -> int | None:
        """The StreamState of a live stream; None once it has ended (or never existed)."""
        stream = self._streams.get(stream_id)
        return None if stream is None else stream.state

    @property
    def open_streams(self) -> list[int]:
        return list(self._streams)

    # --- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        if self._broken:
            raise RemoteProtocolError(f"connection is broken: {self._broken}")
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
                raise RemoteProtocolError(f"{KIND_NAMES[kind]} frame before HELLO (stream {stream_id})")
            if stream_id != 0:
                raise RemoteProtocolError("HELLO on a stream other than 0")
            if length > MAX_HELLO:
                raise RemoteProtocolError(f"HELLO of {length} bytes exceeds {MAX_HELLO}")
            return
        if kind == FrameKind.DATA:
            stream = self._streams.get(stream_id)
            if stream is not None and length - 1 > stream.recv_window:
                raise RemoteProtocolError(
                    f"stream {stream_id}: peer sent {length - 1} bytes with only {stream.recv_window} granted"
                )
        elif kind in _SMALL_FRAMES and length > _SMALL_FRAME_LIMIT:
            raise RemoteProtocolError(f"{KIND_NAMES[kind]} frame of {length} bytes is malformed")

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
                raise RemoteProtocolError("HELLO on a stream other than 0")
            return self._on_hello(payload)
        if self.peer_info is None:
            raise RemoteProtocolError(f"{KIND_NAMES[kind]} frame before HELLO")
        if kind == FrameKind.OPEN:
            return self._on_open(stream_id, payload)
        if stream_id == 0:
            if kind == FrameKind.MESSAGE:
                return MessageReceived(0, _decode_json(payload, "MESSAGE"))
            raise RemoteProtocolError(f"{KIND_NAMES[kind]} frame on stream 0")
        stream = self._streams.get(stream_id)
        if stream is None:
            known = stream_id <= (self._highest_remote if self._is_remote_id(stream_id) else self._highest_local)
            if known:
                return None  # late frame for a stream that has already ended
            raise RemoteProtocolError(f"{KIND_NAMES[kind]} frame for stream {stream_id}, which was never opened")
        action = _RECEIVED_ACTIONS[kind]
        if not stream.allows(action):
            raise RemoteProtocolError(f"{KIND_NAMES[kind]} frame on stream {stream_id} after the peer closed it")
        if kind == FrameKind.RESET:
            reason = _decode_json(payload, "RESET").get("reason", "")
            self._move(stream_id, stream, action)
            return StreamReset(stream_id, str(reason)[:4096])
        if kind == FrameKind.WINDOW:
            return self._on_window(stream_id, stream, payload)
        if kind == FrameKind.DATA:
            return self._on_stream_data(stream_id, stream, payload)
        if kind == FrameKind.EOF:
            channel = self._channel(payload)
            stream.ended_remote_channels.add(channel)
            return ChannelEnded(stream_id, channel)
        if kind == FrameKind.MESSAGE:
            return MessageReceived(stream_id, _decode_json(payload, "MESSAGE"))
        # CLOSE: the only kind left once _RECEIVED_ACTIONS has accepted it
        if payload:
            raise RemoteProtocolError(f"CLOSE frame with a {len(payload)}-byte payload")
        self._move(stream_id, stream, action)
        return StreamClosed(stream_id)

    def _on_open(self, stream_id: int, payload: bytes) -> StreamOpened:
        if stream_id == 0 or not self._is_remote_id(stream_id):
            raise RemoteProtocolError(f"peer opened stream {stream_id}, which is not in its id space")
        if stream_id <= self._highest_remote:
            raise RemoteProtocolError(f"peer reused stream id {stream_id}")
        self._highest_remote = stream_id
        request = _decode_json(payload, "OPEN")
        self._streams[stream_id] = _Stream(self._initial_window)
        return StreamOpened(stream_id, request)

    def _on_window(self, stream_id: int, stream: _Stream, payload: bytes) -> WindowOpened:
        if len(payload) != 4:
            raise RemoteProtocolError(f"WINDOW frame with {len(payload)}-byte payload")
        (increment,) = _U32.unpack(payload)
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            raise RemoteProtocolError(f"invalid WINDOW increment {increment} on stream {stream_id}")
        stream.send_window += increment
        return WindowOpened(stream_id)

    def _on_stream_data(self, stream_id: int, stream: _Stream, payload: bytes) -> DataReceived:
        channel = self._channel(payload[:1])
        if channel in stream.ended_remote_channels:
            raise RemoteProtocolError(f"DATA on channel {channel} of stream {stream_id} after its EOF")
        data = payload[1:]
        if len(data) > stream.recv_window:
            raise RemoteProtocolError(
                f"stream {stream_id}: peer sent {len(data)} bytes with only {stream.recv_window} granted"
            )
        stream.recv_window -= len(data)
        return DataReceived(stream_id, channel, data)

    @staticmethod
    def _channel(payload: bytes) -> int:
        if len(payload) != 1:
            raise RemoteProtocolError("missing or malformed channel byte")
        channel = payload[0]
        if channel not in CHANNELS:
            raise RemoteProtocolError(f"unknown channel {channel}")
        return channel
