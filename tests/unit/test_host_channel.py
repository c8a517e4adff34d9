"""The host end of the agent channel against a hand-driven (and often hostile) fake guest:
handshake, framing and garbage, exec. File operations are in test_host_files.py; the fake
guest and its helpers are in fake_guest.py.
"""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from fake_guest import CONFIG, GUEST_INFO, accept, start_handshake

from matchlock.api.errors import ExecError, GuestProtocolError, VMError
from matchlock.sandbox.process import ExecResult, GuestProcess
from matchlock.vm.channel import ChannelClosed
from matchlock.wire import agent as msgs
from matchlock.wire.frames import FrameKind, encode_frame
from matchlock.wire.mux import (
    DATA_CHUNK,
    INITIAL_WINDOW,
    PROTOCOL_NAME,
    STDERR,
    STDIN,
    STDOUT,
    ChannelEnded,
    DataReceived,
    MessageReceived,
    StreamClosed,
)
from matchlock.wire.replies import Ready

pytestmark = pytest.mark.timeout(120)  # a hang detector, not a performance assertion


# --- handshake --------------------------------------------------------------


async def test_normal_handshake_sets_boot_ms_and_sends_config(booted):
    channel, guest = booted
    assert channel.boot_ms == 42
    assert channel.guest_info == GUEST_INFO
    assert channel.conn.handshake_complete and guest.conn.handshake_complete
    assert channel.broken is None


async def test_ready_with_malformed_boot_ms_is_a_protocol_error(connected):
    channel, guest = connected
    handshake = await start_handshake(channel, guest)
    assert channel.guest_info == {}
    guest.conn.send_message(0, {"type": "ready", "boot_ms": "fast"})
    await guest.flush()
    with pytest.raises(
        GuestProtocolError, match="malformed 'ready' reply from the guest: 'boot_ms' must be an integer"
    ):
        await handshake
    assert channel.boot_ms is None


async def test_ready_reports_the_ca_bundle(connected):
    channel, guest = connected
    handshake = await start_handshake(channel, guest)
    guest.conn.send_message(0, Ready(7, "/etc/ssl/certs/ca-certificates.crt").to_wire())
    await guest.flush()
    await handshake
    assert channel.boot_ms == 7 and channel.ready_info == {"ca_bundle": "/etc/ssl/certs/ca-certificates.crt"}


async def test_guest_fatal_during_handshake_raises_vm_error_with_text(connected):
    channel, guest = connected
    handshake = await start_handshake(channel, guest)
    guest.conn.send_message(0, {"type": "fatal", "message": "OSError: cannot mount cgroup2"})
    await guest.flush()
    with pytest.raises(VMError) as info:
        await handshake
    assert type(info.value) is VMError
    assert str(info.value) == "guest init failed: OSError: cannot mount cgroup2"
    assert channel.broken is info.value
    with pytest.raises(VMError, match="cannot mount cgroup2"):
        channel.open({"op": "list_files", "path": "/"})


async def test_fatal_text_is_truncated(connected):
    channel, guest = connected
    handshake = await start_handshake(channel, guest)
    guest.conn.send_message(0, {"type": "fatal", "message": "x" * 100_000})
    await guest.flush()
    with pytest.raises(VMError) as info:
        await handshake
    assert str(info.value) == "guest init failed: " + "x" * 2000


