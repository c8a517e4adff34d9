"""The guest's timing stamps and the host's `debug_timing` switch are typed fields of the wire records."""

from __future__ import annotations

import asyncio

import pytest
from fake_guest import accept

from matchlock.sandbox.process import GuestProcess
from matchlock.util import trace
from matchlock.wire.agent import ExecRequest, GuestConfig
from matchlock.wire.boot import DEBUG_TIMING_FLAG
from matchlock.wire.mux import STDERR, STDOUT, StreamClosed
from matchlock.wire.replies import MAX_STAMPS, Exited, Ready

BASE = {"hostname": "box", "time_ns": 1}


def test_stamps_travel_on_exit_and_ready_and_are_absent_otherwise() -> None:
    stamps = (("exec request", 10.0), ("exit sent", 12.5))
    for record in (Exited(0, None, stamps), Ready(5, "", stamps)):
        wire = record.to_wire()
        assert wire["stamps"] == [["exec request", 10.0], ["exit sent", 12.5]]
        assert type(record).parse(wire) == record
    assert "stamps" not in Exited(0).to_wire() and "stamps" not in Ready(5).to_wire()
    assert Exited.parse({"code": 1}).stamps is None
    assert Exited.parse(Exited(0, None, ()).to_wire()).stamps is None  # none taken: the field is left out


def test_stamps_are_bounded() -> None:
    Exited.parse({"code": 0, "stamps": [["a", 1]] * MAX_STAMPS})
    with pytest.raises(ValueError, match="entry 1 is not"):
        Exited.parse({"code": 0, "stamps": [["a", 1], ["b", 10**4000]]})  # never turned into text


def test_debug_timing_is_parsed_and_sent_only_when_asked() -> None:
    assert GuestConfig.parse(BASE).debug_timing is False
    config = GuestConfig.parse({**BASE, DEBUG_TIMING_FLAG: True})
    assert config.debug_timing is True
    assert config.to_wire()[DEBUG_TIMING_FLAG] is True
    assert DEBUG_TIMING_FLAG not in GuestConfig.parse(BASE).to_wire()
    with pytest.raises(ValueError, match="'debug_timing' must be a boolean"):
        GuestConfig.parse({**BASE, DEBUG_TIMING_FLAG: "yes"})


@pytest.mark.timeout(60)  # a hang detector, not a performance assertion
async def test_the_host_prints_the_stamps_of_one_exit_status_only(monkeypatch, capsys, booted) -> None:
    monkeypatch.setattr(trace, "ENABLED", True)
    channel, guest = booted
    stamps = [["exec request", 10], ["exit sent", 12]]
    for _ in range(3):  # a hostile guest sends them with every exit status
        proc = GuestProcess(channel.open(ExecRequest("true").to_wire()), lambda data: None, lambda data: None)
        async with asyncio.TaskGroup() as tasks:
            waiter = tasks.create_task(proc.wait())
            sid, _ = await accept(guest, "exec")
            guest.conn.send_message(sid, {"type": "started", "pid": 7})
            guest.conn.end_channel(sid, STDOUT)
            guest.conn.end_channel(sid, STDERR)
            await guest.reply_and_close(sid, {"type": "exit", "code": 0, "stamps": stamps})
        assert waiter.result().exit_code == 0
        assert await guest.next_event() == StreamClosed(sid)
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[timing]   guest")]
    assert [line.split()[-2:] for line in printed] == [["exec", "request"], ["exit", "sent"]]
