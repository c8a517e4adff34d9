"""The host end of the agent channel against a hand-driven (and often hostile) fake guest.

The fake guest is a real `wire.mux.Connection(Role.GUEST)` on the other end of a
socketpair; each test drives it step by step. Every scenario runs under
`asyncio.wait_for` so a host that hangs fails the test instead of the suite.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest

from matchlock.api.errors import ExecError, FileOperationError, GuestProtocolError, VMError
from matchlock.sandbox import files
from matchlock.sandbox.process import ExecResult, GuestProcess
from matchlock.vm.channel import ChannelClosed, GuestChannel
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

pytestmark = pytest.mark.timeout(120)

HANG = 10.0  # seconds: a hang detector, not a performance assertion
CONFIG = msgs.GuestConfig(
    hostname="sandbox",
    time_ns=1_700_000_000_123_456_789,
    privileged=False,
    cpus=1.5,
    dns_servers=("10.0.2.3",),
    extra_hosts=(("db", "10.0.0.2"),),
)
GUEST_INFO = {"agent_version": "test", "kernel": "6.1"}


class FakeGuest:
    """The guest end: a sans-IO Connection plus the raw socket, driven by the test."""

    def __init__(self) -> None:
        self.conn = Connection(Role.GUEST)
        self.queue: list = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def attach(self, sock: socket.socket) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=sock)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def flush(self) -> None:
        await self.send_raw(self.conn.data_to_send())

    async def _fill(self) -> None:
        data = await self.reader.read(1 << 20)
        if not data:
            raise EOFError("the host closed the channel")
        self.queue += self.conn.receive_data(data)

    async def next_event(self, skip=(WindowOpened,)):
        while True:
            while not self.queue:
                await self._fill()
            event = self.queue.pop(0)
            if not isinstance(event, skip):
                return event

    async def host_closed(self) -> bool:
        """True once the host has closed its end of the socket."""
        try:
            while True:
                await self._fill()
        except (EOFError, ConnectionError):
            return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run(coro_fn, timeout: float = HANG):
    async def main():
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(main())


async def connect() -> tuple[GuestChannel, FakeGuest]:
    host_sock, guest_sock = socket.socketpair()
    channel = GuestChannel(host_sock)
    await channel.start()
    guest = FakeGuest()
    await guest.attach(guest_sock)
    return channel, guest


async def boot() -> tuple[GuestChannel, FakeGuest]:
    channel, guest = await connect()
    handshake = asyncio.create_task(channel.handshake(CONFIG))
    guest.conn.send_hello(GUEST_INFO)
    await guest.flush()
    event = await guest.next_event()
    assert isinstance(event, HelloReceived)
    assert msgs.GuestConfig.parse(event.info) == CONFIG
    guest.conn.send_message(0, {"type": msgs.EVENT_READY, "boot_ms": 42})
    await guest.flush()
    await handshake
    return channel, guest


async def shutdown(channel: GuestChannel, guest: FakeGuest) -> None:
    await channel.close()
    guest.close()


async def accept(guest: FakeGuest, op: str) -> tuple[int, dict]:
    event = await guest.next_event()
    assert isinstance(event, StreamOpened), event
    assert event.request["op"] == op
    if op in ("read_file", "list_files"):
        # Request-only operations half-close together with the request.
        assert await guest.next_event() == StreamClosed(event.stream)
    return event.stream, event.request


# --- handshake --------------------------------------------------------------


def test_normal_handshake_sets_boot_ms_and_sends_config():
    async def scenario():
        channel, guest = await boot()
        assert channel.boot_ms == 42
        assert channel.guest_info == GUEST_INFO
        assert channel.conn.handshake_complete and guest.conn.handshake_complete
        assert channel.broken is None
        await shutdown(channel, guest)

    run(scenario)


def test_ready_without_integer_boot_ms():
    async def scenario():
        channel, guest = await connect()
        handshake = asyncio.create_task(channel.handshake(CONFIG))
        guest.conn.send_hello()
        await guest.flush()
        assert isinstance(await guest.next_event(), HelloReceived)
        guest.conn.send_message(0, {"type": "ready", "boot_ms": "fast"})
        await guest.flush()
        await handshake
        assert channel.boot_ms is None
        assert channel.guest_info == {}
        await shutdown(channel, guest)

    run(scenario)


def test_guest_fatal_during_handshake_raises_vm_error_with_text():
    async def scenario():
        channel, guest = await connect()
        handshake = asyncio.create_task(channel.handshake(CONFIG))
        guest.conn.send_hello()
        await guest.flush()
        assert isinstance(await guest.next_event(), HelloReceived)
        guest.conn.send_message(0, {"type": "fatal", "message": "OSError: cannot mount cgroup2"})
        await guest.flush()
        with pytest.raises(VMError) as info:
            await handshake
        assert type(info.value) is VMError
        assert str(info.value) == "guest init failed: OSError: cannot mount cgroup2"
        assert channel.broken is info.value
        with pytest.raises(VMError, match="cannot mount cgroup2"):
            channel.open({"op": "list_files", "path": "/"})
        await shutdown(channel, guest)

    run(scenario)


def test_fatal_text_is_truncated():
    async def scenario():
        channel, guest = await connect()
        handshake = asyncio.create_task(channel.handshake(CONFIG))
        guest.conn.send_hello()
        guest.conn._hello_sent = True
        await guest.flush()
        assert isinstance(await guest.next_event(), HelloReceived)
        guest.conn.send_message(0, {"type": "fatal", "message": "x" * 100_000})
        await guest.flush()
        with pytest.raises(VMError) as info:
            await handshake
        assert str(info.value) == "guest init failed: " + "x" * 2000
        await shutdown(channel, guest)

    run(scenario)


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
def test_garbage_instead_of_hello_fails_handshake_quickly(garbage, match):
    async def scenario():
        channel, guest = await connect()
        await guest.send_raw(garbage)
        with pytest.raises(GuestProtocolError, match=f"guest broke the wire protocol: .*{match}"):
            await asyncio.wait_for(channel.handshake(CONFIG), 5)
        assert isinstance(channel.broken, GuestProtocolError)
        # The host hangs up on a guest that broke the protocol.
        assert await asyncio.wait_for(guest.host_closed(), 5)
        await shutdown(channel, guest)

    run(scenario)


def test_version_mismatch_fails_handshake_naming_versions():
    async def scenario():
        channel, guest = await connect()
        hello = {"protocol": PROTOCOL_NAME, "version": 99, "role": "guest", "features": []}
        await guest.send_raw(encode_frame(FrameKind.HELLO, 0, json.dumps(hello).encode()))
        with pytest.raises(GuestProtocolError, match=r"version 99 but this side speaks version 1"):
            await asyncio.wait_for(channel.handshake(CONFIG), 5)
        await shutdown(channel, guest)

    run(scenario)


def test_guest_closes_socket_mid_frame_during_handshake():
    async def scenario():
        channel, guest = await connect()
        guest.conn.send_hello()
        await guest.send_raw(guest.conn.data_to_send()[:12])  # header + 3 bytes of payload
        guest.close()
        with pytest.raises(GuestProtocolError, match=r"closed in the middle of a frame \(12 bytes pending\)"):
            await asyncio.wait_for(channel.handshake(CONFIG), 5)
        await channel.close()

    run(scenario)


def test_guest_closes_socket_cleanly_before_ready():
    async def scenario():
        channel, guest = await connect()
        handshake = asyncio.create_task(channel.handshake(CONFIG))
        guest.conn.send_hello()
        await guest.flush()
        assert isinstance(await guest.next_event(), HelloReceived)
        guest.close()
        with pytest.raises(ChannelClosed, match="the guest closed the agent channel"):
            await asyncio.wait_for(handshake, 5)
        await channel.close()

    run(scenario)


def test_guest_sending_partial_header_then_nothing_is_pending_not_error():
    """Five bytes are not yet a header; they must just be buffered (the boot timeout covers silence)."""

    async def scenario():
        channel, guest = await connect()
        await guest.send_raw(b"\x00\x00\x00")
        handshake = asyncio.create_task(channel.handshake(CONFIG))
        await asyncio.sleep(0.05)
        assert not handshake.done()
        assert channel.broken is None
        await guest.send_raw(b"\x00\xff\x00\x00\x00\x00")  # completes a header with kind 255
        with pytest.raises(GuestProtocolError, match="unknown frame kind 255"):
            await asyncio.wait_for(handshake, 5)
        await shutdown(channel, guest)

    run(scenario)


def test_unexpected_stream0_message_breaks_channel():
    async def scenario():
        channel, guest = await connect()
        handshake = asyncio.create_task(channel.handshake(CONFIG))
        guest.conn.send_hello()
        await guest.flush()
        assert isinstance(await guest.next_event(), HelloReceived)
        guest.conn.send_message(0, {"type": "surprise"})
        await guest.flush()
        with pytest.raises(GuestProtocolError, match="unexpected connection message 'surprise'"):
            await asyncio.wait_for(handshake, 5)
        await shutdown(channel, guest)

    run(scenario)


def test_guest_opening_a_stream_breaks_channel():
    async def scenario():
        channel, guest = await boot()
        guest.conn.open_stream({"op": "exec"})
        await guest.flush()
        await asyncio.wait_for(guest.host_closed(), 5)
        assert isinstance(channel.broken, GuestProtocolError)
        assert "guest opened stream 2, which the host never allows" in str(channel.broken)
        with pytest.raises(GuestProtocolError):
            channel.open({"op": "list_files", "path": "/"})
        await channel.close()

    run(scenario)


# --- exec -------------------------------------------------------------------


def exec_request(command: str = "echo hi") -> dict:
    return msgs.ExecRequest(command, env={"A": "1"}, cwd="/tmp").to_wire()


def test_exec_started_data_exit_close_gives_result():
    async def scenario():
        channel, guest = await boot()
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
        guest.conn.send_message(sid, {"type": "exit", "code": 3})
        guest.conn.close_stream(sid)
        await guest.flush()
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
        await shutdown(channel, guest)

    run(scenario)


def test_exec_stdin_and_error_text():
    async def scenario():
        channel, guest = await boot()
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
        guest.conn.send_message(sid, {"type": "exit", "code": 127, "error": "cannot run /bin/sh"})
        guest.conn.close_stream(sid)
        await guest.flush()
        result = await proc.wait()
        assert result.exit_code == 127 and result.error == "cannot run /bin/sh"
        await shutdown(channel, guest)

    run(scenario)


def test_exec_large_output_with_flow_control():
    total = 3 * INITIAL_WINDOW + 12345

    async def scenario():
        channel, guest = await boot()
        received = bytearray()

        async def slow_consumer(data: bytes) -> None:
            await asyncio.sleep(0.001)
            received.extend(data)

        proc = GuestProcess(channel.open(exec_request("yes")), slow_consumer, None)
        waiter = asyncio.create_task(proc.wait())
        sid, _ = await accept(guest, "exec")
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
        guest.conn.send_message(sid, {"type": "exit", "code": 0})
        guest.conn.close_stream(sid)
        await guest.flush()
        result = await waiter
        assert result.exit_code == 0
        assert len(received) == total
        assert stalls >= 3  # the guest really had to wait for credit
        await shutdown(channel, guest)

    run(scenario)


def test_exec_error_reply_raises_exec_error():
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        sid, _ = await accept(guest, "exec")
        guest.conn.send_message(sid, {"type": "error", "message": "no such user 'bob'"})
        guest.conn.close_stream(sid)
        await guest.flush()
        with pytest.raises(ExecError, match="no such user 'bob'"):
            await proc.wait()
        await shutdown(channel, guest)

    run(scenario)


def test_exec_reset_by_guest_raises_exec_error():
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        sid, _ = await accept(guest, "exec")
        guest.conn.reset_stream(sid, "invalid request: 'cwd' must be an absolute path")
        await guest.flush()
        with pytest.raises(ExecError, match="the guest aborted the command: invalid request: 'cwd'"):
            await proc.wait()
        assert channel.broken is None
        await shutdown(channel, guest)

    run(scenario)


def test_exec_close_without_exit_is_protocol_error():
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        sid, _ = await accept(guest, "exec")
        guest.conn.send_message(sid, {"type": "started", "pid": 1})
        guest.conn.close_stream(sid)
        await guest.flush()
        with pytest.raises(GuestProtocolError, match="ended an exec stream without an exit status"):
            await proc.wait()
        await shutdown(channel, guest)

    run(scenario)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"type": "exit", "code": 300}], r"malformed exit status from the guest: 'code' = 300 is outside 0\.\.255"),
        ([{"type": "exit", "code": -1}], r"malformed exit status from the guest: 'code' = -1"),
        ([{"type": "exit", "code": "0"}], r"malformed exit status from the guest: 'code' must be an integer"),
        ([{"type": "exit", "code": 0, "signal": 0}], r"malformed exit status.*'signal' = 0 is outside 1\.\.64"),
        ([{"type": "exit", "code": 0}, {"type": "exit", "code": 1}], r"the guest sent 'exit' after the exit status"),
        ([{"type": "exit", "code": 0}, {"type": "started"}], r"the guest sent 'started' after the exit status"),
        ([{"type": "bogus"}], r"unexpected exec reply 'bogus' from the guest"),
        ([{"no": "type"}], r"unexpected exec reply 'None' from the guest"),
    ],
)
def test_exec_bad_replies_are_protocol_errors(messages, match):
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        sid, _ = await accept(guest, "exec")
        for message in messages:
            guest.conn.send_message(sid, message)
        guest.conn.close_stream(sid)
        await guest.flush()
        with pytest.raises(GuestProtocolError, match=match):
            await proc.wait()
        # the host closed its half of the stream anyway
        assert not channel.conn.is_open(sid)
        await shutdown(channel, guest)

    run(scenario)


def test_exec_data_on_stdin_channel_is_protocol_error():
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        sid, _ = await accept(guest, "exec")
        guest.conn.send_data(sid, STDIN, b"backwards")
        await guest.flush()
        with pytest.raises(GuestProtocolError, match="the guest sent data on the stdin channel"):
            await proc.wait()
        await shutdown(channel, guest)

    run(scenario)


def test_garbage_in_the_middle_of_exec():
    async def scenario():
        channel, guest = await boot()
        out: list[bytes] = []
        proc = GuestProcess(channel.open(exec_request()), out.append, None)
        waiter = asyncio.create_task(proc.wait())
        sid, _ = await accept(guest, "exec")
        guest.conn.send_message(sid, {"type": "started", "pid": 5})
        guest.conn.send_data(sid, STDOUT, b"partial")
        await guest.flush()
        while not out:  # let the host deliver the good part first
            await asyncio.sleep(0.001)
        assert out == [b"partial"] and proc.pid == 5
        await guest.send_raw(b"\x00\x00\x00\x01\x63\x00\x00\x00\x01!" + b"\xff" * 100)
        with pytest.raises(GuestProtocolError, match="guest broke the wire protocol: unknown frame kind 99"):
            await waiter
        assert isinstance(channel.broken, GuestProtocolError)
        with pytest.raises(GuestProtocolError):
            channel.open(exec_request())
        await shutdown(channel, guest)

    run(scenario)


def test_malformed_json_message_in_the_middle_of_exec():
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        sid, _ = await accept(guest, "exec")
        await guest.send_raw(encode_frame(FrameKind.MESSAGE, sid, b"[" * 200_000))
        with pytest.raises(GuestProtocolError, match="malformed JSON in MESSAGE frame"):
            await proc.wait()
        await shutdown(channel, guest)

    run(scenario)


def test_guest_closes_socket_mid_frame_during_exec():
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        sid, _ = await accept(guest, "exec")
        guest.conn.send_message(sid, {"type": "exit", "code": 0})
        await guest.send_raw(guest.conn.data_to_send()[:-3])
        guest.close()
        with pytest.raises(GuestProtocolError, match="closed in the middle of a frame"):
            await proc.wait()
        await channel.close()

    run(scenario)


def test_guest_closes_socket_cleanly_during_exec():
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        await accept(guest, "exec")
        guest.close()
        with pytest.raises(ChannelClosed, match="the guest closed the agent channel"):
            await proc.wait()
        await channel.close()

    run(scenario)


def test_guest_data_beyond_granted_window():
    async def scenario():
        channel, guest = await boot()
        proc = GuestProcess(channel.open(exec_request()), None, None)
        sid, _ = await accept(guest, "exec")
        # The sans-IO guest would refuse to do this, so write the frame by hand.
        await guest.send_raw(encode_frame(FrameKind.DATA, sid, b"\x01" + b"A" * (INITIAL_WINDOW + 1)))
        with pytest.raises(
            GuestProtocolError,
            match=f"stream {sid}: peer sent {INITIAL_WINDOW + 1} bytes with only {INITIAL_WINDOW} granted",
        ):
            await proc.wait()
        await shutdown(channel, guest)

    run(scenario)


def test_guest_data_beyond_window_across_frames_while_callback_is_slow():
    """Credit is only returned after the callback; extra bytes before that are a violation,
    reported at once even though the consumer is still blocked."""

    async def scenario():
        channel, guest = await boot()
        release = asyncio.Event()

        async def stuck(data: bytes) -> None:
            await release.wait()

        proc = GuestProcess(channel.open(exec_request()), stuck, None)
        waiter = asyncio.create_task(proc.wait())
        sid, _ = await accept(guest, "exec")
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
        await shutdown(channel, guest)

    run(scenario)


# --- files ------------------------------------------------------------------


class TrackingBytearray(bytearray):
    """Stands in for the read buffer in sandbox.files to observe its peak size."""

    instances: list["TrackingBytearray"] = []

    def __init__(self, *args):
        super().__init__(*args)
        self.peak = 0
        TrackingBytearray.instances.append(self)

    def extend(self, data) -> None:
        super().extend(data)
        self.peak = max(self.peak, len(self))


async def stream_out(guest: FakeGuest, sid: int, total: int, fill: bytes = b"r") -> tuple[int, StreamReset | None]:
    """Send up to `total` bytes on STDOUT honouring the host's window; stop at a RESET."""
    sent = 0
    while sent < total:
        window = guest.conn.send_window(sid)
        if window == 0:
            event = await guest.next_event(skip=())
            if isinstance(event, StreamReset):
                return sent, event
            continue
        n = min(window, DATA_CHUNK, total - sent)
        guest.conn.send_data(sid, STDOUT, fill * n)
        sent += n
        await guest.flush()
    return sent, None


