"""A detached owner's ready pipe (cli/owner.py): a caller gone before the VM ID cancels the start."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from matchlock.cli import owner


@pytest.fixture
def ready_pipe(monkeypatch) -> tuple[owner.ReadyPipe, int]:
    read_end, write_end = os.pipe()
    monkeypatch.setenv(owner.READY_FD_ENV, str(write_end))
    pipe = owner.ReadyPipe()
    assert owner.READY_FD_ENV not in os.environ  # the sandbox's own children never see it
    yield pipe, read_end
    pipe.close()
    with contextlib.suppress(OSError):
        os.close(read_end)


def test_the_start_is_cancelled_when_the_caller_closes_its_end(ready_pipe) -> None:
    pipe, read_end = ready_pipe

    async def start() -> str:
        task = asyncio.current_task()
        assert task is not None
        pipe.watch(task)
        asyncio.get_running_loop().call_later(0.05, os.close, read_end)  # the caller dies
        try:
            await asyncio.sleep(60)  # a boot that would take long
        except asyncio.CancelledError:
            return "cancelled"
        return "finished"

    assert asyncio.run(start()) == "cancelled"
    assert pipe.abandoned


def test_an_announced_start_stops_watching_and_the_caller_reads_the_id(ready_pipe, tmp_path) -> None:
    pipe, read_end = ready_pipe
    log = tmp_path / "vm.log"
    log.touch()
    saved_stderr = os.dup(2)

    async def start() -> None:
        task = asyncio.current_task()
        assert task is not None
        pipe.watch(task)
        pipe.announce("vm-0123abcd", log)
        await asyncio.sleep(0.05)  # the watch is gone with the descriptor: nothing cancels us now

    try:
        asyncio.run(start())
        os.write(2, b"after\n")  # stderr now goes to the console log
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    assert os.read(read_end, 100) == b"vm-0123abcd\n"
    assert os.read(read_end, 100) == b""  # and the owner's end is closed
    assert not pipe.abandoned
    assert log.read_bytes() == b"after\n"
