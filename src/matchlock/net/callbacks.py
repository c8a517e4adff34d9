"""The SDK's network hooks over its Unix socket (sdk-wire 5.1): the transport of `policy.rules`.

One connection per call: one request line out, one reply line back, then
the connection is closed. The deadline and the reading of the reply belong
to the rules engine; this only moves the bytes, and bounds the reply.
"""

from __future__ import annotations

import asyncio

MAX_REPLY = 32 * 1024 * 1024  # a set_body_base64 may carry a whole response body


class UnixCallbackClient:
    def __init__(self, path: str) -> None:
        self.path = path

    async def round_trip(self, line: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_REPLY)
        try:
            writer.write(line)
            await writer.drain()
            try:
                return await reader.readline()
            except (ValueError, asyncio.LimitOverrunError) as exc:  # a reply line over MAX_REPLY
                raise OSError(f"network hook reply from {self.path} exceeds {MAX_REPLY} bytes") from exc
        finally:
            writer.close()