def test_read_file_small():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.read_file(channel, "/etc/hostname"))
        sid, request = await accept(guest, "read_file")
        assert request == {"op": "read_file", "path": "/etc/hostname"}
        guest.conn.send_data(sid, STDOUT, b"sand")
        guest.conn.send_data(sid, STDOUT, b"box\n")
        guest.conn.send_message(sid, {"type": "result"})
        guest.conn.close_stream(sid)
        await guest.flush()
        assert await task == b"sandbox\n"
        await shutdown(channel, guest)

    run(scenario)


def test_read_file_of_exactly_the_limit_succeeds():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.read_file(channel, "/big"))
        sid, _ = await accept(guest, "read_file")
        sent, reset = await stream_out(guest, sid, msgs.READ_FILE_LIMIT)
        assert reset is None and sent == msgs.READ_FILE_LIMIT
        guest.conn.send_message(sid, {"type": "result"})
        guest.conn.close_stream(sid)
        await guest.flush()
        content = await task
        assert len(content) == msgs.READ_FILE_LIMIT
        await shutdown(channel, guest)

    run(scenario, timeout=60)


def test_read_file_over_16_mib_is_cut_off_with_bounded_memory(monkeypatch):
    monkeypatch.setattr(files, "bytearray", TrackingBytearray, raising=False)
    TrackingBytearray.instances.clear()

    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.read_file(channel, "/dev/zero"))
        sid, _ = await accept(guest, "read_file")
        sent, reset = await stream_out(guest, sid, 64 * 1024 * 1024)
        with pytest.raises(GuestProtocolError, match=f"the guest sent more than {msgs.READ_FILE_LIMIT} bytes"):
            await task
        assert reset is not None and reset.reason == "read_file limit exceeded"
        # The guest could only ever send what the host granted.
        assert msgs.READ_FILE_LIMIT < sent <= msgs.READ_FILE_LIMIT + INITIAL_WINDOW + DATA_CHUNK
        assert not channel.conn.is_open(sid)
        # Late data for the reset stream is dropped; the channel still works.
        await guest.send_raw(encode_frame(FrameKind.DATA, sid, b"\x01late"))
        listing = asyncio.create_task(files.list_files(channel, "/"))
        sid2, _ = await accept(guest, "list_files")
        guest.conn.send_message(sid2, {"type": "result", "files": []})
        guest.conn.close_stream(sid2)
        await guest.flush()
        assert await listing == []
        await shutdown(channel, guest)

    run(scenario, timeout=60)
    [buffer] = TrackingBytearray.instances
    assert msgs.READ_FILE_LIMIT < buffer.peak < 17 * 1024 * 1024


