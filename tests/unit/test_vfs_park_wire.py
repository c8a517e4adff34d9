"""Parking the VFS channel: the PARK and PARKED frames and the wake record are checked strictly, both ways."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from vfs_peer import Peer

from matchlock.api.errors import VMError
from matchlock.guest import fuse_daemon
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.server import VfsServer
from matchlock.wire import vfs as wire
from matchlock.wire.boot import WAKE_SIZE
from matchlock.wire.checkpoint import WAKE_MAGIC, WAKE_RECORD_SIZE, encode_wake
from matchlock.wire.frames import LocalProtocolError, RemoteProtocolError

WAKE = encode_wake(new_host=False, time_ns=1, seed=bytes(WAKE_SIZE))


def _parked(token: int, request_id: int = 0) -> bytes:
    body = token.to_bytes(8, "big")
    return wire.REQUEST_HEADER.pack(len(body), request_id, wire.Op.PARKED, 0, 0, 0) + body


def test_park_notices_round_trip_and_bad_ones_are_refused() -> None:
    frame = wire.encode_notice(wire.PARK, 1)  # token 1 is fine (node 1 is reserved only for INVAL_*)
    (reply,) = wire.ReplyDecoder().feed(frame)
    assert reply.id == wire.NOTICE_ID and wire.decode_notice(reply.payload) == (wire.PARK, 1, b"")
    for kind, token, name in ((wire.PARK, 0, b""), (wire.PARK, 1 << 64, b""), (wire.PARK, 5, b"x"), (4, 5, b"")):
        with pytest.raises(LocalProtocolError):
            wire.encode_notice(kind, token, name)
    payload = wire.encode_notice(wire.PARK, 5)[wire.REPLY_HEADER.size :]
    for bad in (payload[:-1], bytes([4]) + payload[1:], payload[:1] + bytes(8) + payload[9:], payload[:9] + b"\0\1x"):
        with pytest.raises(RemoteProtocolError):
            wire.decode_notice(bad)


def test_parked_is_a_notice_with_a_nonzero_token() -> None:
    (request,) = wire.RequestDecoder().feed(wire.encode_request(0, 0, 0, 0, wire.Parked(7)))
    assert (request.id, request.op, request.args) == (0, wire.Op.PARKED, wire.Parked(7))
    short = wire.REQUEST_HEADER.pack(7, 0, wire.Op.PARKED, 0, 0, 0) + bytes(7)
    long = wire.REQUEST_HEADER.pack(9, 0, wire.Op.PARKED, 0, 0, 0) + _parked(7)[-8:] + b"\0"
    for frame, message in ((_parked(0), "token 0"), (_parked(7, 3), "request id 3"), (short, "runs past"),
                           (long, "stray")):  # fmt: skip
        with pytest.raises(RemoteProtocolError, match=message):
            wire.RequestDecoder().feed(frame)


def test_the_reply_decoder_yields_a_wake_record_in_port_order() -> None:
    notice = wire.encode_notice(wire.INVAL_INODE, 9)
    decoder = wire.ReplyDecoder()
    stream = wire.encode_error(4, 2) + WAKE + notice
    got = []
    for i in range(0, len(stream), 5):  # split anywhere, the record included
        got += decoder.feed(stream[i : i + 5])
    assert [(r.id, r.status) for r in got] == [(4, -2), (0, wire.WAKE_STATUS), (0, 0)]
    assert got[1].payload == WAKE and decoder.pending == 0
    with pytest.raises(RemoteProtocolError, match="exceeds"):  # anything else that long is still refused
        wire.ReplyDecoder().feed(b"MLWAKE0X" + bytes(WAKE_RECORD_SIZE))
    assert WAKE.startswith(WAKE_MAGIC)


# ---- the guest daemon refuses a host that breaks the park ---------------------------------------------


def _guest(frames: bytes) -> BaseException | None:
    """Run the daemon's reply thread on `frames` from the host; the error it ends with (None: EOF)."""
    guest, host = socket.socketpair()
    guest.setblocking(False)
    channel = fuse_daemon.Channel(guest.fileno())
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            fuse_daemon.serve_replies(channel)
        except EOFError:
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    host.sendall(frames)
    host.shutdown(socket.SHUT_WR)
    thread.join(10)
    host.close()
    guest.close()
    assert result, "the reply thread did not end"
    return result[0]


def test_a_guest_parks_and_wakes_on_a_well_formed_exchange() -> None:
    assert _guest(wire.encode_notice(wire.PARK, 3) + WAKE) is None


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (WAKE, "not parked"),
        (wire.encode_notice(wire.PARK, 3) + wire.encode_notice(wire.PARK, 4), "PARK while"),
        (wire.encode_notice(wire.PARK, 3) + wire.encode_notice(wire.INVAL_INODE, 9), "notice while"),
        (wire.encode_notice(wire.PARK, 3) + wire.encode_error(5, 2), "unknown request"),
        (wire.encode_notice(wire.PARK, 3) + WAKE[:8] + b"\x80" + WAKE[9:], "not a wake record"),
    ],
)
def test_a_guest_refuses_a_host_that_breaks_the_park(frames: bytes, message: str) -> None:
    error = _guest(frames)
    assert isinstance(error, RemoteProtocolError) and message in str(error)


# ---- the host refuses a guest that breaks it ----------------------------------------------------------


async def _server() -> tuple[VfsServer, Peer]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    router = Router([Mount("/m", MemoryProvider())], Interceptor(None), VfsServer.executor())
    server = VfsServer(theirs, router)
    await server.start()
    return server, Peer(ours)


async def test_a_parked_with_a_token_never_sent_breaks_the_channel() -> None:
    server, peer = await _server()
    try:
        await asyncio.get_running_loop().sock_sendall(peer.sock, _parked(1))
        await asyncio.wait_for(server.wait(), 10)
        assert "token 1, never sent" in server.broken
        with pytest.raises(VMError, match="cannot be parked"):
            await server.park(1)
    finally:
        await server.aclose()
        peer.sock.close()


async def test_a_late_parked_after_a_timeout_is_ignored() -> None:
    server, peer = await _server()
    try:
        with pytest.raises(VMError, match="did not park"):
            await server.park(0.05)
        await asyncio.get_running_loop().sock_sendall(peer.sock, _parked(1))
        reply = await peer.call(wire.Statfs(2))
        assert reply.status == 0 and server.broken == ""
        assert peer.replies[0].status == wire.WAKE_STATUS  # the wake the timeout sent, after the PARK
    finally:
        await server.aclose()
        peer.sock.close()


async def test_requests_a_guest_sends_after_its_parked_wait_unanswered_until_the_wake() -> None:
    server, peer = await _server()
    try:
        parking = asyncio.create_task(server.park(10))
        while not peer.replies:  # the PARK notice
            data = await asyncio.get_running_loop().sock_recv(peer.sock, 1 << 16)
            for reply in peer.decoder.feed(data):
                peer.replies[reply.id] = reply
        await asyncio.get_running_loop().sock_sendall(peer.sock, _parked(1))
        await parking
        await peer.send(7, wire.Mkdir(2, 0o755, b"made-while-parked"))  # a hostile guest, after PARKED
        await asyncio.sleep(0.2)  # time the server would need to serve it; nothing may happen
        assert server.router.find(("m", "made-while-parked")) is None and 7 not in peer.replies
        server.wake()
        assert (await peer.reply(7)).status == 0
    finally:
        await server.aclose()
        peer.sock.close()