@pytest.mark.parametrize(
    "garbage, match",
    [
        (b"\xde\xad\xbe\xef" * 64, "unknown frame kind 222"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown frame kind"),
        (struct.pack(">IBI", 0xFFFFFFF0, FrameKind.DATA, 1) + b"\0" * 100, "exceeds the 1048576-byte limit"),
        (encode_frame(FrameKind.DATA, 1, b"\x01x"), "DATA frame before HELLO"),
        (encode_frame(FrameKind.HELLO, 0, b"[" * 100_000), "HELLO of 100000 bytes exceeds"),
    ],
)
async def test_garbage_instead_of_hello_fails_handshake_quickly(garbage, match, connected):
    channel, guest = connected
    await guest.send_raw(garbage)
    with pytest.raises(GuestProtocolError, match=f"guest broke the wire protocol: .*{match}"):
        await asyncio.wait_for(channel.handshake(CONFIG), 5)
    assert isinstance(channel.broken, GuestProtocolError)
    # The host hangs up on a guest that broke the protocol.
    assert await asyncio.wait_for(guest.host_closed(), 5)


async def test_version_mismatch_fails_handshake_naming_versions(connected):
    channel, guest = connected
    hello = {"protocol": PROTOCOL_NAME, "version": 99, "role": "guest", "features": []}
    await guest.send_raw(encode_frame(FrameKind.HELLO, 0, json.dumps(hello).encode()))
    with pytest.raises(GuestProtocolError, match=r"version 99 but this side speaks version 1"):
        await asyncio.wait_for(channel.handshake(CONFIG), 5)


async def test_guest_closes_socket_mid_frame_during_handshake(connected):
    channel, guest = connected
    guest.conn.send_hello()
    await guest.send_raw(guest.conn.data_to_send()[:12])  # header + 3 bytes of payload
    guest.close()
    with pytest.raises(GuestProtocolError, match=r"closed in the middle of a frame \(12 bytes pending\)"):
        await asyncio.wait_for(channel.handshake(CONFIG), 5)
    await channel.aclose()


async def test_guest_closes_socket_cleanly_before_ready(connected):
    channel, guest = connected
    handshake = await start_handshake(channel, guest)
    guest.close()
    with pytest.raises(ChannelClosed, match="the guest closed the agent channel"):
        await asyncio.wait_for(handshake, 5)
    await channel.aclose()


async def test_guest_sending_partial_header_then_nothing_is_pending_not_error(connected):
    """Five bytes are not yet a header; they must just be buffered (the boot timeout covers silence)."""
    channel, guest = connected
    await guest.send_raw(b"\x00\x00\x00")
    handshake = asyncio.create_task(channel.handshake(CONFIG))
    while channel.conn._decoder.pending < 3:  # until the host has read them
        await asyncio.sleep(0)
    assert not handshake.done()
    assert channel.broken is None
    await guest.send_raw(b"\x00\xff\x00\x00\x00\x00")  # completes a header with kind 255
    with pytest.raises(GuestProtocolError, match="unknown frame kind 255"):
        await asyncio.wait_for(handshake, 5)


async def test_unexpected_stream0_message_breaks_channel(connected):
    channel, guest = connected
    handshake = await start_handshake(channel, guest)
    guest.conn.send_message(0, {"type": "surprise"})
    await guest.flush()
    with pytest.raises(GuestProtocolError, match=r"sent 'surprise' on the connection \(stream 0\) before 'ready'"):
        await asyncio.wait_for(handshake, 5)


async def test_guest_opening_a_stream_breaks_channel(booted):
    channel, guest = booted
    guest.conn.open_stream({"op": "exec"})
    await guest.flush()
    await asyncio.wait_for(guest.host_closed(), 5)
    assert isinstance(channel.broken, GuestProtocolError)
    assert "guest opened stream 2, which the host never allows" in str(channel.broken)
    with pytest.raises(GuestProtocolError):
        channel.open({"op": "list_files", "path": "/"})
    await channel.aclose()


# --- exec -------------------------------------------------------------------


def exec_request(command: str = "echo hi") -> dict:
    return msgs.ExecRequest(command, env={"A": "1"}, cwd="/tmp").to_wire()


async def test_exec_started_data_exit_close_gives_result(booted):
    channel, guest = booted
    out: list[bytes] = []
    err: list[bytes] = []

    async def on_stderr(data: bytes) -> None:  # async callbacks are awaited
        await asyncio.sleep(0)
        err.append(data)

    proc = GuestProcess(channel.open(exec_request()), out.append, on_stderr)
    waiter = asyncio.create_task(proc.wait())
    sid, request = await accept(guest, "exec")
    assert sid == 1
    assert msgs.ExecRequest.parse(request) == msgs.ExecRequest("echo hi", {"A": "1"}, "/tmp")
    guest.conn.send_message(sid, {"type": "started", "pid": 77})
    guest.conn.send_data(sid, STDOUT, b"hello ")
    guest.conn.send_data(sid, STDERR, b"warning\n")
    guest.conn.send_data(sid, STDOUT, b"world\n")
    guest.conn.end_channel(sid, STDOUT)
    guest.conn.end_channel(sid, STDERR)
    await guest.reply_and_close(sid, {"type": "exit", "code": 3})
    result = await waiter
    assert isinstance(result, ExecResult)
    assert result.exit_code == 3 and result.error is None and result.duration_ms >= 0
    assert b"".join(out) == b"hello world\n"
    assert err == [b"warning\n"]
    assert proc.pid == 77
    assert await proc.wait() is result  # cached
    # The host closes its side, and both ends forget the stream.
    assert await guest.next_event() == StreamClosed(sid)
    assert not channel.conn.is_open(sid) and not guest.conn.is_open(sid)
    assert channel.broken is None


async def test_exec_stdin_and_error_text(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request("cat")), None, None)
    sid, _ = await accept(guest, "exec")
    await proc.write(b"some input")
    proc.close_stdin()
    proc.send_signal(15)
    proc.resize(30, 100)
    assert await guest.next_event() == DataReceived(sid, STDIN, b"some input")
    assert await guest.next_event() == ChannelEnded(sid, STDIN)
    assert await guest.next_event() == MessageReceived(sid, {"type": "signal", "signal": 15})
    assert await guest.next_event() == MessageReceived(sid, {"type": "resize", "rows": 30, "cols": 100})
    guest.conn.send_message(sid, {"type": "started", "pid": 9})
    await guest.reply_and_close(sid, {"type": "exit", "code": 127})
    result = await proc.wait()
    assert result.exit_code == 127 and result.error is None  # a command that ran and exited 127 (not found)