def test_read_file_error_reply():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.read_file(channel, "/nope"))
        sid, _ = await accept(guest, "read_file")
        guest.conn.send_message(sid, {"type": "error", "message": "cannot read /nope: No such file", "errno": 2})
        guest.conn.close_stream(sid)
        await guest.flush()
        with pytest.raises(FileOperationError, match="cannot read /nope: No such file"):
            await task
        await shutdown(channel, guest)

    run(scenario)


@pytest.mark.parametrize(
    "actions, match",
    [
        (["stderr"], "the guest sent unexpected data on a file stream"),
        (["result", "result"], "the guest sent two replies on a file stream"),
        ([], "the guest closed a file stream without a reply"),
        (["weird"], "unexpected file reply 'weird'"),
    ],
)
def test_read_file_protocol_violations(actions, match):
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.read_file(channel, "/x"))
        sid, _ = await accept(guest, "read_file")
        for action in actions:
            if action == "stderr":
                guest.conn.send_data(sid, STDERR, b"oops")
            else:
                guest.conn.send_message(sid, {"type": action})
        guest.conn.close_stream(sid)
        await guest.flush()
        with pytest.raises(GuestProtocolError, match=match):
            await task
        await shutdown(channel, guest)

    run(scenario)


def test_read_file_rejects_relative_path_before_sending():
    async def scenario():
        channel, guest = await boot()
        with pytest.raises(ValueError, match="'path' must be an absolute path"):
            await files.read_file(channel, "etc/passwd")
        assert channel.conn.open_streams == []
        await shutdown(channel, guest)

    run(scenario)


