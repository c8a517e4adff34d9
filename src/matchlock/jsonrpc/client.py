"""Client-side call tracking: ids, pending calls and notification routing (no I/O)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .codec import encode, parse_line
from .messages import ErrorResponse, Invalid, JSONObject, Message, Request, Response

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Resolved(Generic[T]):
    """The pending call ``id`` got a result. The call is no longer pending."""

    id: int
    context: T
    result: Any


@dataclass(frozen=True, slots=True)
class Failed(Generic[T]):
    """The pending call ``id`` got an error response. The call is no longer pending."""

    id: int
    context: T
    code: int
    message: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class Routed(Generic[T]):
    """A notification whose ``params.id`` names a pending call (``exec_stream.stdout``, ``exec_pipe.ready``...)."""

    id: int
    context: T
    method: str
    params: JSONObject


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A notification not scoped to a call (no ``params.id``), e.g. ``event``."""

    method: str
    params: JSONObject


@dataclass(frozen=True, slots=True)
class Dropped:
    """Nothing to deliver: blank or invalid line, unknown response id, or a notification for a finished call."""

    reason: str


Outcome = Resolved[T] | Failed[T] | Routed[T] | Broadcast | Dropped


class CallTracker(Generic[T]):
    """Allocates request ids and matches incoming lines to pending calls. Thread-safe.

    ``context`` is any caller value (a Future, a queue, callbacks) handed back in outcomes.
    """

    def __init__(self, first_id: int = 1) -> None:
        self._lock = threading.Lock()
        self._next_id = first_id
        self._pending: dict[int, T] = {}

    def _allocate(self) -> int:
        call_id = self._next_id
        self._next_id += 1
        return call_id

    def start(self, method: str, params: JSONObject | None, context: T) -> tuple[int, bytes]:
        """Register a call; returns its id and the line to write. Empty params are omitted from the line."""
        with self._lock:
            call_id = self._allocate()
            line = encode(Request(method, params or {}, call_id))
            self._pending[call_id] = context
        return call_id, line

    def send(self, method: str, params: JSONObject | None = None, *, with_id: bool = True) -> bytes:
        """A fire-and-forget line (stdin data, EOF, resize). Like the Python SDK it takes a fresh id that is
        never awaited; ``with_id=False`` writes a true notification as the Go SDK does. The server accepts both."""
        with self._lock:
            call_id = self._allocate() if with_id else None
        return encode(Request(method, params or {}, call_id))

    def abandon(self, call_id: int) -> tuple[T | None, bytes]:
        """Give up on a call (timeout): forget it and return its context plus the ``cancel`` line to write."""
        context = self.forget(call_id)
        return context, self.send("cancel", {"id": call_id})

    def forget(self, call_id: int) -> T | None:
        """Stop tracking a call; later lines for it are dropped."""
        with self._lock:
            return self._pending.pop(call_id, None)

    def fail_all(self) -> list[tuple[int, T]]:
        """Transport closed: remove and return every pending call so the caller can fail them."""
        with self._lock:
            calls = list(self._pending.items())
            self._pending.clear()
        return calls

    def pending(self) -> list[int]:
        with self._lock:
            return list(self._pending)

    def receive_line(self, line: bytes | str) -> Outcome[T]:
        """Parse and classify one line read from the server."""
        return self.receive(parse_line(line))

    def receive(self, message: Message | Invalid | None) -> Outcome[T]:
        if message is None:
            return Dropped("blank line")
        if isinstance(message, Invalid):
            return Dropped(f"invalid line: {message.message}")
        if isinstance(message, Request):
            return self._route(message)
        if not isinstance(message.id, int):
            return Dropped(f"response for unknown id {message.id!r}")
        with self._lock:
            if message.id not in self._pending:
                return Dropped(f"response for unknown id {message.id}")
            context = self._pending.pop(message.id)
        if isinstance(message, ErrorResponse):
            return Failed(message.id, context, message.code, message.message, message.data)
        assert isinstance(message, Response)
        return Resolved(message.id, context, message.result)

    def _route(self, request: Request) -> Outcome[T]:
        if request.id is not None:
            # Servers never send us requests; a top-level id would be mistaken for a response.
            return Dropped(f"unexpected request {request.method!r} with id {request.id!r}")
        if "id" not in request.params:
            return Broadcast(request.method, request.params)
        target = request.target_id
        with self._lock:
            if isinstance(target, int) and target in self._pending:
                return Routed(target, self._pending[target], request.method, request.params)
        return Dropped(f"{request.method} for a call that is not pending: {request.params.get('id')!r}")
