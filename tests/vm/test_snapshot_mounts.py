"""Snapshots and forks of a sandbox with directory mounts, with real VMs (sandbox/snapshots.py).

One SDK parent is shared: a memory workspace holding a host_fs mount and a host-side overlay (nested,
so the host serves it), and a guest-local overlay beside them. Its entrypoint runs with its cwd in the
memory mount and a file there held open for writing. At most three VMs run at once (the parent and two
clones). host_fs is the host directory, shared by every copy; memory and overlay mounts are private.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from sdk_support import IMAGE, MATCHLOCK

from matchlock import Client, Config, Sandbox
from support.cli import run_matchlock

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

# The writer appends to a file it holds open (fd 3) in the memory mount, and renames a file there by
# paths relative to its cwd: both need what the clone's VFS restored (an open handle, a cwd's node).
WRITER = (
    "cd /workspace && exec 3>>log && i=0; "
    "while :; do i=$((i+1)); echo $i >&3; echo $i > cur.new && mv cur.new cur; sleep 0.2; done"
)


def _client() -> Client:
    client = Client(Config(binary_path=MATCHLOCK))
    client.start()
    return client


def _done(*clients: Client) -> None:
    for client in clients:
        client.close()
        client.remove()


def _logged(client: Client) -> tuple[int, int]:
    result = client.exec("tail -n 1 /workspace/log; cat /workspace/cur")
    counts = result.stdout.split()
    assert len(counts) == 2, (client.vm_id, result)
    return int(counts[0]), int(counts[1])


def _writing(client: Client) -> None:
    """The writer's open file and its cwd's file both pass their current count; fails after 30 s."""
    log, cur = _logged(client)
    deadline = time.monotonic() + 30
    while ((count := _logged(client))[0] <= log or count[1] <= cur) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count[0] > log and count[1] > cur, f"the writer in {client.vm_id} stopped at {count}"


def _tree(root: Path) -> dict[str, str]:
    """Every entry under `root` with its mode and content hash: an overlay's lower must stay as it was."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[str(path.relative_to(root))] = f"{st.st_mode:o} {st.st_mtime_ns} {data}"
    return out


def _cli(*args: str) -> str:
    result = run_matchlock(*args)
    assert result.returncode == 0, result
    return result.stdout


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mounts")
    made = {name: root / name for name in ("shared", "hov", "gov")}
    for path in made.values():
        path.mkdir()
    (made["hov"] / "lower.txt").write_text("host-side lower\n")
    (made["gov"] / "lower.txt").write_text("guest-local lower\n")
    return made


@pytest.fixture(scope="module")
def parent(module_state_dir, dirs):
    box = (
        Sandbox(IMAGE).with_no_network().with_memory(256).with_disk_size(256)
        .with_workspace("/workspace").mount_memory("/workspace")
        .mount_host_dir("/workspace/shared", str(dirs["shared"]))
        .mount_overlay("/workspace/ov", str(dirs["hov"]))
        .mount_overlay("/gov", str(dirs["gov"]))
        .with_entrypoint("sh", "-c", WRITER)
    )  # fmt: skip
    client = _client()
    try:
        client.launch(box)
        client.write_file("/workspace/kept", "in memory\n")
        client.exec("echo parent > /workspace/ov/parent.txt && echo parent > /gov/parent.txt && sync")
        _writing(client)
    except BaseException:
        _done(client)
        raise
    yield client
    _done(client)


def test_forks_keep_the_writer_and_own_their_private_mounts(parent, dirs):
    lowers = {name: _tree(dirs[name]) for name in ("hov", "gov")}
    clones = parent.fork(2)
    try:
        first, second = clones
        for clone in clones:
            _writing(clone)  # the process with its cwd and an open file in the memory mount goes on
            assert clone.read_file("/workspace/kept") == b"in memory\n"
            assert clone.exec("cat /workspace/ov/parent.txt /gov/parent.txt").stdout == "parent\nparent\n"
        script = "for d in /workspace /workspace/ov /gov; do echo first > $d/mine; done; echo first > /workspace/ov/lower.txt"
        assert first.exec(script).exit_code == 0
        for other in (second, parent):
            seen = other.exec(
                "cat /workspace/mine /workspace/ov/mine /gov/mine 2>/dev/null; cat /workspace/ov/lower.txt"
            )
            assert seen.stdout == "host-side lower\n", (other.vm_id, seen)
        second.exec("echo second > /workspace/mine")
        assert first.read_file("/workspace/mine") == b"first\n"
        assert first.exec("echo from-fork > /workspace/shared/fork.txt").exit_code == 0
        assert (dirs["shared"] / "fork.txt").read_text() == "from-fork\n"  # host_fs is the host directory
        assert second.read_file("/workspace/shared/fork.txt") == b"from-fork\n"  # ... shared by every copy
        _writing(parent)  # the parent kept running, its mounts served again after the park
        assert parent.exec("echo after > /workspace/after && cat /workspace/after").stdout == "after\n"
    finally:
        _done(*clones)
    assert {name: _tree(dirs[name]) for name in ("hov", "gov")} == lowers  # overlays never write their lower


