"""`wait_forwarding`: stdin is forwarded while the command runs, and never outlives it."""

from __future__ import annotations

import asyncio

import pytest

from matchlock.api.errors import VMError
from matchlock.cli.terminal import wait_forwarding
from matchlock.sandbox.process import ExecResult

RESULT = ExecResult(exit_code=3, duration_ms=1)


class FakeProcess:
    """The part of GuestProcess that the terminal uses; `exit` ends `wait()`."""

    def __init__(self, *, refuse_input: bool = False, failure: Exception | None = None) -> None:
        self.received: list[bytes] = []
        self.stdin_closed = False
        self.exit = asyncio.Event()
        self._refuse_input = refuse_input
        self._failure = failure

    async def write(self, data: bytes) -> None:
        if self._refuse_input:
            raise VMError("the guest ended this operation before taking all its input")
        self.received.append(data)

    def close_stdin(self) -> None:
        self.stdin_closed = True
        self.exit.set()

    async def wait(self) -> ExecResult:
        await self.exit.wait()
        if self._failure is not None:
            raise self._failure
        return RESULT


async def test_input_is_forwarded_until_eof():
    process, stdin = FakeProcess(), asyncio.Queue()
    for chunk in (b"one", b"two", b""):
        stdin.put_nowait(chunk)
    assert await wait_forwarding(process, stdin) is RESULT
    assert process.received == [b"one", b"two"] and process.stdin_closed


async def test_the_feeder_stops_when_the_command_exits():
    process, stdin = FakeProcess(), asyncio.Queue()
    async with asyncio.TaskGroup() as tasks:
        waiting = tasks.create_task(wait_forwarding(process, stdin))
        await stdin.put(b"data")
        while not process.received:
            await asyncio.sleep(0)
        process.exit.set()  # exits with stdin still open: the feeder is blocked on an empty queue
    assert waiting.result() is RESULT
    assert not process.stdin_closed


async def test_refused_input_does_not_hide_the_result():
    process, stdin = FakeProcess(refuse_input=True), asyncio.Queue()
    stdin.put_nowait(b"ignored")
    process.exit.set()
    assert await wait_forwarding(process, stdin) is RESULT


async def test_a_failed_wait_raises_its_own_error():
    process, stdin = FakeProcess(failure=VMError("guest died")), asyncio.Queue()
    process.exit.set()
    with pytest.raises(VMError, match="guest died"):
        await wait_forwarding(process, stdin)
