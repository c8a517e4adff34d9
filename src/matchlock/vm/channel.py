"""Host end of the agent channel: drives the sans-IO multiplexer with asyncio.

Everything the guest sends is untrusted. A frame that breaks the protocol or
more data than was granted marks the channel broken: every waiting operation
fails at once with GuestProtocolError naming the violation, so a hostile or
crashed guest can never hang the host. A reply out of its stream's grammar
(`wire.replies`) fails that one operation the same way.

This module is the one place where wire errors become api errors
(`_WireErrors`): RemoteProtocolError is the guest's fault (GuestProtocolError),
LocalProtocolError is a bug on this side (VMError).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

from ..api.errors import GuestProtocolError, VMError
from ..util import trace
from ..wire import agent as msgs
from ..wire.boot import DEBUG_TIMING_FLAG
from ..wire.frames import LocalProtocolError, RemoteProtocolError
from ..wire.mux import (
    Connection,
    DataReceived,
    HelloReceived,
    MessageReceived,
    Role,
    StreamClosed,
    StreamOpened,
    StreamReset,
    WindowOpened,
)
from ..wire.replies import ConnectionReplies, Exited, Ready, Replies

T = TypeVar("T")

READ_SIZE = 256 * 1024
# DATA is bounded by the flow-control window; control frames are not, so a
# guest that floods a stream nobody is reading breaks the protocol here
# instead of growing host memory.
MAX_QUEUED_EVENTS = 64
MAX_QUEUED_MESSAGES = 8  # a well-behaved guest sends two or three per stream


class ChannelClosed(VMError):
    pass


class _WireErrors:
    """`with channel.wire_errors:` turns wire errors into api errors, once, here."""

    def __init__(self, channel: GuestChannel) -> None:
        self.channel = channel

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        if isinstance(exc, RemoteProtocolError):
            raise guest_protocol_error(exc) from None
        if isinstance(exc, LocalProtocolError):
            # Sending on a channel the guest already broke: that is the error to report.
            self.channel.raise_if_broken()
            raise VMError(
                f"matchlock misused the agent channel: {exc} (a bug in matchlock; please report it)"
            ) from None


def guest_protocol_error(exc: RemoteProtocolError) -> GuestProtocolError:
    return GuestProtocolError(f"guest broke the wire protocol: {exc}")


class _Broken(Exception):
    """Raised inside `unless_broken` when the channel fails; never escapes it."""


class GuestStream:
    """One operation on the channel; consume its events with `next_event()`."""

    def __init__(self, channel: GuestChannel, stream_id: int) -> None:
        self.channel = channel
        self.id = stream_id
        self._events: deque = deque()
        self._arrived = asyncio.Event()
        self._window = asyncio.Event()
        self._failed = asyncio.Event()
        self._failure: BaseException | None = None
        self.closed_by_guest = False

    def _push(self, event) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(event, DataReceived) and isinstance(last, DataReceived) and last.channel == event.channel:
            # Coalesce: queued output costs one entry per run of a channel.
            self._events[-1] = DataReceived(event.stream, event.channel, last.data + event.data)
        elif len(self._events) >= MAX_QUEUED_EVENTS or (
            isinstance(event, MessageReceived)
            and sum(isinstance(e, MessageReceived) for e in self._events) >= MAX_QUEUED_MESSAGES
        ):
            raise RemoteProtocolError(f"the guest flooded stream {self.id} with {len(self._events)} unread frames")
        else:
            self._events.append(event)
        self._arrived.set()

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._arrived.set()
        self._window.set()
        self._failed.set()

    async def unless_broken(self, awaitable: Awaitable[T]) -> T:
        """Await a consumer's callback, but stop waiting (cancel it) as soon as the channel breaks.

        A consumer that is blocked (a paused terminal, a stalled RPC client)
        must not hide a guest that broke the protocol.
        """

        async def watch() -> None:
            await self._failed.wait()
            raise _Broken

        try:
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(watch())
                try:
                    return await awaitable
                finally:
                    watcher.cancel()
        except BaseExceptionGroup as group_error:
            # One exception at most: the callback's own, or the watcher's.
            error = group_error.exceptions[0]
            if isinstance(error, _Broken):
                assert self._failure is not None
                raise self._failure from None
            raise error from None

    async def next_event(self):
        """The next DataReceived/ChannelEnded/MessageReceived/StreamClosed/StreamReset."""
        while not self._events:
            if self._failure is not None:
                raise self._failure  # every later call fails the same way
            self._arrived.clear()
            await self._arrived.wait()
        return self._events.popleft()

    async def next_reply(self, replies: Replies):
        """The next event checked against the stream's grammar: what `replies.feed` makes of it."""
        event = await self.next_event()
        with self.channel.wire_errors:
            reply = replies.feed(event)
        if trace.ENABLED and isinstance(reply, Exited) and reply.stamps and self.channel.exit_stamps_due:
            # The guest's first exit status carries them; any later ones are not printed, so a guest that
            # sends stamps with every exit status cannot flood stderr.
            self.channel.exit_stamps_due = False
            trace.guest_stamps(reply.stamps)
        return reply

    async def send(self, channel: int, data: bytes) -> None:
        """Send stdin/file bytes, waiting for window as the guest consumes."""
        view = memoryview(data)
        while view:
            self.channel.raise_if_broken()
            if self._failure is not None:
                raise self._failure
            if self.closed_by_guest or not self.channel.conn.is_open(self.id):
                raise ChannelClosed("the guest ended this operation before taking all its input")
            window = self.channel.conn.send_window(self.id)
            if window == 0:
                self._window.clear()
                await self._window.wait()
                continue
            chunk, view = view[:window], view[window:]
            with self.channel.wire_errors:
                self.channel.conn.send_data(self.id, channel, bytes(chunk))
            self.channel.flush_now()
            await self.channel.drain()

    def end(self, channel: int) -> None:
        if self.channel.conn.is_open(self.id):
            with self.channel.wire_errors:
                self.channel.conn.end_channel(self.id, channel)
            self.channel.flush()

    def message(self, message: dict) -> None:
        if self.channel.conn.is_open(self.id):
            with self.channel.wire_errors:
                self.channel.conn.send_message(self.id, message)
            self.channel.flush()

    def consumed(self, nbytes: int) -> None:
        with self.channel.wire_errors:
            self.channel.conn.consumed(self.id, nbytes)
        self.channel.flush()

    def finish_sending(self) -> None:
        """Half-close: the host sends nothing more, but still reads the replies.

        Request-only operations half-close with their request, so the guest
        sees OPEN and CLOSE in one wake-up and the stream ends with its reply.
        """
        if self.channel.conn.is_open(self.id):
            with self.channel.wire_errors:
                self.channel.conn.close_stream(self.id)
            self.channel.flush()

    def close(self) -> None:
        self.finish_sending()
        self.channel.forget(self.id)

    def reset(self, reason: str) -> None:
        with self.channel.wire_errors:
            self.channel.conn.reset_stream(self.id, reason)
        self.channel.flush()
        self.channel.forget(self.id)


