"""Restores and forks through the SDK and the raw RPC wire (issue 14), with real VMs.

The CLI's side is tests/vm/test_snapshots.py. At most three VMs run at once: the raw-wire test runs
first (its parent and two clones), then the SDK parent shared by the rest, with at most two clones.
The parent runs a counter as its entrypoint, so "a process that keeps running" is checked in every copy.
"""

from __future__ import annotations

import threading
import time

import pytest
from sdk_support import IMAGE, MATCHLOCK

from matchlock import Client, Config, MatchlockError, RPCError, Sandbox, VFSHookRule, VFSInterceptionConfig
from support.cli import run_matchlock
from support.rpcwire import RpcProcess, b64

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

SECRET_VALUE = "sdk-sekrit-" + "51c0ffee42"
HOST = "api.example.com"
# Renamed into place, so a reader never sees the file truncated and empty.
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done"


def _client() -> Client:
    client = Client(Config(binary_path=MATCHLOCK))
    client.start()
    return client


def _box(image: str = IMAGE) -> Sandbox:
    return Sandbox(image).allow_host(HOST).add_secret("API_KEY", SECRET_VALUE, HOST)


def _count(client: Client) -> int:
    return int(client.exec("cat /tmp/count").stdout)


def _counting(client: Client) -> None:
    """The counter passes its current value (it keeps running); fails after 30 s of no progress."""
    floor = _count(client)
    deadline = time.monotonic() + 30
    while (count := _count(client)) <= floor and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count > floor, f"the counter in {client.vm_id} stopped at {count}"


def _done(*clients: Client) -> None:
    for client in clients:
        client.close()
        client.remove()


def _cli(*args: str) -> str:
    result = run_matchlock(*args)
    assert result.returncode == 0, result
    return result.stdout


def test_rpc_fork_returns_detached_clones_that_the_cli_can_use(module_state_dir):
    server = RpcProcess()
    source = ""
    clones: list[str] = []
    try:
        network = {"allowed_hosts": [HOST], "secrets": {"API_KEY": {"value": SECRET_VALUE, "hosts": [HOST]}}}
        source = server.result(
            "create", {"image": IMAGE, "resources": {"memory_mb": 256}, "network": network}, timeout=300
        )["id"]
        server.result("write_file", {"path": "/root/f", "content": b64("from the parent\n")})
        assert server.error("fork", {"count": 0})["code"] == -32602
        clones = server.result("fork", {"count": 2}, timeout=300)["ids"]
        assert len(set(clones)) == 2 and source not in clones
        placeholder = server.result("exec", {"command": "echo $API_KEY"})["stdout"]
        for clone in clones:
            assert _cli("exec", clone, "--", "cat", "/root/f") == "from the parent\n"
            assert b64(_cli("exec", clone, "--", "sh", "-c", "echo $API_KEY")) == placeholder  # same placeholder
        assert "fork-" not in _cli("snapshot", "ls")  # the fork's own snapshot is gone once the clones are up
        assert server.result("exec", {"command": "echo alive"})["exit_code"] == 0  # the parent kept running
    finally:
        server.stop()
        for vm in (source, *clones):
            if vm:
                run_matchlock("rm", "-f", vm)
    assert server.bad_lines == []
    listed = _cli("list")
    assert all(clone not in listed for clone in clones)


@pytest.fixture(scope="module")
def parent(module_state_dir):
    client = _client()
    try:
        client.launch(_box().with_memory(256).with_disk_size(256).with_entrypoint("sh", "-c", COUNTER))
        client.write_file("/root/sdk-file", "kept\n")
        client.exec("echo tmp > /tmp/tmp-file && sync")
        _counting(client)
    except BaseException:
        _done(client)
        raise
    yield client
    _done(client)


