"""Read the server name and ALPN offer from a TLS ClientHello (sans-IO).

The proxy needs both before it answers the guest's handshake: the name
decides policy and the certificate to mint, and the ALPN offer is passed
upstream so the guest speaks whatever (HTTP/2 or HTTP/1.1) the real server
chose. Input comes from the guest, so every length is bounds-checked and a
hello larger than MAX_HELLO is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_HELLO = 64 * 1024
HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0
EXT_ALPN = 16


class NotTLS(ValueError):
    pass


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None
    alpn: tuple[str, ...]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise NotTLS("truncated ClientHello")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def vector(self, length_bytes: int) -> bytes:
        length = self.u8() if length_bytes == 1 else self.u16()
        return self.take(length)

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


def parse(data: bytes) -> ClientHello | None:
    """The hello from the first bytes of a connection; None while more bytes are needed."""
    handshake = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return None
        content_type, _version, length = struct.unpack_from(">BHH", data, pos)
        if content_type != HANDSHAKE:
            raise NotTLS("the connection does not start with a TLS handshake")
        if length == 0 or length > 1 << 14:
            raise NotTLS(f"invalid TLS record length {length}")
        if len(data) - pos - 5 < length:
            return None
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != CLIENT_HELLO:
                raise NotTLS("the first handshake message is not a ClientHello")
            total = int.from_bytes(handshake[1:4], "big")
            if total > MAX_HELLO:
                raise NotTLS(f"ClientHello of {total} bytes is too large")
            if len(handshake) >= 4 + total:
                return _parse_body(bytes(handshake[4 : 4 + total]))
        if pos > MAX_HELLO:
            raise NotTLS("ClientHello too large")


def _parse_body(body: bytes) -> ClientHello:
    reader = _Reader(body)
    reader.take(2 + 32)  # legacy version, random
    reader.vector(1)  # session id
    reader.vector(2)  # cipher suites
    reader.vector(1)  # compression methods
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if reader.remaining == 0:
        return ClientHello(None, ())
    extensions = _Reader(reader.vector(2))
    while extensions.remaining:
        kind, payload = extensions.u16(), _Reader(extensions.vector(2))
        if kind == EXT_SERVER_NAME:
            names = _Reader(payload.vector(2))
            while names.remaining:
                name_type, name = names.u8(), names.vector(2)
                if name_type == 0:
                    server_name = _valid_name(name)
        elif kind == EXT_ALPN:
            protocols = _Reader(payload.vector(2))
            offered = []
            while protocols.remaining:
                offered.append(protocols.vector(1).decode("ascii", "replace"))
            alpn = tuple(offered)
    return ClientHello(server_name, alpn)


def _valid_name(raw: bytes) -> str:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise NotTLS("server name is not ASCII") from None
    if not name or len(name) > 253 or any(c.isspace() or c in "/\\@" or ord(c) < 33 for c in name):
        raise NotTLS(f"invalid server name {name[:64]!r}")
    return name.rstrip(".").lower()
