"""Bounded newline framing: bytes in, complete lines out (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from .codec import sniff_id
from .messages import INVALID_REQUEST, ErrorResponse

# 32 MiB per line: the Python SDK sends write_file as one line of base64 (4/3 of the file), so this carries
# files up to 24 MiB (more than the 16 MiB the project promises) while one reader holds at most 32 MiB.
MAX_LINE_BYTES = 32 * 1024 * 1024
# How much of an over-long line is kept to find its id.
HEAD_BYTES = 4096


@dataclass(frozen=True, slots=True)
class OverlongLine:
    """Marker for a line longer than the limit. Its bytes were dropped; ``head`` is its first bytes."""

    limit: int
    head: bytes

    @property
    def id(self) -> int | None:
        return sniff_id(self.head)

    def to_error(self) -> ErrorResponse:
        return ErrorResponse(
            self.id,
            INVALID_REQUEST,
            f"request line is longer than the {self.limit}-byte limit and was dropped; "
            "send less data per request (write_file carries at most 3/4 of the limit)",
        )


class LineSplitter:
    """Splits a byte stream on ``\\n``. Lines never hold the newline.

    A line longer than ``max_line`` (newline excluded) is not buffered: one :class:`OverlongLine` is
    emitted as soon as the limit is crossed and the rest of that line is discarded up to its newline.
    Memory held is at most ``max_line`` bytes.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be positive, got {max_line}")
        self._max = max_line
        self._buf = bytearray()
        self._draining = False

    @property
    def max_line(self) -> int:
        return self._max

    def feed(self, data: bytes) -> list[bytes | OverlongLine]:
        out: list[bytes | OverlongLine] = []
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            piece = data[start:newline]
            start = newline + 1
            if self._draining:
                self._draining = False
            elif len(self._buf) + len(piece) > self._max:
                out.append(OverlongLine(self._max, self._head(piece)))
            elif self._buf:
                self._buf += piece
                out.append(bytes(self._buf))
            else:
                out.append(piece)
            self._buf.clear()
        rest = data[start:]
        if rest and not self._draining:
            if len(self._buf) + len(rest) > self._max:
                out.append(OverlongLine(self._max, self._head(rest)))
                self._buf.clear()
                self._draining = True
            else:
                self._buf += rest
        return out

    def feed_eof(self) -> list[bytes | OverlongLine]:
        """End of stream: a final line without a newline is still a line."""
        out: list[bytes | OverlongLine] = []
        if self._buf and not self._draining:
            out.append(bytes(self._buf))
        self._buf.clear()
        self._draining = False
        return out

    def _head(self, tail: bytes) -> bytes:
        head = bytes(self._buf[:HEAD_BYTES])
        return head + tail[: HEAD_BYTES - len(head)]
