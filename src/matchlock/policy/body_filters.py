"""Response body rewriting for after-rules.

A filter gets the body as it arrives (`feed(chunk) -> bytes to send now`)
and flushes what it still holds at the end (`finish() -> bytes`). The
transport removes Content-Length and re-frames the body when it uses one.
Replacements are literal and applied in order.
"""

from __future__ import annotations

from typing import Protocol

from ..api.network import BodyReplacement

DATA_PREFIX = b"data:"


class BodyFilter(Protocol):
    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


def replace_all(data: bytes, replacements) -> bytes:
    for item in replacements:
        if item.find:
            data = data.replace(item.find.encode(), item.replace.encode())
    return data


class BufferedReplace:
    """Whole-body find/replace: a match may span any two chunks, so nothing leaves before the end."""

    def __init__(self, replacements: list[BodyReplacement]) -> None:
        self.replacements = replacements
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self._chunks.append(data)
        return b""

    def finish(self) -> bytes:
        body, self._chunks = b"".join(self._chunks), []
        return replace_all(body, self.replacements)


class SetBody:
    """The body a callback chose (with the collected replacements applied); upstream's is dropped."""

    def __init__(self, body: bytes, replacements: list[BodyReplacement]) -> None:
        self._body = replace_all(body, replacements)

    def feed(self, data: bytes) -> bytes:
        return b""

    def finish(self) -> bytes:
        body, self._body = self._body, b""
        return body


class SSEDataReplace:
    """Server-sent events: rewrite only the payload of `data:` lines, each line as soon as it is complete.

    Events must keep flowing as they happen, so the filter holds back at
    most one incomplete line. Line endings (LF or CRLF) are kept as sent.
    """

    def __init__(self, replacements: list[BodyReplacement]) -> None:
        self.replacements = replacements
        self._partial = b""

    def _line(self, line: bytes) -> bytes:
        if not line.startswith(DATA_PREFIX):
            return line
        body, ending = line[len(DATA_PREFIX) :], b""
        if body.endswith(b"\r\n"):
            body, ending = body[:-2], b"\r\n"
        elif body.endswith(b"\n"):
            body, ending = body[:-1], b"\n"
        return DATA_PREFIX + replace_all(body, self.replacements) + ending

    def feed(self, data: bytes) -> bytes:
        data = self._partial + data
        complete = data.rfind(b"\n") + 1
        self._partial = data[complete:]
        lines = data[:complete].split(b"\n")[:-1]  # only LF ends a line; a lone CR stays in the payload
        return b"".join(self._line(line + b"\n") for line in lines)

    def finish(self) -> bytes:
        tail, self._partial = self._partial, b""
        return self._line(tail) if tail else b""
