"""Long-lived sandboxes through the real CLI: run -d, exec, list, inspect, kill, rm, gc, crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]
MATCHLOCK = os.path.join(os.path.dirname(sys.executable), "matchlock")


@pytest.fixture
def detached(cli, state_dir):
    """Start sandboxes with `run -d`; whatever is left is killed and pruned afterwards."""
    started: list[str] = []

    def start(*args: str) -> str:
        result = cli("run", "-d", *args)
        assert result.returncode == 0, result
        vm_id = result.stdout.strip()
        assert vm_id.startswith("vm-") and len(vm_id) == 11, result
        started.append(vm_id)
        return vm_id

    yield start
    cli("kill", "--all")
    deadline = time.monotonic() + 60
    while any(_status(cli, vm) == "running" for vm in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    cli("prune")


def _status(cli, vm_id: str) -> str | None:
    result = cli("get", vm_id)
    return json.loads(result.stdout)["status"] if result.returncode == 0 else None


def _wait_status(cli, vm_id: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _status(cli, vm_id) != status:
        assert time.monotonic() < deadline, f"{vm_id} never became {status}"
        time.sleep(0.2)


def _rows(cli, *flags: str) -> list[list[str]]:
    result = cli("list", *flags)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "IMAGE", "CREATED", "PID"]
    starts = [lines[0].index(name) for name in ("STATUS", "IMAGE", "CREATED", "PID")]
    for line in lines[1:]:  # aligned: every column starts under its heading
        assert all(line[start - 3 : start] == "   " and line[start] != " " for start in starts), result
    # CREATED holds a date and a time
    return [line.split()[:3] + [" ".join(line.split()[3:5])] + line.split()[5:] for line in lines[1:]]


def test_full_lifecycle(cli, detached, state_dir):
    vm = detached("-e", "VISIBLE_ENV=from-run", "-e", "TOKEN=s3cr3t-value")
    exec_result = cli("exec", vm, "--", "sh", "-c", "echo $VISIBLE_ENV; echo to-err >&2; exit 4")
    assert (exec_result.returncode, exec_result.stdout, exec_result.stderr) == (4, "from-run\n", "to-err\n")
    piped = cli("exec", "-i", vm, "--", "sh", "-c", "tr a-z A-Z", input="through stdin\n")
    assert piped.stdout == "THROUGH STDIN\n", piped
    assert cli("exec", "-w", "/etc", "-u", "nobody", vm, "--", "sh", "-c", "pwd; id -u").stdout == "/etc\n65534\n"
    for args, reason in ((["-u", "nosuch"], "user 'nosuch' not found in /etc/passwd"),
                         (["-w", "/nonexistent"], "cannot use working directory /nonexistent: No such file")):  # fmt: skip
        unstartable = cli("exec", *args, vm, "--", "echo", "never")
        assert unstartable.returncode == 127 and unstartable.stdout == "", unstartable
        assert unstartable.stderr.startswith(f"Error: {reason}") and unstartable.stderr.count("\n") == 1, unstartable

    rows = _rows(cli)
    assert [r[0] for r in rows] == [vm] and rows[0][1] == "running" and rows[0][4].isdigit()
    assert [r[0] for r in _rows(cli, "--running")] == [vm]
    assert cli("ls").stdout == cli("list").stdout
    state = json.loads(cli("get", vm).stdout)
    assert state["id"] == vm and state["status"] == "running"
    assert set(state["config"]["env"]) == {"VISIBLE_ENV", "TOKEN"}
    assert "s3cr3t-value" not in json.dumps(state)
    report = json.loads(cli("inspect", vm).stdout)
    assert report["vm"]["id"] == vm and report["lifecycle"]["phase"] == "running"
    assert [r["phase"] for r in report["history"]][0] == "creating"
    assert {"qemu_pid", "upper_disk", "exec_socket"} <= set(report["lifecycle"]["resources"])
    assert json.loads(cli("stat", vm).stdout)["vm"]["id"] == vm
    cli("exec", vm, "--", "sh", "-c", "echo marker-in-log")
    assert cli("log", vm).returncode == 0

    assert cli("kill", vm).stdout == f"Killed {vm}\n"
    _wait_status(cli, vm, "stopped")
    assert _rows(cli, "--running") == []
    after = json.loads(cli("inspect", vm).stdout)["lifecycle"]
    assert after["phase"] == "cleaned" and after["cleanup"]["machine_stop"]["status"] == "ok"
    not_running = cli("exec", vm, "--", "true")
    assert not_running.returncode == 1 and "is not running (status: stopped)" in not_running.stderr

    assert cli("rm", vm).stdout == f"Removed {vm}\n"
    assert _rows(cli) == [] and not (state_dir / "vms" / vm).exists()
    assert b"s3cr3t-value" not in (state_dir / "state.db").read_bytes()
    gone = cli("get", vm)
    assert gone.returncode == 1 and f"VM {vm} not found" in gone.stderr


def test_detached_command_keeps_running(cli, detached):
    vm = detached("--", "sh", "-c", "while true; do echo tick >> /tmp/ticks; sleep 0.2; done")
    first = int(cli("exec", vm, "--", "sh", "-c", "sleep 1; wc -l < /tmp/ticks").stdout)
    second = int(cli("exec", vm, "--", "sh", "-c", "sleep 1; wc -l < /tmp/ticks").stdout)
    assert 0 < first < second


def test_rm_false_prints_hints_and_stops_on_sigterm(state_dir):
    proc = subprocess.Popen([MATCHLOCK, "run", "--rm=false", "--", "echo", "attached-output"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    hint = proc.stderr.readline()
    assert hint.startswith("Sandbox vm-") and hint.endswith(" is running\n")
    vm = hint.split()[1]
    assert proc.stderr.readline() == f"  Connect: matchlock exec {vm} -it sh\n"
    assert proc.stderr.readline() == f"  Stop:    matchlock kill {vm}\n"
    assert proc.stdout.readline() == "attached-output\n"
    time.sleep(0.5)
    assert proc.poll() is None  # still up after the command finished
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    state = subprocess.run([MATCHLOCK, "get", vm], capture_output=True, text=True)
    assert json.loads(state.stdout)["status"] == "stopped"


def test_detach_rejects_interactive_flags(cli):
    for flags in (["-d", "-it"], ["-dit"], ["-d", "-i"], ["-d", "-t"]):
        result = cli("run", *flags, "--", "true")
        assert result.returncode == 2, (flags, result)
        assert "--detach cannot be combined with -t/--tty or -i/--interactive" in result.stderr


def test_two_sandboxes_in_parallel(cli, detached):
    # Two at a time: the test hosts have 2 cores, and this proves IDs, state and sockets do not collide.
    procs = [subprocess.Popen([MATCHLOCK, "run", "-d", "--", "sleep", "600"], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    vms = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(vms)) == 2
    listed = {row[0]: row[1] for row in _rows(cli)}
    assert all(listed[vm] == "running" for vm in vms)
    for vm in vms:
        assert cli("exec", vm, "--", "hostname").stdout == f"{vm}\n"
    kill_all = cli("kill", "--all")
    assert sorted(kill_all.stdout.split("\n")[:-1]) == sorted(f"Killed {vm}" for vm in vms)
    for vm in vms:
        _wait_status(cli, vm, "stopped")
    prune = cli("prune")
    assert prune.stdout.splitlines()[-1] == "Pruned 2 VMs"
    assert _rows(cli) == []


def test_owner_killed_during_exec(cli, detached, state_dir):
    vm = detached()
    owner = json.loads(cli("get", vm).stdout)["pid"]
    qemu = json.loads(cli("inspect", vm).stdout)["lifecycle"]["resources"]["qemu_pid"]
    exec_client = subprocess.Popen([MATCHLOCK, "exec", vm, "--", "sh", "-c", "echo started; sleep 600"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert exec_client.stdout.readline() == "started\n"
    os.kill(owner, signal.SIGKILL)
    assert exec_client.wait(timeout=30) == 1  # an error, not a hang
    assert "closed the connection" in exec_client.stderr.read()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{qemu}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{qemu}"), "QEMU outlived its killed owner"
    assert _rows(cli)[0][1] == "crashed"
    first = cli("gc")
    assert first.stdout.splitlines() == [f"{vm}: cleaned exec_socket_remove, upper_remove", "Reconciled 1 VMs"]
    second = cli("gc", vm)
    assert second.stdout.splitlines() == [f"{vm}: no resources to clean", "Reconciled 1 VMs"]
    assert cli("prune").stdout.splitlines() == [f"Pruned {vm}", "Pruned 1 VMs"]
    assert not (state_dir / "vms" / vm).exists()
    assert subprocess.run(["pgrep", "-f", f"qemu-system.*{vm}"], capture_output=True).stdout == b""


def test_garbage_on_the_exec_socket_does_not_hurt_the_sandbox(cli, detached, state_dir):
    vm = detached()
    path = str(state_dir / "vms" / vm / "exec.sock")
    for garbage in (b"\xff" * 64, struct.pack(">BI", 1, 1 << 30), struct.pack(">BI", 1, 5) + b"{bad}",
                    struct.pack(">BI", 6, 3) + b"abc"):  # fmt: skip
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(path)
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        kind, length = struct.unpack(">BI", reply[:5])
        assert kind == 2 and "error" in json.loads(reply[5 : 5 + length]), (garbage, reply)
    assert cli("exec", vm, "--", "echo", "still-alive").stdout == "still-alive\n"
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_lifecycle_errors(cli):
    assert cli("get", "vm-00000000").returncode == 1
    for args in (["kill"], ["rm"], ["exec"], ["exec", "vm-00000000"]):
        result = cli(*args)
        assert result.returncode == 2, (args, result)
    missing = cli("exec", "vm-00000000", "--", "true")
    assert missing.returncode == 1 and "VM vm-00000000 not found" in missing.stderr
    assert cli("kill", "vm-00000000").returncode == 1
    assert cli("gc").stdout == "Reconciled 0 VMs\n"


def _owner_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_vm_that_dies_under_its_owner_ends_the_sandbox(cli, detached, state_dir):
    """Issue 10, item 7: QEMU killed under a ready detached sandbox."""
    vm = detached()
    owner = json.loads(cli("get", vm).stdout)["pid"]
    resources = json.loads(cli("inspect", vm).stdout)["lifecycle"]["resources"]
    os.kill(resources["qemu_pid"], signal.SIGKILL)
    _wait_status(cli, vm, "crashed")
    report = json.loads(cli("inspect", vm).stdout)["lifecycle"]
    assert report["phase"] == "cleaned" and "killed by signal 9" in report["last_error"], report
    deadline = time.monotonic() + 30  # it records the end, then exits
    while not _owner_gone(owner) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _owner_gone(owner), "the owner outlived its dead VM"
    assert not os.path.exists(resources["exec_socket"]) and not os.path.exists(resources["upper_disk"])
    assert "QEMU killed by signal 9" in cli("log", vm).stdout
    not_running = cli("exec", vm, "--", "true")
    assert not_running.returncode == 1 and "is not running (status: crashed)" in not_running.stderr
    assert cli("gc", vm).stdout.splitlines()[0] == f"{vm}: no resources to clean"
    assert cli("prune").stdout.splitlines() == [f"Pruned {vm}", "Pruned 1 VMs"]


def test_gc_force_running_stops_the_sandbox(cli, detached):
    """Issue 10, item 8: nothing stays shown as running after a forced gc."""
    vm = detached()
    qemu = json.loads(cli("inspect", vm).stdout)["lifecycle"]["resources"]["qemu_pid"]
    result = cli("gc", "--force-running", vm)
    assert result.returncode == 0, result
    assert _status(cli, vm) == "stopped"  # at once: gc waited for the owner to close it
    assert _owner_gone(qemu)
    not_running = cli("exec", vm, "--", "true")
    assert not_running.returncode == 1 and "is not running (status: stopped)" in not_running.stderr


def test_list_and_ids_for_scripts(cli, detached, state_dir):
    """Issue 10, item 18: -q, --json, ID prefixes, rm -f, and kill that waits."""
    vm = detached()
    other = detached()
    assert cli("list", "-q").stdout.split() == [vm, other]
    listed = json.loads(cli("list", "--json").stdout)
    assert [entry["id"] for entry in listed] == [vm, other] and listed[0]["status"] == "running"
    prefix = vm[: next(n for n in range(4, 12) if not other.startswith(vm[:n]))]
    assert cli("exec", prefix, "--", "hostname").stdout == f"{vm}\n"
    assert json.loads(cli("get", prefix[3:]).stdout)["id"] == vm  # the vm- may be left off too
    ambiguous = cli("get", "vm-")
    assert ambiguous.returncode == 2 and "ambiguous" in ambiguous.stderr and vm in ambiguous.stderr
    killed = cli("kill", prefix)
    assert killed.stdout == f"Killed {vm}\n" and _status(cli, vm) == "stopped"  # kill waited
    assert cli("rm", prefix).stdout == f"Removed {vm}\n"
    refused = cli("rm", other)
    assert refused.returncode == 1 and "is running" in refused.stderr
    forced = cli("rm", "-f", other)
    assert forced.stdout == f"Removed {other}\n", forced
    assert cli("list", "-q").stdout == "" and not (state_dir / "vms" / other).exists()


def test_detached_failures_are_reported(cli, state_dir):
    """Issue 10, item 15: a command that cannot start fails `run -d` with the guest's reason, and leaves no
    record. The guest answers `error` instead of `started` (docs/wire.md), so nothing runs twice."""
    for args, reason in ((["-u", "nosuch"], "user 'nosuch' not found in /etc/passwd"),
                         (["-w", "/nonexistent"], "cannot use working directory /nonexistent")):  # fmt: skip
        result = cli("run", "-d", *args, "--", "sleep", "100")
        assert result.returncode == 127, result
        assert f"Error: the command could not start: {reason}" in result.stderr, result
        assert cli("list", "-q").stdout == ""  # not even a stopped one


def test_detached_timeout_is_enforced(cli, detached):
    vm = detached("--timeout", "20", "--", "sleep", "600")
    _wait_status(cli, vm, "stopped", timeout=90)
    assert "--timeout reached" in cli("log", vm).stdout


def _cold_detached_start() -> subprocess.Popen:
    """`run -d` booting without a template (several seconds), once the owner has recorded its sandbox."""
    env = {**os.environ, "MATCHLOCK_NO_TEMPLATES": "1"}
    caller = subprocess.Popen([MATCHLOCK, "run", "-d", "--no-network", "--", "sleep", "600"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not subprocess.run([MATCHLOCK, "list", "-q"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline and caller.poll() is None, caller.communicate()
        time.sleep(0.05)
    return caller


def test_a_detached_start_whose_caller_or_owner_dies_leaves_no_sandbox_and_says_why(cli, state_dir):
    # The caller killed before it could print the VM ID: no one can ever name the sandbox, so its owner
    # stops the start and removes it, instead of booting a VM for nobody.
    caller = _cold_detached_start()
    (vm,) = cli("list", "-q").stdout.split()
    owner = json.loads(cli("get", vm).stdout)["pid"]
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 60
    while (os.path.exists(f"/proc/{owner}") or cli("list", "-q").stdout.strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{owner}"), "the abandoned owner is still running"
    assert cli("list", "-q").stdout == "", "the abandoned sandbox was kept"
    assert not (state_dir / "vms" / vm).exists()
    assert subprocess.run(["pgrep", "-f", f"qemu-system.*{vm}"], capture_output=True).stdout == b""
    # The owner killed: the caller says so and exits as a shell would (128 + SIGKILL), then gc cleans up.
    caller = _cold_detached_start()
    (vm,) = cli("list", "-q").stdout.split()
    os.kill(json.loads(cli("get", vm).stdout)["pid"], signal.SIGKILL)
    _, error = caller.communicate(timeout=60)
    assert caller.returncode == 128 + signal.SIGKILL, error
    assert "Error: the detached sandbox was killed by SIGKILL before it was ready" in error
    assert cli("gc").returncode == 0
    assert cli("prune").stdout.splitlines() == [f"Pruned {vm}", "Pruned 1 VMs"]
