"""The host end of the file operations (read/write/list) against a hand-driven fake guest,
including flow control on file streams. The fake guest is in fake_guest.py.
"""

from __future__ import annotations

import asyncio

import pytest
from fake_guest import FakeGuest, accept

from matchlock.api.errors import FileOperationError, GuestProtocolError
from matchlock.sandbox import files
from matchlock.wire import agent as msgs
from matchlock.wire.frames import FrameKind, encode_frame
from matchlock.wire.mux import (
    DATA_CHUNK,
    INITIAL_WINDOW,
    STDERR,
    STDIN,
    STDOUT,
    ChannelEnded,
    DataReceived,
    StreamClosed,
    StreamReset,
)

pytestmark = pytest.mark.timeout(120)  # a hang detector, not a performance assertion


# --- files ------------------------------------------------------------------


class TrackingBytearray(bytearray):
    """Stands in for the read buffer in sandbox.files to observe its peak size."""

    instances: list[TrackingBytearray] = []

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


async def test_read_file_small(booted):
    channel, guest = booted
    task = asyncio.create_task(files.read_file(channel, "/etc/hostname"))
    sid, request = await accept(guest, "read_file")
    assert request == {"op": "read_file", "path": "/etc/hostname"}
    guest.conn.send_data(sid, STDOUT, b"sand")
    guest.conn.send_data(sid, STDOUT, b"box\n")
    await guest.reply_and_close(sid, {"type": "result"})
    assert await task == b"sandbox\n"


async def test_read_file_of_exactly_the_limit_succeeds(booted):
    channel, guest = booted
    task = asyncio.create_task(files.read_file(channel, "/big"))
    sid, _ = await accept(guest, "read_file")
    sent, reset = await stream_out(guest, sid, msgs.READ_FILE_LIMIT)
    assert reset is None and sent == msgs.READ_FILE_LIMIT
    await guest.reply_and_close(sid, {"type": "result"})
    content = await task
    assert len(content) == msgs.READ_FILE_LIMIT


async def test_read_file_over_16_mib_is_cut_off_with_bounded_memory(monkeypatch, booted):
    monkeypatch.setattr(files, "bytearray", TrackingBytearray, raising=False)
    TrackingBytearray.instances.clear()
    channel, guest = booted
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
    [buffer] = TrackingBytearray.instances
    assert msgs.READ_FILE_LIMIT < buffer.peak < 17 * 1024 * 1024


async def test_read_file_error_reply(booted):
    channel, guest = booted
    task = asyncio.create_task(files.read_file(channel, "/nope"))
    sid, _ = await accept(guest, "read_file")
    await guest.reply_and_close(sid, {"type": "error", "message": "cannot read /nope: No such file", "errno": 2})
    with pytest.raises(FileOperationError, match="cannot read /nope: No such file"):
        await task


@pytest.mark.parametrize(
    "actions, match",
    [
        (["stderr"], "the guest sent stderr data on a file stream before its reply"),
        (["result", "result"], "the guest sent 'result' on a file stream after its reply"),
        ([], "the guest closed a file stream without a reply"),
        (["weird"], "the guest sent 'weird' on a file stream before its reply"),
    ],
)
async def test_read_file_protocol_violations(actions, match, booted):
    channel, guest = booted
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


async def test_read_file_rejects_relative_path_before_sending(booted):
    channel, guest = booted
    with pytest.raises(ValueError, match="'path' must be an absolute path"):
        await files.read_file(channel, "etc/passwd")
    assert channel.conn.open_streams == []


async def test_write_file_1mib_with_slow_window_grants(booted):
    content = bytes(range(256)) * 4096  # 1 MiB
    assert len(content) == 1 << 20
    channel, guest = booted
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
    await guest.reply_and_close(sid, {"type": "result"})
    assert await task is None
    assert await guest.next_event() == StreamClosed(sid)


