"""`matchlock rpc` lifecycle on real VMs: close, stdin EOF, broken stdout, kill, entrypoints, kernel.ref.

Every way a session ends must leave no QEMU process (checked by pid) and keep the sandbox's row,
marked stopped, so the SDK's `remove()` (`matchlock rm ID`) works.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from support.cli import MATCHLOCK
from support.rpcwire import RpcProcess, pid_alive, unb64

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

IMAGE = "matchlock/busybox:builtin"
QUIET = {"image": IMAGE, "network": {"no_network": True}}


@pytest.fixture
def start(state_dir, tmp_path):
    started: list[RpcProcess] = []

    def make() -> RpcProcess:
        server = RpcProcess(stderr_path=tmp_path / f"rpc{len(started)}.log", env={"MATCHLOCK_RPC_LOG": "INFO"})
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
        assert server.bad_lines == []


def _create(server: RpcProcess, params: dict) -> str:
    return server.result("create", params, timeout=300)["id"]


def _qemu_pid(cli, vm_id: str) -> int:
    report = json.loads(cli("inspect", vm_id).stdout)
    pids = [r["resources"]["qemu_pid"] for r in report["history"] if "qemu_pid" in r.get("resources", {})]
    assert pids, report
    return pids[-1]


def _wait_dead(pid: int) -> None:
    for _ in range(200):
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"QEMU {pid} is still running")


def _status(cli, vm_id: str) -> str:
    return json.loads(cli("get", vm_id).stdout)["status"]


def test_close_keeps_a_stopped_row_that_rm_removes(start, cli) -> None:
    from matchlock.kernel import resolve

    kernel = resolve().path
    server = start()
    vm_id = _create(server, {**QUIET, "kernel": {"ref": f"file://{kernel}"}})
    pid = _qemu_pid(cli, vm_id)
    assert pid_alive(pid) and _status(cli, vm_id) == "running"
    assert server.result("close", {"timeout_seconds": 2}) == {}
    assert server.wait_exit(60) == 0
    _wait_dead(pid)
    assert _status(cli, vm_id) == "stopped"
    listed = cli("list")
    assert vm_id in listed.stdout and "stopped" in listed.stdout
    removed = cli("rm", vm_id)
    assert removed.returncode == 0, removed
    assert vm_id not in cli("list").stdout


def test_close_cancels_requests_in_flight(start, cli) -> None:
    server = start()
    vm_id = _create(server, QUIET)
    running = server.send("exec", {"command": "sleep 600"})
    streaming = server.send("log_stream")
    time.sleep(0.5)
    close = server.send("close", {"timeout_seconds": 2})
    for msg_id in (running, streaming):
        response, _ = server.wait(msg_id, 60)
        assert response["error"]["code"] == -32003
    assert server.wait(close, 60)[0]["result"] == {}
    assert server.wait_exit(60) == 0
    assert _status(cli, vm_id) == "stopped"


def test_stdin_eof_mid_exec_releases_everything(start, cli) -> None:
    server = start()
    vm_id = _create(server, QUIET)
    pid = _qemu_pid(cli, vm_id)
    server.send("exec", {"command": "sleep 600"})
    time.sleep(0.5)
    server.close_stdin()
    assert server.wait_exit(60) == 0
    _wait_dead(pid)
    assert _status(cli, vm_id) == "stopped"
    assert cli("rm", vm_id).returncode == 0


def test_broken_stdout_releases_everything(state_dir, cli, tmp_path) -> None:
    with open(tmp_path / "rpc.log", "wb") as stderr:
        proc = subprocess.Popen([MATCHLOCK, "rpc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "create", "id": 1, "params": QUIET}).encode() + b"\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        vm_id = reply["result"]["id"]
        pid = _qemu_pid(cli, vm_id)
        proc.stdout.close()  # the client is gone; stdin stays open
        for msg_id in range(2, 6):  # the answers cannot be written: the server must notice and end
            line = {"jsonrpc": "2.0", "method": "exec", "id": msg_id, "params": {"command": "echo x"}}
            proc.stdin.write(json.dumps(line).encode() + b"\n")
            proc.stdin.flush()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    _wait_dead(pid)
    assert _status(cli, vm_id) == "stopped"


def test_matchlock_kill_stops_the_session(start, cli) -> None:
    server = start()
    vm_id = _create(server, QUIET)
    pid = _qemu_pid(cli, vm_id)
    assert cli("kill", vm_id).returncode == 0
    assert server.wait_exit(60) == 0
    _wait_dead(pid)
    assert _status(cli, vm_id) == "stopped"


def test_launch_entrypoint_output_goes_to_the_log(start) -> None:
    server = start()
    marker = f"entry-out-{os.getpid()}"
    params = {
        **QUIET,
        "env": {"MARK": marker},
        "image_config": {"entrypoint": ["sh", "-c"], "cmd": ["echo $MARK; echo err-$MARK >&2; sleep 600"]},
        "launch_entrypoint": True,
    }
    _create(server, params)
    for _ in range(100):
        content = unb64(server.result("log")["content"])
        if f"err-{marker}".encode() in content:
            break
        time.sleep(0.1)
    assert f"{marker}\n".encode() in content and f"err-{marker}\n".encode() in content
    assert server.result("close", {"timeout_seconds": 0}) == {}
    assert server.wait_exit(60) == 0


def test_failing_entrypoint_fails_the_create(start, cli) -> None:
    server = start()
    params = {**QUIET, "image_config": {"entrypoint": ["sh", "-c", "exit 3"]}, "launch_entrypoint": True}
    error = server.error("create", params, timeout=300)
    assert error == {"code": -32000, "message": "start image entrypoint: exit code 3"}
    assert cli("list").stdout.strip().splitlines()[1:] == []  # closed and removed, as upstream
    vm_id = _create(server, QUIET)  # the session is still usable
    assert unb64(server.result("exec", {"command": "echo ok"})["stdout"]) == b"ok\n"
    assert server.result("close", {"timeout_seconds": 0}) == {}
    assert server.wait_exit(60) == 0
    assert _status(cli, vm_id) == "stopped"
