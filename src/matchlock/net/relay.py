"""Copy bytes between two stream pairs in both directions, honouring half-close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

READ_SIZE = 64 * 1024

Ender = Callable[[], Awaitable[None]]


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: list[int], end: Ender | None
) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            counter[0] += len(data)
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):  # ConnectionError among them: the peer is gone
        pass
    # The other side may still be talking: pass on our EOF, keep reading theirs.
    # TLS has no half-close, so there the end can only be passed on by closing;
    # otherwise a WebSocket peer waits for a close that never comes.
    if end is not None:  # the writer's owner knows how to end it whole (intercepted TLS: close_notify, then FIN)
        await end()
        return
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()


async def pipe_both_ways(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    *,
    end_a: Ender | None = None,
) -> tuple[int, int]:
    """Relay until both directions end; returns (bytes a->b, bytes b->a).

    `end_a` ends side a when b has no more to send, instead of a half-close
    or a bare close of `a_writer`."""
    forward, backward = [0], [0]
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_pump(a_reader, b_writer, forward, None))
            group.create_task(_pump(b_reader, a_writer, backward, end_a))
    finally:
        for writer in (a_writer, b_writer):
            if not writer.is_closing():  # a second close() detaches asyncio's TLS transport from its protocol
                writer.close()
    return forward[0], backward[0]