async def test_exec_large_output_with_flow_control(booted):
    total = 3 * INITIAL_WINDOW + 12345
    channel, guest = booted
    received = bytearray()

    async def slow_consumer(data: bytes) -> None:
        await asyncio.sleep(0.001)
        received.extend(data)

    proc = GuestProcess(channel.open(exec_request("yes")), slow_consumer, None)
    waiter = asyncio.create_task(proc.wait())
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, {"type": "started", "pid": 1})
    sent = 0
    stalls = 0
    while sent < total:
        window = guest.conn.send_window(sid)
        if window == 0:
            stalls += 1
            while guest.conn.send_window(sid) == 0:
                await guest._fill()
            continue
        n = min(window, DATA_CHUNK, total - sent)
        guest.conn.send_data(sid, STDOUT, bytes([sent % 251]) * n)
        sent += n
        await guest.flush()
    await guest.reply_and_close(sid, {"type": "exit", "code": 0})
    result = await waiter
    assert result.exit_code == 0
    assert len(received) == total
    assert stalls >= 3  # the guest really had to wait for credit


async def test_exec_error_instead_of_started_is_a_command_that_could_not_start(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    await guest.reply_and_close(sid, {"type": "error", "message": "user 'bob' not found in /etc/passwd"})
    assert not await proc.started()
    result = await proc.wait()
    assert (result.exit_code, result.error) == (127, "user 'bob' not found in /etc/passwd")


async def test_exec_started_without_a_pid_still_counts_as_started(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, {"type": "started"})
    await guest.reply_and_close(sid, {"type": "exit", "code": 3})
    assert await proc.started() and proc.pid is None
    assert (await proc.wait()).exit_code == 3


async def test_exec_error_after_started_raises_exec_error(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, {"type": "started", "pid": 5})
    await guest.reply_and_close(sid, {"type": "error", "message": "the agent lost the command"})
    assert await proc.started() and proc.pid == 5
    with pytest.raises(ExecError, match="the agent lost the command"):
        await proc.wait()


async def test_exec_reset_by_guest_raises_exec_error(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    guest.conn.reset_stream(sid, "invalid request: 'cwd' must be an absolute path")
    await guest.flush()
    with pytest.raises(ExecError, match="the guest aborted the command: invalid request: 'cwd'"):
        await proc.wait()
    assert channel.broken is None


async def test_exec_close_without_exit_is_protocol_error(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    await guest.reply_and_close(sid, {"type": "started", "pid": 1})
    with pytest.raises(
        GuestProtocolError,
        match="guest broke the wire protocol: the guest closed an exec stream without an exit status",
    ):
        await proc.wait()


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"type": "exit", "code": 300}], r"malformed 'exit' reply from the guest: 'code' = 300 is outside 0\.\.255"),
        ([{"type": "exit", "code": -1}], r"malformed 'exit' reply from the guest: 'code' = -1"),
        ([{"type": "exit", "code": "0"}], r"malformed 'exit' reply from the guest: 'code' must be an integer"),
        ([{"type": "exit", "code": 0, "signal": 0}], r"malformed 'exit' reply.*'signal' = 0 is outside 1\.\.64"),
        ([{"type": "exit", "code": 0}, {"type": "exit", "code": 1}], r"sent 'exit' on an exec stream after the exit"),
        ([{"type": "exit", "code": 0}, {"type": "started"}], r"sent 'started' on an exec stream after the exit status"),
        ([{"type": "bogus"}], r"the guest sent 'bogus' on an exec stream while the command runs"),
        ([{"no": "type"}], r"the guest sent 'None' on an exec stream"),
    ],
)
async def test_exec_bad_replies_are_protocol_errors(messages, match, booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    for message in [{"type": "started", "pid": 1}, *messages]:
        guest.conn.send_message(sid, message)
    guest.conn.close_stream(sid)
    await guest.flush()
    with pytest.raises(GuestProtocolError, match=match):
        await proc.wait()
    # the host closed its half of the stream anyway
    assert not channel.conn.is_open(sid)


async def test_exec_data_on_stdin_channel_is_protocol_error(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, {"type": "started", "pid": 1})
    guest.conn.send_data(sid, STDIN, b"backwards")
    await guest.flush()
    with pytest.raises(GuestProtocolError, match="the guest sent stdin data on an exec stream"):
        await proc.wait()


async def test_garbage_in_the_middle_of_exec(booted):
    channel, guest = booted
    out: list[bytes] = []
    delivered = asyncio.Event()

    def on_stdout(data: bytes) -> None:
        out.append(data)
        delivered.set()

    proc = GuestProcess(channel.open(exec_request()), on_stdout, None)
    waiter = asyncio.create_task(proc.wait())
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, {"type": "started", "pid": 5})
    guest.conn.send_data(sid, STDOUT, b"partial")
    await guest.flush()
    await delivered.wait()  # the host delivers the good part first
    assert out == [b"partial"] and proc.pid == 5
    await guest.send_raw(b"\x00\x00\x00\x01\x63\x00\x00\x00\x01!" + b"\xff" * 100)
    with pytest.raises(GuestProtocolError, match="guest broke the wire protocol: unknown frame kind 99"):
        await waiter
    assert isinstance(channel.broken, GuestProtocolError)
    with pytest.raises(GuestProtocolError):
        channel.open(exec_request())


