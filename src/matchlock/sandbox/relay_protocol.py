"""The exec relay's framing (sans-IO): `[type u8][length u32 BE][payload]`.

Other processes (`matchlock exec`, `allow-list`, `port-forward`) reach a
sandbox through a Unix socket served by the process that owns it. One
operation per connection; the first frame chooses it. The message types
and payloads are those of the published matchlock relay (JSON payloads,
byte fields base64), so the same clients work. A request that breaks the
protocol gets an `EXEC_RESULT` frame carrying `error` and the connection is
closed; the sandbox is not affected.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 1 << 20

EXEC = 1
EXEC_RESULT = 2
EXEC_INTERACTIVE = 3
STDOUT = 4
STDERR = 5
STDIN = 6
EXIT = 7
EXEC_PIPE = 8
PORT_FORWARD = 9
ALLOW_LIST_ADD = 10
ALLOW_LIST_DELETE = 11
ALLOW_LIST_RESULT = 12
RESIZE = 13

REQUEST_TYPES = frozenset({EXEC, EXEC_INTERACTIVE, EXEC_PIPE, PORT_FORWARD, ALLOW_LIST_ADD, ALLOW_LIST_DELETE})
CLIENT_STREAM_TYPES = frozenset({STDIN, RESIZE})
SERVER_TYPES = frozenset({EXEC_RESULT, STDOUT, STDERR, EXIT, ALLOW_LIST_RESULT})


class RelayProtocolError(Exception):
    pass


def encode(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"relay payload of {len(payload)} bytes is too large")
    return HEADER.pack(kind, len(payload)) + payload


class Decoder:
    """Incremental decoder; `allowed` is the set of frame types the peer may send."""

    def __init__(self, allowed: frozenset[int]) -> None:
        self._buffer = bytearray()
        self._allowed = allowed

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            if kind not in self._allowed:
                raise RelayProtocolError(f"unexpected relay frame type {kind}")
            if length > MAX_PAYLOAD:
                raise RelayProtocolError(f"relay frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((kind, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


def pack_resize(rows: int, cols: int) -> bytes:
    return struct.pack(">HH", rows, cols)


def unpack_resize(payload: bytes) -> tuple[int, int]:
    if len(payload) != 4:
        raise RelayProtocolError(f"resize frame must carry 4 bytes, not {len(payload)}")
    rows, cols = struct.unpack(">HH", payload)
    if not rows or not cols:
        raise RelayProtocolError(f"invalid terminal size {rows}x{cols}")
    return rows, cols


def pack_exit(code: int) -> bytes:
    return struct.pack(">I", code & 0xFFFFFFFF)


def unpack_exit(payload: bytes) -> int:
    if len(payload) != 4:
        raise RelayProtocolError(f"exit frame must carry 4 bytes, not {len(payload)}")
    return struct.unpack(">I", payload)[0]
