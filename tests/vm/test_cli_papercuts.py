"""What a newcomer hits with the real CLI: Ctrl-C, closed pipes (issue 10, items 11 and 12)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from support.cli import MATCHLOCK, run_matchlock
from support.ports import free_port

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


ECHO_PORT = free_port()


@pytest.fixture(scope="module")
def vm(vm_prerequisites, module_state_dir):
    """One detached sandbox shared by this module: an echo server published in Docker's ADDRESS:LOCAL:REMOTE form."""
    started = run_matchlock(
        "run", "-d", "-p", f"127.0.0.1:{ECHO_PORT}:8080", "--", "nc", "-ll", "-p", "8080", "-e", "/bin/cat"
    )
    assert started.returncode == 0, started
    vm_id = started.stdout.strip()
    yield vm_id
    run_matchlock("kill", vm_id)
    run_matchlock("rm", "-f", vm_id)


def test_docker_publish_form_forwards(vm):
    """Issue 10, item 19: `-p 127.0.0.1:LOCAL:REMOTE` is accepted and listens on that address."""
    deadline = time.monotonic() + 30  # until the guest's server listens
    echoed = b""
    while echoed != b"ping\n" and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ECHO_PORT), timeout=10) as sock:
            sock.sendall(b"ping\n")
            sock.shutdown(socket.SHUT_WR)
            echoed = b"".join(iter(lambda: sock.recv(4096), b""))
        if echoed != b"ping\n":
            time.sleep(0.3)
    assert echoed == b"ping\n"


def _bash(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # Before the fix these hung with QEMU at 100% CPU: the timeout turns a hang into a failure.
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout)


def test_exec_into_a_closed_pipe_ends_like_a_shell(vm):
    result = _bash(f'{MATCHLOCK} exec {vm} -- yes | head -1; echo "status=${{PIPESTATUS[0]}}"')
    assert result.stdout == "y\nstatus=141\n", result
    # Finite output is not drained after the reader went away, and the command is gone from the guest.
    finite = _bash(f'{MATCHLOCK} exec {vm} -- seq 1 3000000 | head -1; echo "status=${{PIPESTATUS[0]}}"')
    assert finite.stdout == "1\nstatus=141\n", finite
    left = run_matchlock("exec", vm, "--", "sh", "-c", "ps -o comm | grep -c -x -e yes -e seq || true")
    assert left.stdout.strip() == "0", left


def _sandboxes(state_dir) -> list[str]:
    return sorted(path.name for path in (state_dir / "vms").iterdir())


def test_run_into_a_closed_pipe_ends_like_a_shell(vm, module_state_dir):
    result = _bash(f'{MATCHLOCK} run -- yes | head -n 2; echo "status=${{PIPESTATUS[0]}}"')
    assert result.stdout == "y\ny\nstatus=141\n", result
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result
    assert _sandboxes(module_state_dir) == [vm]  # only the shared one: the run's sandbox was removed


def test_ctrl_c_cancels_the_command_and_exits_130(vm, module_state_dir):
    # A terminal sends SIGINT to its whole foreground process group: so does this test.
    proc = subprocess.Popen([MATCHLOCK, "run", "--", "sh", "-c", "echo started; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert proc.stderr is not None and proc.stderr.read() == ""  # no false error, no trace
    finally:
        proc.kill()
    assert _sandboxes(module_state_dir) == [vm]  # only the shared one: the run's sandbox was removed


@pytest.mark.parametrize("command", [["sh", "-c", "echo started; sleep 600"], []], ids=["running", "no-command"])
def test_ctrl_c_on_a_kept_sandbox_exits_130(vm, module_state_dir, command):
    """`--rm=false` ends at Ctrl-C too, with the same 130, and keeps the sandbox (stopped)."""
    proc = subprocess.Popen([MATCHLOCK, "run", "--rm=false", *(["--", *command] if command else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert proc.stderr is not None and proc.stdout is not None
        hints = [proc.stderr.readline() for _ in range(3)]
        kept = hints[0].split()[1]
        assert hints[0] == f"Sandbox {kept} is running\n", hints
        if command:
            assert proc.stdout.readline() == "started\n"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert proc.stderr.read() == ""  # no false error, no trace
    finally:
        proc.kill()
    assert json.loads(run_matchlock("get", kept).stdout)["status"] == "stopped"
    assert run_matchlock("rm", kept).returncode == 0
