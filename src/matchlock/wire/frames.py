"""Frame codec for the host-guest channel (sans-IO, stdlib only).

Every frame is a 9-byte header followed by a payload:

    length: u32 BE   payload length in bytes (not counting the header)
    kind:   u8       one of FrameKind
    stream: u32 BE   stream id; 0 is the connection itself

The decoder never trusts the peer: an unknown kind or a length above
MAX_PAYLOAD raises RemoteProtocolError at once, before any payload is buffered, so
a hostile guest cannot make the host allocate or wait for an absurd frame.

Errors come in two kinds under one base: RemoteProtocolError (the peer broke
the protocol; only receiving can raise it) and LocalProtocolError (this side
tried something the protocol forbids, which is a bug in the caller).
"""

from __future__ import annotations

import struct

from ._records import Record

HEADER = struct.Struct(">IBI")
HEADER_SIZE = HEADER.size
# Control messages (JSON) and data chunks both fit comfortably; anything
# larger is a protocol violation, not a big message.
MAX_PAYLOAD = 1 << 20
MAX_STREAM_ID = (1 << 32) - 1


class ProtocolError(Exception):
    """Base of the wire errors; raise RemoteProtocolError or LocalProtocolError instead."""

    def __init__(self, *args: object) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise RemoteProtocolError or LocalProtocolError, not ProtocolError")
        super().__init__(*args)


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol forbids (a bug in the caller)."""


class FrameKind:
    """Frame kinds (plain ints: `enum` is too slow to import in the guest)."""

    HELLO = 1  # stream 0: JSON handshake
    OPEN = 2  # JSON request that opens a stream
    DATA = 3  # channel byte + bytes; counted against the flow-control window
    EOF = 4  # channel byte: no more DATA on that channel
    MESSAGE = 5  # JSON control message on an open stream
    WINDOW = 6  # u32: grant that many more DATA bytes to the peer
    CLOSE = 7  # sender will send nothing more on this stream
    RESET = 8  # JSON {"reason": str}: abort the stream in both directions


KIND_NAMES = {value: name for name, value in vars(FrameKind).items() if name.isupper()}


class Frame(Record):
    __slots__ = ("kind", "stream", "payload")
    kind: int
    stream: int
    payload: bytes
    _defaults = {"payload": b""}


def encode_frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    if kind not in KIND_NAMES:
        raise LocalProtocolError(f"unknown frame kind {kind}")
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= stream <= MAX_STREAM_ID:
        raise LocalProtocolError(f"stream id {stream} out of range")
    return HEADER.pack(len(payload), kind, stream) + payload


class FrameDecoder:
    """Turns a byte stream into frames; keeps at most one partial frame."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes and return every frame now complete."""
        self.push(data)
        frames = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def push(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self, check_header=None) -> Frame | None:
        """The next complete frame, or None until more bytes arrive.

        `check_header(kind, stream, length)` runs as soon as a header is
        buffered, before its payload arrives, so a peer cannot make us wait
        for (or buffer) a payload that would be rejected anyway.
        """
        buf = self._buffer
        if len(buf) < HEADER_SIZE:
            return None
        length, kind, stream = HEADER.unpack_from(buf, 0)
        if kind not in KIND_NAMES:
            raise RemoteProtocolError(f"unknown frame kind {kind}")
        if length > self._max_payload:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the {self._max_payload}-byte limit")
        if check_header is not None:
            check_header(kind, stream, length)
        end = HEADER_SIZE + length
        if len(buf) < end:
            return None
        frame = Frame(kind, stream, bytes(buf[HEADER_SIZE:end]))
        del buf[:end]
        return frame

    def close(self) -> None:
        """Call at end of input; a partial frame left over is a protocol error."""
        if self._buffer:
            raise RemoteProtocolError(f"connection closed in the middle of a frame ({len(self._buffer)} bytes pending)")