def test_write_file_1mib_with_slow_window_grants():
    content = bytes(range(256)) * 4096  # 1 MiB
    assert len(content) == 1 << 20

    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.write_file(channel, "/data/blob", content, 0o600))
        sid, request = await accept(guest, "write_file")
        assert request == {"op": "write_file", "path": "/data/blob", "mode": 0o600}
        received = bytearray()
        unconsumed = 0
        stalls = 0
        while True:
            event = await guest.next_event()
            if isinstance(event, DataReceived):
                assert event.channel == STDIN
                received += event.data
                unconsumed += len(event.data)
                # (the guest's own Connection would raise if the host overran the window)
                if unconsumed < INITIAL_WINDOW and len(received) < len(content):
                    continue
                # The host used up all its credit and must now be waiting.
                stalls += 1
                await asyncio.sleep(0.01)
                assert channel.conn.send_window(sid) == 0
                assert not task.done()
                # Grant credit back slowly, in small pieces.
                while unconsumed:
                    await asyncio.sleep(0.001)
                    step = min(unconsumed, 16 * 1024)
                    guest.conn.consumed(sid, step)
                    unconsumed -= step
                    await guest.flush()
            elif isinstance(event, ChannelEnded):
                assert event.channel == STDIN
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        assert bytes(received) == content
        assert stalls == len(content) // INITIAL_WINDOW
        guest.conn.send_message(sid, {"type": "result"})
        guest.conn.close_stream(sid)
        await guest.flush()
        assert await task is None
        assert await guest.next_event() == StreamClosed(sid)
        await shutdown(channel, guest)

    run(scenario, timeout=60)


