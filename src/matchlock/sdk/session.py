"""The SDK's side of one `matchlock rpc` connection, without I/O (shared by `Client` and `AsyncClient`).

It wraps the jsonrpc core's `CallTracker` and `LineSplitter` and adds what the published SDK got wrong:
- a bad line never ends the reader: it is dropped, or fails the one call whose id it carries;
- output notifications that arrive after their call's response are still delivered (the call lingers
  for a while), instead of being silently lost.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..jsonrpc import (
    Broadcast,
    CallTracker,
    Failed,
    Invalid,
    JSONObject,
    LineSplitter,
    OverlongLine,
    Request,
    Resolved,
    Routed,
    parse_line,
)

T = TypeVar("T")

# Finished calls kept for late notifications. Output is only ever late by a few lines, so a short
# memory is enough, and it bounds what a misbehaving server can make us hold.
LINGER_CALLS = 64
# The server's answers carry read_file content (16 MiB of file is ~22 MiB of base64) in one line.
MAX_RESPONSE_LINE = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Malformed(Generic[T]):
    """A line for a pending call that is not a valid response: the call fails with `reason`."""

    id: int
    context: T
    reason: str


Event = Resolved[T] | Failed[T] | Routed[T] | Broadcast | Malformed[T]


class Session(Generic[T]):
    """Thread-safe where the tracker is; `feed` must be called from one reader at a time."""

    def __init__(self) -> None:
        self._tracker: CallTracker[T] = CallTracker()
        self._splitter = LineSplitter(MAX_RESPONSE_LINE)
        self._finished: OrderedDict[int, T] = OrderedDict()

    def start(self, method: str, params: JSONObject | None, context: T) -> tuple[int, bytes]:
        return self._tracker.start(method, params, context)

    def send(self, method: str, params: JSONObject | None = None) -> bytes:
        """A fire-and-forget line with a fresh id, as the published SDK sends them."""
        return self._tracker.send(method, params)

    def abandon(self, call_id: int) -> bytes:
        """Give up on a call (timeout); returns the `cancel` line to write."""
        return self._tracker.abandon(call_id)[1]

    def forget(self, call_id: int) -> None:
        self._tracker.forget(call_id)

    def feed(self, data: bytes) -> list[Event[T]]:
        events: list[Event[T]] = []
        for line in self._splitter.feed(data):
            event = self._classify(line)
            if event is not None:
                events.append(event)
        return events

    def eof(self) -> list[tuple[int, T]]:
        """The server's stdout ended: the calls still pending, which the caller fails."""
        for line in self._splitter.feed_eof():
            self._classify(line)
        self._finished.clear()
        return self._tracker.fail_all()

    def _classify(self, line: bytes | OverlongLine) -> Event[T] | None:
        if isinstance(line, OverlongLine):
            return self._malformed(line.id, f"response line longer than {line.limit} bytes")
        message = parse_line(line)
        if isinstance(message, Invalid):
            return self._malformed(message.id, message.message)
        outcome = self._tracker.receive(message)
        if isinstance(outcome, Resolved | Failed):
            self._linger(outcome.id, outcome.context)
            return outcome
        if isinstance(outcome, Routed | Broadcast):
            return outcome
        if isinstance(message, Request) and message.id is None:
            return self._late(message)
        return None

    def _malformed(self, call_id: Any, reason: str) -> Malformed[T] | None:
        if not isinstance(call_id, int):
            return None
        context = self._tracker.forget(call_id)
        if context is None:
            return None
        return Malformed(call_id, context, f"invalid response from matchlock rpc: {reason}")

    def _linger(self, call_id: int, context: T) -> None:
        self._finished[call_id] = context
        while len(self._finished) > LINGER_CALLS:
            self._finished.popitem(last=False)

    def _late(self, message: Request) -> Routed[T] | None:
        target = message.target_id
        if isinstance(target, int) and target in self._finished:
            return Routed(target, self._finished[target], message.method, message.params)
        return None