def test_a_filesystem_snapshot_restore_brings_the_memory_files_back(parent, dirs):
    _cli("snapshot", "create", parent.vm_id, "--name", "mounts-fs", "--mode", "filesystem")
    refused = run_matchlock("run", "--from-snapshot", "mounts-fs", "--no-network", "-v", f"{dirs['shared']}:/x", "-d")
    assert refused.returncode != 0 and "brings back snapshot 'mounts-fs''s own mounts" in refused.stderr, refused
    clone = _cli("run", "--from-snapshot", "mounts-fs", "--no-network", "-d").strip()
    try:
        script = "cat /workspace/kept /workspace/ov/parent.txt /gov/parent.txt; ls /gov"
        # A cold boot on the copied upper disk: the guest-local overlay's layers are on it.
        shown = _cli("exec", clone, "--", "sh", "-c", script)
        assert shown == "in memory\nparent\nparent\nlower.txt\nparent.txt\n"
        assert _cli("exec", clone, "--", "sh", "-c", "echo clone > /gov/clone.txt && cat /gov/clone.txt") == "clone\n"
        assert not (dirs["gov"] / "parent.txt").exists() and not (dirs["gov"] / "clone.txt").exists()
        (dirs["shared"] / "host.txt").write_text("live\n")
        assert _cli("exec", clone, "--", "cat", "/workspace/shared/host.txt") == "live\n"
    finally:
        run_matchlock("rm", "-f", clone)


def test_a_full_restore_needs_its_host_fs_path_and_brings_the_memory_mount_back(parent, dirs):
    _cli("snapshot", "create", parent.vm_id, "--name", "mounts-gone", "--mode", "full")
    before = {vm["id"] for vm in json.loads(_cli("list", "--json"))}
    away = dirs["shared"].with_name("shared.away")
    os.rename(dirs["shared"], away)
    try:
        failed = run_matchlock("run", "--from-snapshot", "mounts-gone", "--no-network", "-d")
    finally:
        os.rename(away, dirs["shared"])
    assert failed.returncode != 0, failed
    assert f"host_fs mount /workspace/shared needs the host path {dirs['shared']}, which is gone" in failed.stderr
    assert "fix: recreate" in failed.stderr and "Traceback" not in failed.stderr, failed
    assert {vm["id"] for vm in json.loads(_cli("list", "--json"))} == before  # no clone left behind
    clone = _cli("run", "--from-snapshot", "mounts-gone", "--no-network", "-d").strip()  # the path is back
    try:
        script = "cat /workspace/kept; tail -n 1 /workspace/log; sleep 1; tail -n 1 /workspace/log"
        kept, logged, later = _cli("exec", clone, "--", "sh", "-c", script).splitlines()
        assert kept == "in memory"
        assert int(later) > int(logged)  # the writer came along, its open file in the restored memory mount
    finally:
        run_matchlock("rm", "-f", clone)
    _cli("snapshot", "rm", "mounts-gone", "mounts-fs")


def test_a_paused_sandbox_with_mounts_takes_a_filesystem_snapshot_and_stays_paused(parent):
    _cli("pause", parent.vm_id)
    try:
        _cli("snapshot", "create", parent.vm_id, "--name", "mounts-paused", "--mode", "filesystem")
        shown = next(vm for vm in json.loads(_cli("list", "--json")) if vm["id"] == parent.vm_id)
        assert shown.get("paused") is True, shown  # the FUSE daemon ran to park, then the guest stopped again
    finally:
        _cli("resume", parent.vm_id)
    _writing(parent)  # its mounts woke with the guest
    clone = _cli("run", "--from-snapshot", "mounts-paused", "--no-network", "-d").strip()
    try:
        assert _cli("exec", clone, "--", "cat", "/workspace/kept", "/gov/parent.txt") == "in memory\nparent\n"
    finally:
        run_matchlock("rm", "-f", clone)
        _cli("snapshot", "rm", "mounts-paused")


def test_cli_fork_of_a_run_with_volumes_serves_the_clone_its_mounts(dirs):
    started = _cli("run", "--no-network", "-d", "-v", f"{dirs['shared']}:/mnt:host_fs", "-v", f"{dirs['gov']}:/ov")
    vm = started.strip()
    clones: list[str] = []
    try:
        _cli("exec", vm, "--", "sh", "-c", "echo parent > /ov/cli.txt")
        clones = json.loads(_cli("fork", vm, "-n", "1", "--json"))
        shown = _cli("exec", clones[0], "--", "sh", "-c", "cat /ov/cli.txt; echo clone > /mnt/cli-fork.txt")
        assert shown == "parent\n"
        assert (dirs["shared"] / "cli-fork.txt").read_text() == "clone\n"
        assert not (dirs["gov"] / "cli.txt").exists()  # the overlay's writes stay in the guests
    finally:
        for each in (vm, *clones):
            run_matchlock("rm", "-f", each)
