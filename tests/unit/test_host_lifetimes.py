"""Who owns what on the host end of the channel: aclose, waiting on callbacks, port forwarders.

Every resource here has one idempotent `aclose()` that releases it and ends
the tasks it owns; these tests check that nothing it started is left running
and that errors keep their meaning on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from fake_guest import accept

from matchlock.api.errors import GuestProtocolError, VMError
from matchlock.sandbox.portforward import ForwardSpec, PortForwarder
from matchlock.sandbox.process import GuestProcess
from matchlock.vm.channel import ChannelClosed, GuestChannel
from matchlock.wire import agent as msgs
from matchlock.wire.mux import STDIN, STDOUT, ChannelEnded, DataReceived, StreamClosed
from matchlock.wire.replies import Result, Started
from support.ports import free_port

pytestmark = pytest.mark.timeout(120)  # a hang detector, not a performance assertion


def exec_request() -> dict:
    return msgs.ExecRequest("true").to_wire()


async def test_aclose_is_idempotent_ends_the_reader_and_fails_waiters(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    waiter = asyncio.create_task(proc.wait())
    await accept(guest, "exec")
    reader = channel._read_task
    assert reader is not None and not reader.done()
    await channel.aclose()
    await channel.aclose()
    assert reader.done()
    with pytest.raises(ChannelClosed, match="the agent channel was closed"):
        await waiter
    assert await guest.host_closed()


async def test_aclose_of_a_channel_that_never_started_releases_the_socket():
    host_sock, guest_sock = socket.socketpair()
    with guest_sock:
        channel = GuestChannel(host_sock)
        await channel.aclose()
        assert host_sock.fileno() == -1


async def test_a_failing_callback_raises_its_own_error(booted):
    channel, guest = booted

    async def broken_consumer(data: bytes) -> None:
        raise ConnectionResetError("the terminal went away")

    proc = GuestProcess(channel.open(exec_request()), broken_consumer, None)
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, Started(3).to_wire())
    guest.conn.send_data(sid, STDOUT, b"x")
    await guest.flush()
    with pytest.raises(ConnectionResetError, match="the terminal went away"):
        await proc.wait()
    assert channel.broken is None  # the consumer's failure is not the guest's


async def test_sending_on_a_stream_closed_by_this_side_is_reported_as_a_host_bug(booted):
    channel, guest = booted
    stream = channel.open(exec_request())
    stream.finish_sending()
    with pytest.raises(
        VMError, match="matchlock misused the agent channel: stream 1 already closed by this side"
    ) as info:
        stream.message({"type": "cancel"})
    assert not isinstance(info.value, GuestProtocolError)


async def test_sending_on_a_channel_the_guest_broke_reports_the_guest(booted):
    channel, guest = booted
    stream = channel.open(exec_request())
    await guest.send_raw(b"\xff" * 9)
    assert await guest.host_closed()
    with pytest.raises(GuestProtocolError, match="unknown frame kind 255"):
        stream.message({"type": "cancel"})


async def test_port_forwarder_relays_and_aclose_ends_every_connection(booted):
    channel, guest = booted
    port = free_port()
    forwarder = PortForwarder(channel.open)
    bindings = await forwarder.start([ForwardSpec(port, 8080)], ["127.0.0.1"])
    assert [(b.address, b.local_port, b.remote_port) for b in bindings] == [("127.0.0.1", port, 8080)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sid, request = await accept(guest, "port_forward")
    assert request == {"op": "port_forward", "port": 8080}
    guest.conn.send_message(sid, Started().to_wire())
    guest.conn.send_data(sid, STDOUT, b"hello")
    await guest.flush()
    assert await reader.readexactly(5) == b"hello"
    writer.write(b"ping")
    assert await guest.next_event() == DataReceived(sid, STDIN, b"ping")
    [task] = forwarder._connections
    await forwarder.aclose()
    await forwarder.aclose()
    assert task.done() and forwarder.servers == []
    assert await reader.read() == b""  # the local connection was closed
    assert await guest.next_event() == StreamClosed(sid)  # and so was the stream
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()


@contextlib.asynccontextmanager
async def one_forwarded_connection(channel: GuestChannel, guest) -> AsyncIterator[tuple]:
    """A forwarder to guest port 9000 and one local connection through it, its stream accepted by the guest."""
    port = free_port()
    forwarder = PortForwarder(channel.open)
    await forwarder.start([ForwardSpec(port, 9000)], ["127.0.0.1"])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sid, _ = await accept(guest, "port_forward")
        yield forwarder, reader, writer, sid
    finally:
        await forwarder.aclose()


async def test_port_forward_half_close_and_result_end_the_connection(booted):
    channel, guest = booted
    async with one_forwarded_connection(channel, guest) as (forwarder, reader, writer, sid):
        guest.conn.send_message(sid, Started().to_wire())
        await guest.flush()
        writer.write(b"request")
        writer.write_eof()
        assert await guest.next_event() == DataReceived(sid, STDIN, b"request")
        assert await guest.next_event() == ChannelEnded(sid, STDIN)
        assert await guest.next_event() == StreamClosed(sid)
        guest.conn.send_data(sid, STDOUT, b"response")
        guest.conn.end_channel(sid, STDOUT)
        await guest.reply_and_close(sid, Result().to_wire())
        assert await reader.read() == b"response"
        writer.close()


async def test_port_forward_out_of_grammar_reply_drops_only_that_connection(booted):
    channel, guest = booted
    async with one_forwarded_connection(channel, guest) as (forwarder, reader, writer, sid):
        guest.conn.send_data(sid, STDOUT, b"before started")
        await guest.flush()
        assert await reader.read() == b""
        writer.close()
        assert channel.broken is None and forwarder.servers  # the listener goes on
