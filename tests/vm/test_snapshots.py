"""Pause, resume, snapshots, restores and forks of real sandboxes, through the real CLI (issue 14).

One source sandbox is shared: a counter process writes to /tmp every 0.2 s,
it has a secret and an allow-list (so a CA), and a file on its upper disk.
At most three VMs run at once (the source and two clones).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from matchlock import Client, Config, MatchlockError, RPCError, Sandbox
from support.cli import MATCHLOCK, run_matchlock

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

SECRET_VALUE = "sekrit-" + "7f3a9c1e5b2d4086"
SECRET = f"API_KEY={SECRET_VALUE}@api.example.com"
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done"
CA = "/etc/ssl/certs/matchlock-ca.crt"


def _ok(*args: str) -> str:
    result = run_matchlock(*args)
    assert result.returncode == 0, result
    return result.stdout


def _sh(vm: str, script: str) -> str:
    return _ok("exec", vm, "--", "sh", "-c", script)


def _count(vm: str) -> int:
    return int(_sh(vm, "cat /tmp/count"))


def _wait_count_above(vm: str, floor: int) -> int:
    """The counter once it passed `floor` (it must keep counting); fails after 30 s of no progress."""
    deadline = time.monotonic() + 30
    while (count := _count(vm)) <= floor and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count > floor, f"the counter in {vm} stopped at {count}"
    return count


def _kill(*vms: str) -> None:
    for vm in vms:
        run_matchlock("kill", vm)
        run_matchlock("rm", "-f", vm)


@pytest.fixture(scope="module")
def source(vm_prerequisites, module_state_dir):
    vm = _ok("run", "-d", "--disk-size", "256", "--allow-host", "api.example.com", "--secret", SECRET,
             "--", "sh", "-c", COUNTER).strip()  # fmt: skip
    _sh(vm, "echo kept > /root/upper-file && echo tmp > /tmp/tmp-file && sync")
    _wait_count_above(vm, 0)
    yield vm
    _kill(vm)


def test_pause_stops_the_guest_and_resume_continues_it(source):
    before = _count(source)
    assert _ok("pause", source).strip() == f"Paused {source}"
    assert "paused" in _ok("list")
    refused = run_matchlock("exec", source, "--", "true")
    assert refused.returncode != 0 and f"sandbox {source} is paused; fix: matchlock resume" in refused.stderr
    again = run_matchlock("pause", source)
    assert again.returncode != 0 and "already paused" in again.stderr
    time.sleep(3)  # 15 ticks of the counter, had it been running
    _ok("resume", source)
    after = _count(source)
    assert after - before < 10, (before, after)  # stood still while paused
    _wait_count_above(source, after)
    assert "paused" not in _ok("list")


def test_a_pause_asked_for_during_a_snapshot_waits_for_it_and_holds(source, module_state_dir):
    # The snapshot stops the vCPUs and starts them again at its end: a pause that came in meanwhile used
    # to be undone by that, with `list` saying paused, exec running and `resume` answering "not paused".
    from matchlock.sandbox.relay_client import control

    _sh(source, "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=160 2>/dev/null")  # a slower save
    directory = Path(module_state_dir, "snapshots", "during")
    try:
        with ThreadPoolExecutor(1) as pool:
            saving = pool.submit(control, source, "snapshot", name="during", mode="full")
            while not directory.exists() and not saving.done():
                time.sleep(0.002)
            assert control(source, "pause") == {"id": source, "paused": True}
            assert saving.result()["name"] == "during"
        assert json.loads(_ok("get", source))["paused"] is True
        refused = run_matchlock("exec", source, "--", "true")
        assert refused.returncode == 1 and f"sandbox {source} is paused" in refused.stderr, refused
        assert _ok("resume", source).strip() == f"Resumed {source}"
        _wait_count_above(source, _count(source))
    finally:
        run_matchlock("resume", source)
        _sh(source, "rm -f /dev/shm/fill")
        run_matchlock("snapshot", "rm", "during")


def test_full_snapshot_restore_keeps_processes_files_and_gets_a_new_ca(source, module_state_dir):
    assert _ok("snapshot", "create", source, "--name", "full1").strip() == "full1"
    files = list(Path(module_state_dir, "snapshots", "full1").iterdir())
    assert {"memory", "upper.img"} <= {f.name for f in files}
    for path in files:  # the value lives only in the owner's memory; the guest had a placeholder
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                assert SECRET_VALUE.encode() not in chunk, path

    lacking = run_matchlock("run", "--from-snapshot", "full1", "-d")
    assert lacking.returncode == 2 and "uses secret(s) API_KEY" in lacking.stderr, lacking

    clone = _ok("run", "--from-snapshot", "full1", "-d", "--secret", SECRET).strip()
    try:
        assert clone != source
        _wait_count_above(clone, _count(clone))  # the counter process came along and still counts
        assert _sh(clone, "cat /tmp/tmp-file /root/upper-file; hostname") == f"tmp\nkept\n{clone}\n"
        assert _sh(clone, f"cat {CA}") != _sh(source, f"cat {CA}")  # a new CA for a new proxy
        assert _sh(clone, "echo $API_KEY") == _sh(source, "echo $API_KEY")  # the same placeholder
        _wait_count_above(source, _count(source))  # the source kept running too
    finally:
        _kill(clone)


def test_filesystem_snapshot_keeps_the_upper_disk(source):
    _ok("snapshot", "create", source, "--name", "fs1", "--mode", "filesystem")
    assert "fs1" in _ok("snapshot", "ls")
    clone = _ok("run", "--from-snapshot", "fs1", "-d", "--secret", SECRET).strip()
    try:
        assert _sh(clone, "cat /root/upper-file") == "kept\n"
        assert _sh(clone, "pgrep -f 'sleep 0.2' || echo none") == "none\n"  # a cold boot: no old processes
    finally:
        _kill(clone)
    clash = run_matchlock("snapshot", "create", source, "--name", "fs1")
    assert clash.returncode != 0 and "'fs1' already exists" in clash.stderr, clash
    _ok("snapshot", "rm", "fs1")
    assert "fs1" not in _ok("snapshot", "ls")


def test_a_filesystem_snapshot_of_a_paused_sandbox_has_what_it_wrote_just_before(source):
    # The guest's page cache reaches the upper disk only when it syncs: the snapshot of a paused sandbox
    # used to skip the sync, and its restore lacked a file written just before the pause.
    _sh(source, "echo fresh > /root/fresh-file")  # no sync: in the guest's page cache
    _ok("pause", source)
    try:
        _ok("snapshot", "create", source, "--name", "fs-paused", "--mode", "filesystem")
        assert json.loads(_ok("get", source))["paused"] is True  # still paused after
    finally:
        _ok("resume", source)
    try:
        restored = run_matchlock("run", "--from-snapshot", "fs-paused", "--secret", SECRET, "--",
                                 "cat", "/root/fresh-file")  # fmt: skip
        assert restored.returncode == 0 and restored.stdout == "fresh\n", restored
    finally:
        _ok("snapshot", "rm", "fs-paused")


def test_the_sdk_pauses_resumes_and_snapshots(module_state_dir):
    client = Client(Config(binary_path=MATCHLOCK))
    client.start()
    try:
        client.create(Sandbox("matchlock/busybox:builtin").options())
        client.pause()
        with pytest.raises(MatchlockError, match="is paused"):
            client.exec("true")
        with pytest.raises(RPCError, match="already paused") as twice:  # the sandbox's state, not a bad param
            client.pause()
        assert twice.value.code == RPCError.VM_FAILED
        client.resume()
        assert client.exec("echo back").stdout == "back\n"
        record = client.snapshot("sdk1", mode="filesystem")
        assert (record["name"], record["mode"]) == ("sdk1", "filesystem")
        with pytest.raises(MatchlockError, match="invalid snapshot mode"):
            client.snapshot(mode="memory")
    finally:
        client.close()
    assert "sdk1" in _ok("snapshot", "ls")


def test_fork_gives_independent_clones(source, tmp_path):
    # The secret through a file (read once by `fork`; the RPC server passes a memfd so), the IDs as JSON.
    secret_file = tmp_path / "secrets.json"
    name, _, rest = SECRET.partition("=")
    value, _, host = rest.partition("@")
    secret_file.write_text(json.dumps({name: {"value": value, "hosts": [host]}}))
    clones = json.loads(_ok("fork", source, "-n", "2", "--json", "--secret-file", str(secret_file)))
    try:
        assert len(clones) == 2 and source not in clones
        first, second = clones
        for clone in clones:
            _wait_count_above(clone, _count(clone))
        _sh(first, "echo mine > /root/fork-file && echo mine > /tmp/fork-file")
        for other in (second, source):
            assert _sh(other, "cat /root/fork-file /tmp/fork-file 2>/dev/null || echo absent") == "absent\n"
        randoms = {_sh(vm, "head -c 16 /dev/urandom | od -A n -t x1") for vm in (source, *clones)}
        assert len(randoms) == 3
        assert "a.example.com" in _ok("allow-list", "add", first, "a.example.com")
        second_list = _ok("allow-list", "add", second, "b.example.com")
        assert "a.example.com" not in second_list  # a policy each
        current = second_list.split("Current allow-list: ")[1].split()[0]
        assert sorted(current.split(",")) == ["api.example.com", "b.example.com"]  # the source's, not wider
        assert "fork-" not in _ok("snapshot", "ls")  # the fork's own snapshot is gone once they are up
        _ok("pause", first)  # a paused sandbox still stops cleanly
        _ok("kill", first)
        # The snapshot `second` came from is gone (above), yet it forks in turn: it keeps its own links to
        # the kernel and initrd, which QEMU does not hold open (a fork of a fork used to fail, naming them).
        grandchild = _ok("fork", second, "--secret", SECRET).strip()
        clones.append(grandchild)
        _wait_count_above(grandchild, _count(grandchild))
        assert _sh(grandchild, "cat /root/upper-file") == "kept\n"
    finally:
        _kill(*clones)


@pytest.mark.parametrize("mounted", [False, True], ids=["no-mounts", "with-a-mount"])
def test_an_owner_killed_during_a_snapshot_leaves_nothing_ls_shows_and_gc_removes_it(
    module_state_dir, tmp_path, mounted
):
    # With a mount the snapshot also saves the VFS state (and parks its channel): that must not leak either.
    volumes = ["-v", f"{tmp_path}:/work"] if mounted else []
    (tmp_path / "host.txt").write_text("host\n")
    vm = _ok("run", "-d", "--no-network", "--disk-size", "256", *volumes).strip()
    try:
        if mounted:
            assert _sh(vm, "cat /work/host.txt && echo guest > /work/guest.txt") == "host\n"
        _sh(vm, "dd if=/dev/urandom of=/dev/shm/fill bs=1M count=160 2>/dev/null")  # a slow save
        pid = json.loads(_ok("get", vm))["pid"]
        creating = subprocess.Popen([MATCHLOCK, "snapshot", "create", vm, "--name", "doomed"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        directory = Path(module_state_dir, "snapshots", "doomed")
        deadline = time.monotonic() + 60
        while not directory.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        _, error = creating.communicate(timeout=60)
        assert creating.returncode != 0, error  # the owner died before the snapshot was complete
        assert "doomed" not in _ok("snapshot", "ls")
        assert "snapshot doomed: removed" in _ok("gc")
        assert not directory.exists()
        if mounted:  # a -v mount is an overlay: neither the guest's write nor the killed snapshot touched the host
            assert sorted(os.listdir(tmp_path)) == ["host.txt"]
    finally:
        _kill(vm)