def test_a_restore_without_its_secret_fails_before_anything_starts(parent):
    parent.snapshot("sdk-nosecret", mode="filesystem")
    lacking = _client()
    try:
        with pytest.raises(RPCError) as caught:
            lacking.create(Sandbox("").from_snapshot("sdk-nosecret").options())
        assert caught.value.code == -32602
        assert "snapshot 'sdk-nosecret' uses secret(s) API_KEY" in caught.value.message
        assert "network.secrets.API_KEY" in caught.value.message
        assert lacking.vm_id is None
    finally:
        lacking.close()
    assert parent.snapshot_remove("sdk-nosecret") == ["sdk-nosecret"]


def test_a_client_from_a_snapshot_has_the_files_and_the_running_process(parent):
    record = parent.snapshot("sdk-full", mode="full")
    assert (record["name"], record["mode"], record["secrets"]) == ("sdk-full", "full", ["API_KEY"])
    assert "sdk-full" in [s["name"] for s in parent.snapshot_list()]
    restored = _client()
    try:
        restored.create(_box("").from_snapshot("sdk-full").options())
        assert restored.vm_id != parent.vm_id
        assert restored.read_file("/root/sdk-file") == b"kept\n"
        assert restored.exec("cat /tmp/tmp-file").stdout == "tmp\n"
        _counting(restored)  # the entrypoint's counter came along and still counts
        assert restored.exec("echo $API_KEY").stdout == parent.exec("echo $API_KEY").stdout
    finally:
        _done(restored)
    assert parent.snapshot_remove("sdk-full") == ["sdk-full"]
    assert "sdk-full" not in [s["name"] for s in parent.snapshot_list()]


def test_fork_gives_clients_whose_writes_are_isolated(parent):
    clones = parent.fork(2)
    try:
        assert len({parent.vm_id, *(clone.vm_id for clone in clones)}) == 3
        first, second = clones
        for clone in clones:
            assert clone.read_file("/root/sdk-file") == b"kept\n"
            _counting(clone)
        first.write_file("/root/fork-file", "first\n")
        first.exec("echo first > /tmp/fork-file")
        for other in (second, parent):
            assert other.exec("cat /root/fork-file /tmp/fork-file 2>/dev/null || echo absent").stdout == "absent\n"
        second.write_file("/root/fork-file", "second\n")
        assert first.read_file("/root/fork-file") == b"first\n"
        assert not [s for s in parent.snapshot_list() if s["name"].startswith("sdk-fork-")]  # the temporary one
        _counting(parent)  # the parent kept running
    finally:
        _done(*clones)


def test_a_forks_client_runs_the_parents_sdk_vfs_hooks(module_state_dir):
    seen, lock = [], threading.Lock()

    def after(event) -> None:
        with lock:
            seen.append((event.op, event.path))

    rules = [
        VFSHookRule(name="audit", phase="after", ops=["write"], path="/workspace/*", hook=after),
        VFSHookRule(
            name="stamp", phase="before", ops=["write"], path="/workspace/*.txt", mutate_hook=lambda r: b"mutated"
        ),
        VFSHookRule(name="no-keys", phase="before", ops=["write"], path="*.key", action_hook=lambda r: "block"),
    ]
    box = _box().with_memory(256).with_disk_size(256).with_workspace("/workspace").mount_memory("/workspace")
    parent = _client()
    clones: list[Client] = []
    try:
        parent.create(box.with_vfs_interception(VFSInterceptionConfig(rules=rules)).options())
        clones = parent.fork(1)
        (clone,) = clones
        clone.write_file("/workspace/a.txt", b"original")
        assert clone.read_file("/workspace/a.txt") == b"mutated"  # the parent's mutate hook, in the clone
        with pytest.raises(MatchlockError, match="vfs action hook blocked"):
            clone.write_file("/workspace/id.key", b"k")
        clone.exec("echo guest > /workspace/g")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                if ("write", "/workspace/g") in seen:
                    break
            time.sleep(0.1)
        with lock:
            assert ("write", "/workspace/g") in seen, seen  # the clone's events reach the parent's after-hook
    finally:
        _done(*clones, parent)