class GuestChannel:
    """The agent channel over one socket. `start()` (or `async with`) begins reading; `aclose()` ends it.

    The reader task belongs to a TaskGroup the channel owns: `aclose()`
    cancels it and waits for it, so it never outlives the channel. It never
    raises either: whatever goes wrong becomes `broken`, which every waiting
    operation then raises.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.conn = Connection(Role.HOST)
        self.wire_errors = _WireErrors(self)
        self._sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._streams: dict[int, GuestStream] = {}
        self._connection_replies = ConnectionReplies()
        self._hello: asyncio.Future | None = None
        self._ready: asyncio.Future | None = None
        self._tasks = contextlib.AsyncExitStack()
        self._read_task: asyncio.Task | None = None
        self._closed = False
        self.broken: BaseException | None = None
        self.guest_info: dict = {}
        self.ready_info: dict = {}
        self.boot_ms: int | None = None
        self._flush_scheduled = False
        self.held = False  # set while the guest is parked (sandbox/snapshots.py)
        self.exit_stamps_due = True  # under MATCHLOCK_DEBUG_TIMING: until an exit status's stamps are printed

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=READ_SIZE)
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._ready = loop.create_future()
        group = await self._tasks.enter_async_context(asyncio.TaskGroup())
        self._read_task = group.create_task(self._read_loop())

    async def __aenter__(self) -> GuestChannel:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def handshake(self, config: msgs.GuestConfig) -> None:
        """Wait for the guest's HELLO, send the sandbox settings, wait for `ready`."""
        assert self._hello is not None and self._ready is not None
        self.guest_info = await self._hello
        hello = config.to_wire()
        if trace.ENABLED:
            hello[DEBUG_TIMING_FLAG] = True
        with self.wire_errors:
            self.conn.send_hello(hello)
        self.flush()
        self.boot_ms = await self._ready

    def raise_if_broken(self) -> None:
        if self.broken is not None:
            raise self.broken

    def flush(self) -> None:
        """Write queued frames at the end of this event-loop turn.

        Frames produced in one turn (a CLOSE and the next request, say) reach
        the guest in one write, so its agent wakes up once instead of twice:
        under emulation each wake-up costs a large part of a round trip.
        """
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_scheduled = False
        if self.held:
            return  # the guest is parked for a checkpoint: frames wait in the connection
        data = self.conn.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    def write_raw(self, data: bytes) -> None:
        """Bytes outside the framing: the wake record of a parked guest (wire/checkpoint.py)."""
        assert self._writer is not None
        self._writer.write(data)

    async def drain(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            try:
                await self._writer.drain()
            except ConnectionError as exc:
                self._fail(ChannelClosed(f"guest channel closed: {exc}"))
        self.raise_if_broken()

    def open(self, request: dict) -> GuestStream:
        self.raise_if_broken()
        with self.wire_errors:
            stream_id = self.conn.open_stream(request)
        stream = GuestStream(self, stream_id)
        self._streams[stream_id] = stream
        self.flush()
        return stream

    def forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    self.conn.receive_eof()
                    raise ChannelClosed("the guest closed the agent channel (the VM stopped)")
                for event in self.conn.receive_data(data):
                    self._dispatch(event)
                self.flush()
        except RemoteProtocolError as exc:
            self._fail(guest_protocol_error(exc))
        except ChannelClosed as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._fail(ChannelClosed(f"guest channel failed: {exc}"))
        except Exception as exc:  # noqa: BLE001 - a bug here must fail the channel, not hang its waiters
            self._fail(VMError(f"the agent channel failed: {type(exc).__name__}: {exc}"))

    def _dispatch(self, event) -> None:
        if isinstance(event, HelloReceived):
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(event.info)
            return
        if isinstance(event, StreamOpened):
            # The guest has no reason to open streams on this port yet.
            raise RemoteProtocolError(f"guest opened stream {event.stream}, which the host never allows")
        if isinstance(event, MessageReceived) and event.stream == 0:
            self._on_connection_message(event)
            return
        stream = self._streams.get(event.stream)
        if stream is None:
            return
        if isinstance(event, WindowOpened):
            stream._window.set()
            return
        if isinstance(event, (StreamClosed, StreamReset)):
            stream.closed_by_guest = True
            stream._window.set()
        stream._push(event)

    def _on_connection_message(self, event: MessageReceived) -> None:
        reply = self._connection_replies.feed(event)
        if isinstance(reply, Ready):
            trace.guest_stamps(reply.stamps)
            self.ready_info = {"ca_bundle": reply.ca_bundle}
            assert self._ready is not None
            self._ready.set_result(reply.boot_ms)
        else:  # Fatal: the grammar allows nothing else on stream 0
            self._fail(VMError(f"guest init failed: {reply.message}"))

    def _fail(self, exc: BaseException) -> None:
        if self.broken is not None:
            return
        self.broken = exc
        for future in (self._hello, self._ready):
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved; callers may be gone
        for stream in list(self._streams.values()):
            stream._fail(exc)
        if self._writer is not None:
            self._writer.close()

    async def aclose(self) -> None:
        """Stop the reader and release the socket. Idempotent; it releases even if waiting fails."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._read_task is not None:
                self._read_task.cancel()
            await self._tasks.aclose()  # returns once the reader has finished
        finally:
            self._fail(ChannelClosed("the agent channel was closed"))  # wakes anything still waiting
            if self._writer is not None:
                self._writer.close()
            else:
                self._sock.close()
