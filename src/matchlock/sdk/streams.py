"""A call's notifications, without I/O (shared by `Client` and `AsyncClient`): output chunks to the user's
writers, and the routing of exec_pipe / exec_tty input (sdk-wire.md §3)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import IO, Any

# A handler for the notifications of one call: (method, params).
Notify = Callable[[str, dict[str, Any]], None]
# A notification to send: (method, params).
Message = tuple[str, dict[str, Any]]


def decode_chunk(params: dict[str, Any]) -> bytes | None:
    """The `data` of an output notification, or None when it is not valid base64."""
    data = params.get("data", "")
    if not isinstance(data, str):
        return None
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        return None


def write_text(writer: IO[str] | None, data: bytes | None) -> None:
    """Output chunks go to text writers decoded as UTF-8 (a split character becomes U+FFFD)."""
    if writer is None or data is None:
        return
    writer.write(data.decode("utf-8", errors="replace"))
    flush = getattr(writer, "flush", None)
    if callable(flush):
        flush()


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def as_bytes(chunk: Any) -> bytes:
    return chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)


def output_writer(writers: Mapping[str, IO[str] | None]) -> Notify:
    """A notification handler that writes each output chunk to the writer named by its method."""

    def on_output(method: str, params: dict[str, Any]) -> None:
        if method in writers:
            write_text(writers[method], decode_chunk(params))

    return on_output


def deliver(handler: Notify | None, method: str, params: dict[str, Any]) -> Exception | None:
    """Run a call's notification handler; what a failing user writer raised is returned, to fail its call."""
    if handler is None:
        return None
    try:
        handler(method, params)
    except Exception as exc:  # noqa: BLE001 - a user writer failed: report it from its call
        return exc
    return None


class InputRoute:
    """exec_pipe / exec_tty: `<method>.ready` names the process input goes to (the first id wins) and calls
    `ready`, which releases the client's input pumps; output chunks go to `writers`.

    `target` is set before `ready` runs, so a pump that waited for it reads it safely from another thread.
    """

    def __init__(self, method: str, writers: Mapping[str, IO[str] | None], ready: Callable[[], object]) -> None:
        self._method = method
        self._write = output_writer(writers)
        self._ready = ready
        self.target: int | None = None

    def on_notification(self, name: str, params: dict[str, Any]) -> None:
        if name == f"{self._method}.ready":
            call_id = params.get("id")
            if isinstance(call_id, int) and self.target is None:
                self.target = call_id
            self._ready()
        else:
            self._write(name, params)

    def stdin(self, target: int, data: bytes) -> Message:
        return f"{self._method}.stdin", {"id": target, "data": encode(data)}

    def stdin_eof(self, target: int) -> Message:
        return f"{self._method}.stdin_eof", {"id": target}

    @staticmethod
    def resize(target: int, size: Any) -> Message | None:
        """The `exec_tty.resize` for one (rows, cols) the user's iterable gave; None for anything else."""
        if isinstance(size, tuple | list) and len(size) >= 2:
            return "exec_tty.resize", {"id": target, "rows": int(size[0]), "cols": int(size[1])}
        return None