async def test_malformed_json_message_in_the_middle_of_exec(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    await guest.send_raw(encode_frame(FrameKind.MESSAGE, sid, b"[" * 200_000))
    with pytest.raises(GuestProtocolError, match="malformed JSON in MESSAGE frame"):
        await proc.wait()


async def test_guest_closes_socket_mid_frame_during_exec(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, {"type": "exit", "code": 0})
    await guest.send_raw(guest.conn.data_to_send()[:-3])
    guest.close()
    with pytest.raises(GuestProtocolError, match="closed in the middle of a frame"):
        await proc.wait()
    await channel.aclose()


async def test_guest_closes_socket_cleanly_during_exec(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    await accept(guest, "exec")
    guest.close()
    with pytest.raises(ChannelClosed, match="the guest closed the agent channel"):
        await proc.wait()
    await channel.aclose()


async def test_guest_data_beyond_granted_window(booted):
    channel, guest = booted
    proc = GuestProcess(channel.open(exec_request()), None, None)
    sid, _ = await accept(guest, "exec")
    # The sans-IO guest would refuse to do this, so write the frame by hand.
    await guest.send_raw(encode_frame(FrameKind.DATA, sid, b"\x01" + b"A" * (INITIAL_WINDOW + 1)))
    with pytest.raises(
        GuestProtocolError,
        match=f"stream {sid}: peer sent {INITIAL_WINDOW + 1} bytes with only {INITIAL_WINDOW} granted",
    ):
        await proc.wait()


async def test_guest_data_beyond_window_across_frames_while_callback_is_slow(booted):
    """Credit is only returned after the callback; extra bytes before that are a violation,
    reported at once even though the consumer is still blocked."""
    channel, guest = booted
    release = asyncio.Event()

    async def stuck(data: bytes) -> None:
        await release.wait()

    proc = GuestProcess(channel.open(exec_request()), stuck, None)
    waiter = asyncio.create_task(proc.wait())
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, {"type": "started", "pid": 1})
    guest.conn.send_data(sid, STDOUT, b"x" * INITIAL_WINDOW)
    await guest.flush()
    await guest.send_raw(encode_frame(FrameKind.DATA, sid, b"\x01y"))
    # The read loop catches the violation even while the consumer is busy...
    await asyncio.wait_for(guest.host_closed(), 5)
    assert isinstance(channel.broken, GuestProtocolError)
    assert "peer sent 1 bytes with only 0 granted" in str(channel.broken)
    # ...and the waiting consumer gets it without its callback returning.
    with pytest.raises(GuestProtocolError, match="peer sent 1 bytes with only 0 granted"):
        await asyncio.wait_for(waiter, 5)
    assert not release.is_set()
