"""An exec's namespace init and command, forked from the agent (guest/process.py), and their timing stamps.

Run on the host as root, privileged (no /dev or /proc confinement, which needs the guest's mounts):
what is checked here is the start and the stamps, not the confinement (tests/vm/test_guest_hardening.py).
"""

from __future__ import annotations

import os
import signal

import pytest

from matchlock.guest import process, timing
from matchlock.wire.agent import ExecRequest
from matchlock.wire.replies import MAX_STAMPS, Exited


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, True)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data


def _finish(proc: process.Spawned) -> tuple[int, bytes, bytes, bytes]:
    error = _read_all(proc.error_pipe)
    out = _read_all(proc.stdout)
    err = _read_all(proc.stderr) if proc.stderr is not None else b""
    _, status = os.waitpid(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), out, err, error


@pytest.fixture(autouse=True)
def _untraced_with_default_sigchld(monkeypatch):
    monkeypatch.setattr(timing, "stamps", None)  # untraced, as every exec but a traced sandbox's first
    # spawn() resets SIGCHLD in its children only; the parent here waits for them itself.
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGCHLD, previous)


@pytest.mark.timeout(60)  # a hang detector, not a performance assertion
def test_the_command_runs_as_pid_2_of_its_namespace() -> None:
    request = ExecRequest(command='echo "$X" $$; echo oops >&2; exit 3', env={"X": "from the host"}, cwd="/tmp")
    proc = process.spawn(request, privileged=True)
    assert proc.stamps_pipe == -1  # not traced: no pipe at all
    # PID 1 is the namespace init, so the shell is PID 2 in its new PID namespace.
    assert _finish(proc) == (3, b"from the host 2\n", b"oops\n", b"")


@pytest.mark.timeout(60)
def test_traced_children_stamp_their_steps_up_to_the_exec(monkeypatch) -> None:
    monkeypatch.setattr(timing, "stamps", [])  # the agent's first exec under MATCHLOCK_DEBUG_TIMING
    proc = process.spawn(ExecRequest(command="true"), privileged=True)
    assert _finish(proc)[0] == 0
    stamps = process.take_child_stamps(proc)
    labels = [label for label, _ in stamps]
    assert labels == ["ns init: mounts done", "command: forked", "command: user resolved", "command: execve"]
    assert [at for _, at in stamps] == sorted(at for _, at in stamps)
    assert proc.stamps_pipe == -1 and process.take_child_stamps(proc) == []


@pytest.mark.timeout(60)
def test_a_command_that_cannot_start_sends_no_stamps_after_its_error(monkeypatch) -> None:
    monkeypatch.setattr(timing, "stamps", [])
    proc = process.spawn(ExecRequest(command="true", cwd="/no/such/dir"), privileged=True)
    code, _, _, error = _finish(proc)
    assert code == process.EXEC_FAILED
    assert b"cannot use working directory /no/such/dir" in error
    assert "command: execve" not in [label for label, _ in process.take_child_stamps(proc)]


def test_the_agent_merges_its_childrens_stamps_in_time_order(monkeypatch) -> None:
    monkeypatch.setattr(timing, "stamps", [("exec request", 1.0), ("exec forked", 5.0)])
    timing.add([("command: forked", 3.0)])
    assert [label for label, _ in timing.take(last=True)] == ["exec request", "command: forked", "exec forked"]
    timing.add([("late", 9.0)])  # after the last take: nobody reads them
    assert timing.stamps is None


def test_the_stamps_stay_within_the_hosts_bound_however_many_execs_add_theirs(monkeypatch) -> None:
    monkeypatch.setattr(timing, "stamps", [])
    for n in range(MAX_STAMPS):  # execs started before the first exit status: each stamps and adds
        timing.stamp("exec request")
        timing.add([("command: forked", float(n))])
    timing.stamp("exit sent")
    taken = tuple(timing.take(last=True))
    assert len(taken) == MAX_STAMPS
    assert Exited.parse(Exited(0, None, taken).to_wire()).stamps == taken  # the host takes it


@pytest.mark.timeout(60)
@pytest.mark.parametrize("traced", [False, True])
def test_the_command_holds_only_its_standard_descriptors(monkeypatch, traced: bool) -> None:
    # Not the error pipe, nor (traced) the stamps pipe: the user's command could keep them open.
    monkeypatch.setattr(timing, "stamps", [] if traced else None)
    proc = process.spawn(ExecRequest(command="ls /proc/$$/fd; exit 0"), privileged=True)
    assert (proc.stamps_pipe >= 0) is traced
    assert _finish(proc)[:2] == (0, b"0\n1\n2\n")
    process.take_child_stamps(proc)