def test_write_file_that_never_gets_window_fails_when_guest_resets():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.write_file(channel, "/full", b"z" * (INITIAL_WINDOW * 2)))
        sid, _ = await accept(guest, "write_file")
        got = 0
        while got < INITIAL_WINDOW:
            event = await guest.next_event()
            got += len(event.data)
        await asyncio.sleep(0.02)
        assert not task.done()  # blocked on window
        guest.conn.reset_stream(sid, "No space left on device")
        await guest.flush()
        with pytest.raises(FileOperationError, match="the guest aborted the file operation: No space left"):
            await task
        await shutdown(channel, guest)

    run(scenario)


def test_write_file_blocked_on_window_fails_when_channel_breaks():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.write_file(channel, "/f", b"z" * (INITIAL_WINDOW + 1)))
        await accept(guest, "write_file")
        await asyncio.sleep(0.02)
        assert not task.done()
        await guest.send_raw(b"\xff" * 16)
        with pytest.raises(GuestProtocolError, match="unknown frame kind 255"):
            await task
        await shutdown(channel, guest)

    run(scenario)


def test_write_file_guest_replies_and_closes_without_granting_window():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.write_file(channel, "/full", b"z" * (INITIAL_WINDOW * 2)))
        sid, _ = await accept(guest, "write_file")
        got = 0
        while got < INITIAL_WINDOW:
            got += len((await guest.next_event()).data)
        guest.conn.send_message(sid, {"type": "error", "message": "cannot write /full: No space left on device"})
        guest.conn.close_stream(sid)
        await guest.flush()
        try:
            with pytest.raises(FileOperationError, match="No space left on device"):
                await asyncio.wait_for(task, 3)
        finally:
            await shutdown(channel, guest)

    run(scenario)


