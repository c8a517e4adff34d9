"""Pieces of the rpc server in-process: Go file modes, exec input ordering, the stdout writer."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from typing import cast

import pytest

from matchlock.api.errors import ExecError
from matchlock.jsonrpc import Request, Response
from matchlock.rpc import methods
from matchlock.rpc.methods import ExecInput, go_file_mode
from matchlock.rpc.transport import StdinReader, StdoutWriter
from matchlock.sandbox.process import GuestProcess


@pytest.mark.parametrize(
    ("st_mode", "go_mode"),
    [
        (stat.S_IFREG | 0o644, 0o644),
        (stat.S_IFDIR | 0o755, (1 << 31) | 0o755),
        (stat.S_IFLNK | 0o777, (1 << 27) | 0o777),
        (stat.S_IFCHR | 0o620, (1 << 26) | (1 << 21) | 0o620),
        (stat.S_IFBLK | 0o660, (1 << 26) | 0o660),
        (stat.S_IFIFO | 0o600, (1 << 25) | 0o600),
        (stat.S_IFSOCK | 0o755, (1 << 24) | 0o755),
        (stat.S_IFREG | stat.S_ISUID | 0o755, (1 << 23) | 0o755),
        (stat.S_IFREG | stat.S_ISGID | 0o755, (1 << 22) | 0o755),
        (stat.S_IFDIR | stat.S_ISVTX | 0o777, (1 << 31) | (1 << 20) | 0o777),
    ],
)
def test_go_file_mode(st_mode: int, go_mode: int) -> None:
    assert go_file_mode(st_mode) == go_mode


class FakeProcess:
    def __init__(self, fail_after: int | None = None) -> None:
        self.events: list[object] = []
        self.fail_after = fail_after

    async def write(self, data: bytes) -> None:
        if self.fail_after is not None and len(self.events) >= self.fail_after:
            raise ExecError("the command exited")
        await asyncio.sleep(0)
        self.events.append(data)

    def close_stdin(self) -> None:
        self.events.append("eof")

    def resize(self, rows: int, cols: int) -> None:
        self.events.append((rows, cols))


async def test_exec_input_keeps_order_and_ends_at_eof() -> None:
    process = FakeProcess()
    stdin = ExecInput(cast(GuestProcess, process), tty=True)
    for chunk in (b"a", b"b", None, b"ignored"):
        await stdin.put(chunk)
    stdin.resize(30, 100)
    await asyncio.wait_for(stdin.pump(), 5)
    assert process.events == [(30, 100), b"a", b"b", "eof"]
    assert stdin.input_done and not stdin.closed
    stdin.resize(40, 120)  # after EOF (the SDK's order when it has no stdin), resizes still apply
    stdin.close()
    stdin.resize(50, 132)  # the exec ended: dropped
    assert process.events[-1] == (40, 120)


async def test_exec_input_survives_a_command_that_exits_first() -> None:
    process = FakeProcess(fail_after=1)
    stdin = ExecInput(cast(GuestProcess, process), tty=False)
    await stdin.put(b"1")
    await stdin.put(b"2")
    await asyncio.wait_for(stdin.pump(), 5)
    assert process.events == [b"1"] and stdin.input_done
    await stdin.put(b"3")  # the command took no more input: dropped, never blocks


async def test_exec_input_applies_backpressure(monkeypatch) -> None:
    monkeypatch.setattr(methods, "STDIN_BUFFER_LIMIT", 4)
    process = FakeProcess()
    stdin = ExecInput(cast(GuestProcess, process), tty=False)
    await stdin.put(b"12345")  # over the limit now: the next put waits for the pump
    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        blocked = group.create_task(stdin.put(b"6"))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        pump = group.create_task(stdin.pump())
        await blocked
        await stdin.put(None)
        await pump
    assert process.events == [b"12345", b"6", "eof"]


async def test_writer_keeps_order_and_waits_above_high_water() -> None:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    writer = StdoutWriter(write_fd, loop, high_water=1024)
    writer.start()
    try:
        writer.send_nowait(Response(1, {"pad": "x" * 200_000}))  # more than the pipe holds: stays queued
        async with asyncio.timeout(5), asyncio.TaskGroup() as group:
            sending = group.create_task(writer.send(Request("exec_stream.stdout", {"id": 1, "data": ""})))
            await asyncio.sleep(0.05)
            assert not sending.done()
            received = b""
            while received.count(b"\n") < 2:
                received += await asyncio.to_thread(os.read, read_fd, 1 << 16)
        await writer.flush(5)
        first, second = (json.loads(line) for line in received.splitlines())
        assert first["id"] == 1 and second["method"] == "exec_stream.stdout" and "id" not in second
    finally:
        writer.close()
        os.close(read_fd)
        os.close(write_fd)


async def test_writer_reports_a_broken_pipe() -> None:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    writer = StdoutWriter(write_fd, loop)
    writer.start()
    try:
        writer.send_nowait(Response(1, {}))
        await asyncio.wait_for(writer.broken.wait(), 5)
        await writer.send(Response(2, {}))  # dropped, never blocks
        await writer.flush(5)
    finally:
        writer.close()
        os.close(write_fd)


async def test_reader_returns_chunks_then_eof() -> None:
    read_fd, write_fd = os.pipe()
    reader = StdinReader(read_fd, asyncio.get_running_loop())
    reader.start()
    os.write(write_fd, b"hello\n")
    os.close(write_fd)
    data = b""
    while chunk := await asyncio.wait_for(reader.read(), 5):
        data += chunk
    assert data == b"hello\n"
    os.close(read_fd)


def test_the_reader_thread_ends_quietly_when_the_server_is_gone(monkeypatch) -> None:
    # `matchlock rpc` ends (after `close`) while its reader thread still has input for it: the thread
    # used to die with a traceback on stderr (its queued put was cancelled with the loop).
    import threading

    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    read_fd, write_fd = os.pipe()
    reader: list[StdinReader] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader.append(StdinReader(read_fd, loop))
        reader[0].start()
        for _ in range(6):  # more chunks than it reads ahead; the server reads none of them
            os.write(write_fd, b'{"jsonrpc":"2.0","method":"snapshot_list","id":1}\n')
            for _ in range(100):  # a chunk at a time: let the thread take each before the next
                await asyncio.sleep(0.001)

    asyncio.run(main())
    os.close(write_fd)  # a thread still in its read gets EOF
    reader[0]._thread.join()  # it returns once it sees the loop is gone
    os.close(read_fd)
    assert died == []


@pytest.mark.parametrize(
    ("params", "graceful", "error"),
    [
        ({"timeout_seconds": 2.0}, 1.0, False),
        ({"timeout_seconds": 0}, 0.0, False),
        ({}, 0.0, False),
        ({"timeout_seconds": "2"}, 0.0, True),
        ({"timeout_seconds": -1}, 0.0, True),
        ({"timeout_seconds": True}, 0.0, True),
    ],
)
def test_close_params(params: dict, graceful: float, error: bool) -> None:
    from matchlock.rpc.server import _close_params

    value, answer = _close_params(Request("close", params, 3))
    assert value == graceful
    assert (answer is not None) == error
    if answer is not None:
        assert answer.code == -32602 and "timeout_seconds" in answer.message