async def test_write_file_that_never_gets_window_fails_when_guest_resets(booted):
    channel, guest = booted
    task = asyncio.create_task(files.write_file(channel, "/full", b"z" * (INITIAL_WINDOW * 2)))
    sid, _ = await accept(guest, "write_file")
    got = 0
    while got < INITIAL_WINDOW:
        event = await guest.next_event()
        got += len(event.data)
    # The guest holds all the credit it granted: the host can send nothing more until it gets a WINDOW.
    assert got == INITIAL_WINDOW and channel.conn.send_window(sid) == 0
    assert not task.done()
    guest.conn.reset_stream(sid, "No space left on device")
    await guest.flush()
    with pytest.raises(FileOperationError, match="the guest aborted the file operation: No space left"):
        await task


async def test_write_file_blocked_on_window_fails_when_channel_breaks(booted):
    channel, guest = booted
    task = asyncio.create_task(files.write_file(channel, "/f", b"z" * (INITIAL_WINDOW + 1)))
    sid, _ = await accept(guest, "write_file")
    got = 0
    while got < INITIAL_WINDOW:  # the host sends what it may, then must wait for credit
        got += len((await guest.next_event()).data)
    assert channel.conn.send_window(sid) == 0 and not task.done()
    await guest.send_raw(b"\xff" * 16)
    with pytest.raises(GuestProtocolError, match="unknown frame kind 255"):
        await task


async def test_write_file_guest_replies_and_closes_without_granting_window(booted):
    channel, guest = booted
    task = asyncio.create_task(files.write_file(channel, "/full", b"z" * (INITIAL_WINDOW * 2)))
    sid, _ = await accept(guest, "write_file")
    got = 0
    while got < INITIAL_WINDOW:
        got += len((await guest.next_event()).data)
    await guest.reply_and_close(sid, {"type": "error", "message": "cannot write /full: No space left on device"})
    with pytest.raises(FileOperationError, match="No space left on device"):
        await task


async def test_write_file_guest_flooding_replies_while_host_waits_for_window(booted):
    channel, guest = booted
    task = asyncio.create_task(files.write_file(channel, "/x", b"z" * (INITIAL_WINDOW * 2)))
    sid, _ = await accept(guest, "write_file")
    reply = {"type": "result", "pad": "p" * 500_000}
    for _ in range(40):  # 20 MB of replies nobody asked for
        guest.conn.send_message(sid, reply)
        try:
            await guest.flush()
        except ConnectionError:
            break  # the host hung up on the flood, as it should
    with pytest.raises(GuestProtocolError, match="flooded stream"):
        await task


async def test_write_file_error_reply(booted):
    channel, guest = booted
    task = asyncio.create_task(files.write_file(channel, "/ro/x", b"abc"))
    sid, _ = await accept(guest, "write_file")
    assert await guest.next_event() == DataReceived(sid, STDIN, b"abc")
    assert await guest.next_event() == ChannelEnded(sid, STDIN)
    await guest.reply_and_close(sid, {"type": "error", "message": "cannot write /ro/x: Read-only file system"})
    with pytest.raises(FileOperationError, match="Read-only file system"):
        await task


async def test_list_files_valid(booted):
    channel, guest = booted
    task = asyncio.create_task(files.list_files(channel, "/etc"))
    sid, request = await accept(guest, "list_files")
    assert request == {"op": "list_files", "path": "/etc"}
    entries = [
        {"name": "hosts", "size": 120, "mode": 0o100644, "is_dir": False},
        {"name": "ssl", "size": 4096, "mode": 0o40755, "is_dir": True},
    ]
    await guest.reply_and_close(sid, {"type": "result", "files": entries})
    assert await task == [
        msgs.FileInfo("hosts", 120, 0o100644, False),
        msgs.FileInfo("ssl", 4096, 0o40755, True),
    ]


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
async def test_list_files_malformed_entries(reply_files, match, booted):
    channel, guest = booted
    task = asyncio.create_task(files.list_files(channel, "/"))
    sid, _ = await accept(guest, "list_files")
    await guest.reply_and_close(sid, {"type": "result", "files": reply_files})
    with pytest.raises(GuestProtocolError, match=f"malformed 'result' reply from the guest: {match}"):
        await task


async def test_operations_run_concurrently_on_separate_streams(booted):
    channel, guest = booted
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
