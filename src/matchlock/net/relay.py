"""Copy bytes between two stream pairs in both directions, honouring half-close."""

from __future__ import annotations

import asyncio
import contextlib

READ_SIZE = 64 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: list[int]) -> None:
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
) -> tuple[int, int]:
    """Relay until both directions end; returns (bytes a->b, bytes b->a)."""
    forward, backward = [0], [0]
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_pump(a_reader, b_writer, forward))
            group.create_task(_pump(b_reader, a_writer, backward))
    finally:
        for writer in (a_writer, b_writer):
            writer.close()
    return forward[0], backward[0]