def test_write_file_guest_flooding_replies_while_host_waits_for_window():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.write_file(channel, "/x", b"z" * (INITIAL_WINDOW * 2)))
        sid, _ = await accept(guest, "write_file")
        reply = {"type": "result", "pad": "p" * 500_000}
        try:
            for _ in range(40):  # 20 MB of replies nobody asked for
                guest.conn.send_message(sid, reply)
                try:
                    await guest.flush()
                except ConnectionError:
                    break  # the host hung up on the flood, as it should
            with pytest.raises(GuestProtocolError):
                await asyncio.wait_for(task, 3)
        finally:
            await shutdown(channel, guest)

    run(scenario)


def test_write_file_error_reply():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.write_file(channel, "/ro/x", b"abc"))
        sid, _ = await accept(guest, "write_file")
        assert await guest.next_event() == DataReceived(sid, STDIN, b"abc")
        assert await guest.next_event() == ChannelEnded(sid, STDIN)
        guest.conn.send_message(sid, {"type": "error", "message": "cannot write /ro/x: Read-only file system"})
        guest.conn.close_stream(sid)
        await guest.flush()
        with pytest.raises(FileOperationError, match="Read-only file system"):
            await task
        await shutdown(channel, guest)

    run(scenario)


def test_list_files_valid():
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.list_files(channel, "/etc"))
        sid, request = await accept(guest, "list_files")
        assert request == {"op": "list_files", "path": "/etc"}
        entries = [
            {"name": "hosts", "size": 120, "mode": 0o100644, "is_dir": False},
            {"name": "ssl", "size": 4096, "mode": 0o40755, "is_dir": True},
        ]
        guest.conn.send_message(sid, {"type": "result", "files": entries})
        guest.conn.close_stream(sid)
        await guest.flush()
        assert await task == [
            msgs.FileInfo("hosts", 120, 0o100644, False),
            msgs.FileInfo("ssl", 4096, 0o40755, True),
        ]
        await shutdown(channel, guest)

    run(scenario)


