"""Host end of the `matchlock.vfs` port: decodes guest requests (`wire.vfs`) and answers from the router.

Requests are served concurrently, at most `Limits.max_inflight` at once: past that the reader stops
reading, so the guest blocks on a full port instead of growing host memory, and each request holds
at most one frame (about 1 MiB). Blocking filesystem calls run in this server's own thread pool, so
one sandbox's flood cannot take the threads of another. Replies produced in one event-loop turn go
out in one write. A frame that breaks the protocol ends the server (the guest's mounts then fail
with ENOTCONN); the sandbox goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from ..wire import vfs as wire
from ..wire.frames import LocalProtocolError, RemoteProtocolError
from .router import Router
from .types import FsError

log = logging.getLogger("matchlock.vfs")
READ_SIZE = 256 * 1024
THREADS = 8
STATS_ENV = "MATCHLOCK_VFS_STATS"  # set: the guest daemon logs its request timings to the console


class VfsServer:
    def __init__(self, sock: socket.socket, router: Router) -> None:
        self.sock = sock
        self.router = router
        self.limits = router.limits
        self.broken: str = ""
        self.served = 0
        self.service_seconds = 0.0  # time from decoding a request to queueing its reply, summed (benchmarks)
        self.op_counts: collections.Counter[str] = collections.Counter()  # requests by op name (benchmarks)
        self._writer: asyncio.StreamWriter | None = None
        self._pending = bytearray()
        self._flush_scheduled = False
        self._slots = asyncio.Semaphore(self.limits.max_inflight)
        self._tasks = contextlib.AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._read_task: asyncio.Task | None = None
        self._requests: set[asyncio.Task] = set()
        self._closed = False

    @staticmethod
    def executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(THREADS, thread_name_prefix="matchlock-vfs")

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self.sock, limit=READ_SIZE)
        self._group = await self._tasks.enter_async_context(asyncio.TaskGroup())
        self._read_task = self._group.create_task(self._read_loop(reader))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = wire.RequestDecoder()
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    decoder.close()
                    return
                for request in decoder.feed(data):
                    await self._dispatch(request)
        except RemoteProtocolError as exc:
            self.broken = f"the guest broke the VFS protocol: {exc}"
            log.warning("%s", self.broken)
        except ConnectionError as exc:
            self.broken = f"VFS channel closed: {exc}"

    async def _dispatch(self, request: wire.Request) -> None:
        self.op_counts[wire.OP_NAMES.get(request.op, "?")] += 1
        if request.op == wire.Op.FORGET:
            assert isinstance(request.args, wire.Forget)
            self.router.forget(request.args.items)
            return
        if request.op == wire.Op.HELLO:
            assert isinstance(request.args, wire.Hello)
            self._hello(request.id, request.args)
            return
        await self._slots.acquire()  # backpressure: at most max_inflight requests held at once
        assert self._group is not None
        task = self._group.create_task(self._serve(request))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def _hello(self, request_id: int, hello: wire.Hello) -> None:
        if hello.version != wire.VERSION:
            self._send(wire.encode_error(request_id, errno.EPROTO))
            return
        max_io = min(hello.max_io, self.limits.max_io, wire.MAX_IO)
        stats = os.environ.get(STATS_ENV, "") not in ("", "0")
        self._send(wire.encode_reply(request_id, wire.HelloReply(wire.VERSION, max_io, self.router.hello(), stats)))

    async def _serve(self, request: wire.Request) -> None:
        started = time.perf_counter()
        try:
            try:
                result = await self.router.handle(request)
                frame = wire.encode_reply(request.id, result)
            except FsError as exc:
                frame = wire.encode_error(request.id, exc.errno)
            except OSError as exc:  # a host error the provider did not translate
                frame = wire.encode_error(request.id, exc.errno or errno.EIO)
            except (LocalProtocolError, ValueError, OverflowError) as exc:
                log.warning("VFS %s failed: %s", wire.OP_NAMES.get(request.op, request.op), exc)
                frame = wire.encode_error(request.id, errno.EIO)
            except Exception as exc:  # noqa: BLE001 - a bug in one op must not end the mounts
                log.warning("VFS %s failed: %s", wire.OP_NAMES.get(request.op, request.op), type(exc).__name__)
                frame = wire.encode_error(request.id, errno.EIO)
            self.served += 1
            self.service_seconds += time.perf_counter() - started
            if request.id:  # id 0: a notice (RELEASE answered in the guest), no reply
                self._send(frame)
        finally:
            self._slots.release()

    def _send(self, frame: bytes) -> None:
        self._pending += frame
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and self._writer is not None and not self._writer.is_closing():
            self._writer.write(bytes(self._pending))
        self._pending.clear()

    async def wait(self) -> None:
        """Until the guest closes the channel or breaks the protocol."""
        if self._read_task is not None:
            await asyncio.wait([self._read_task])

    async def aclose(self) -> None:
        """Stop reading, cancel requests in flight, close the socket and the router's files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._read_task is not None:
                self._read_task.cancel()
            for task in list(self._requests):
                task.cancel()
            await self._tasks.aclose()
        finally:
            if self._writer is not None:
                self._writer.close()
            else:
                self.sock.close()
            # Threads still in a provider call finish before the provider's files close under them.
            await asyncio.to_thread(self.router.executor.shutdown, True, cancel_futures=True)
            self.router.close()