@pytest.mark.parametrize(
    "reply_files, match",
    [
        ([{"name": "..", "size": 0, "mode": 0, "is_dir": True}], r"invalid file name '\.\.'"),
        ([{"name": "a/b", "size": 0, "mode": 0, "is_dir": False}], r"invalid file name 'a/b'"),
        (["passwd"], r"file entries must be objects"),
        ([{"name": "x", "size": -5, "mode": 0, "is_dir": False}], r"'size' = -5 is outside"),
        ([{"name": "x", "size": 1, "mode": 0, "is_dir": "no"}], r"'is_dir' must be a boolean"),
        ("not a list", r"'files' must be a list"),
        (None, r"'files' must be a list"),
    ],
)
def test_list_files_malformed_entries(reply_files, match):
    async def scenario():
        channel, guest = await boot()
        task = asyncio.create_task(files.list_files(channel, "/"))
        sid, _ = await accept(guest, "list_files")
        guest.conn.send_message(sid, {"type": "result", "files": reply_files})
        guest.conn.close_stream(sid)
        await guest.flush()
        with pytest.raises(GuestProtocolError, match=f"malformed file list from the guest: {match}"):
            await task
        await shutdown(channel, guest)

    run(scenario)


def test_operations_run_concurrently_on_separate_streams():
    async def scenario():
        channel, guest = await boot()
        read = asyncio.create_task(files.read_file(channel, "/a"))
        listing = asyncio.create_task(files.list_files(channel, "/b"))
        sid_read, _ = await accept(guest, "read_file")
        sid_list, _ = await accept(guest, "list_files")
        assert (sid_read, sid_list) == (1, 3)
        # Answer in the opposite order.
        guest.conn.send_message(sid_list, {"type": "result", "files": []})
        guest.conn.close_stream(sid_list)
        guest.conn.send_data(sid_read, STDOUT, b"A")
        await guest.flush()
        assert await listing == []
        assert not read.done()
        guest.conn.send_message(sid_read, {"type": "result"})
        guest.conn.close_stream(sid_read)
        await guest.flush()
        assert await read == b"A"
        await shutdown(channel, guest)

    run(scenario)
