"""`run --disk`: named volumes and raw ext4 images in real VMs, their locks, and crash safety.

Volumes live in the shared cache (`<cache>/volumes`), so each test makes its own uniquely named
volume and removes it afterwards. Five VMs in all, one at a time: the machine is small.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from matchlock.state.volumes import VolumeStore
from support.cli import MATCHLOCK

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


@pytest.fixture
def volume(cli):
    """A fresh 64 MB volume, removed afterwards; yields (name, image path)."""
    name = f"test-disks-{secrets.token_hex(4)}"
    created = cli("volume", "create", name, "--size", "64", "--json")
    assert created.returncode == 0, created
    yield name, Path(json.loads(created.stdout)["path"])
    cli("volume", "rm", name)


def _fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-f", "-n", str(image)], capture_output=True, text=True)


def _debugfs_cat(image: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True).stdout


def test_data_persists_owner_is_initialised_and_ro_refuses_writes(cli, volume):
    name, image = volume
    first = cli(
        "run", "--disk", f"@{name}:/srv/data,uid=1000,gid=2000", "-u", "1000:2000", "--",
        "sh", "-c", "stat -c '%u:%g' /srv/data && echo persisted > /srv/data/note && grep ' /srv/data ' /proc/mounts",
    )  # fmt: skip
    assert first.returncode == 0, first
    owner, mount = first.stdout.splitlines()
    assert owner == "1000:2000"  # the user can write only because the fresh root was given to it
    fields = mount.split()
    assert fields[2] == "ext4" and fields[3].split(",")[0] == "rw", first
    assert _fsck(image).returncode == 0  # closed cleanly: no journal left to replay

    second = cli(
        "run", "--disk", f"@{name}:/srv/data:ro,uid=0,gid=0", "--",
        "sh", "-c", "cat /srv/data/note; stat -c '%u:%g' /srv/data; echo x > /srv/data/other; echo status=$?",
    )  # fmt: skip
    assert second.returncode == 0, second
    assert second.stdout.splitlines() == ["persisted", "1000:2000", "status=1"], second
    assert "Read-only file system" in second.stderr, second


def _owner_pid(cli, vm_id: str) -> int:
    result = cli("get", vm_id)
    assert result.returncode == 0, result
    return int(json.loads(result.stdout)["pid"])


def _wait_dead(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} did not exit")


def test_a_paused_sandbox_that_is_killed_still_writes_its_volume(cli, volume):
    # `kill` gives a sandbox with a writable volume a grace to sync and power off. Paused, its vCPUs
    # never read the request: the grace passed for nothing and the write below was lost.
    name, image = volume
    started = cli("run", "-d", "--disk-size", "256", "--disk", f"@{name}:/data")
    assert started.returncode == 0, started
    vm = started.stdout.strip()
    try:
        assert cli("exec", vm, "--", "sh", "-c", "echo precious > /data/note").returncode == 0
        assert cli("pause", vm).returncode == 0
        killed = cli("kill", vm)
        assert killed.returncode == 0 and f"Killed {vm}" in killed.stdout, killed
    finally:
        cli("rm", "-f", vm)
    assert _debugfs_cat(image, "/note") == b"precious\n"
    assert _fsck(image).returncode == 0  # powered off cleanly


def test_exclusive_lock_then_kill_9_during_writes(cli, volume):
    name, image = volume
    started = cli("run", "-d", "--disk", f"@{name}:/data")
    assert started.returncode == 0, started
    vm_id = started.stdout.strip()
    try:
        second = cli("run", "--disk", f"@{name}:/other", "--", "true")
        assert second.returncode != 0, second
        assert f"volume {name!r} is in use by sandbox {vm_id}" in second.stderr, second
        by_path = cli("run", "--disk", f"{image}:/other:ro", "--", "true")  # shared vs. exclusive: refused too
        assert f"in use by sandbox {vm_id}" in by_path.stderr, by_path
        removing = cli("volume", "rm", name)
        assert removing.returncode != 0 and f"in use by sandbox {vm_id}" in removing.stderr, removing

        # Synced files, then writes that never stop, until the owner is killed with -9.
        script = (
            "for i in $(seq 1 20); do yes line-$i | head -c 200000 > /data/f$i; done; sync; echo synced; "
            "while true; do yes busy | head -c 1000000 > /data/busy; done"
        )
        writer = subprocess.Popen(
            [MATCHLOCK, "exec", vm_id, "--", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert writer.stdout is not None and writer.stdout.readline() == b"synced\n"
        time.sleep(1)  # let unsynced writes be in flight when the owner dies
        owner = _owner_pid(cli, vm_id)
        os.kill(owner, signal.SIGKILL)
        _wait_dead(owner)
        writer.kill()
        writer.wait()
    finally:
        cli("kill", vm_id)
    # The owner held the lock; with it dead (and QEMU, tied to it by a parent-death signal) it is free.
    with VolumeStore(image.parent).hold(name, "test"):
        pass
    # What the next attach does (check_image): replay the journal, then a read-only fsck must be clean.
    subprocess.run(["e2fsck", "-p", "-E", "journal_only", str(image)], capture_output=True)
    fsck = _fsck(image)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for i in (1, 7, 20):
        assert _debugfs_cat(image, f"/f{i}") == (f"line-{i}\n".encode() * 200000)[:200000]


def test_bad_images_and_too_many_disks_fail_before_boot(cli, state_dir, tmp_path):
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(b"\0" * (1 << 20))
    result = cli("run", "--disk", f"{zeros}:/z", "--", "true")
    assert result.returncode != 0, result
    assert f"{zeros} is not an ext4 image" in result.stderr and "mkfs.ext4" in result.stderr, result

    corrupt = tmp_path / "corrupt.ext4"
    with open(corrupt, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", str(corrupt)], check=True)
    with open(corrupt, "r+b") as f:  # the group descriptors, overwritten
        f.seek(1024 * 2)
        f.write(b"\xff" * 1024)
    result = cli("run", "--disk", f"{corrupt}:/c", "--", "true")
    assert result.returncode != 0, result
    assert f"{corrupt} is corrupt" in result.stderr and "e2fsck -f" in result.stderr, result

    many = [arg for i in range(9) for arg in ("--disk", f"@v{i}:/d{i}")]
    result = cli("run", *many, "--", "true")
    assert result.returncode == 2, result
    assert "9 extra disks requested; a sandbox takes at most 8" in result.stderr, result

    missing = cli("run", "--disk", "@surely-no-such-volume:/d", "--", "true")
    assert "named volume not found: 'surely-no-such-volume'" in missing.stderr, missing
    assert list((state_dir / "vms").iterdir()) == []  # nothing left behind by the failed starts


def test_forks_and_snapshots_copy_the_disk_and_never_write_the_volume(cli, volume):
    name, image = volume
    started = cli("run", "-d", "--no-network", "--disk", f"@{name}:/data")
    assert started.returncode == 0, started
    vm, made = started.stdout.strip(), []

    def sh(target: str, script: str) -> str:
        result = cli("exec", target, "--", "sh", "-c", script)
        assert result.returncode == 0, result
        return result.stdout

    try:
        sh(vm, "echo source > /data/f")
        forked = cli("fork", vm, "-n", "1", "--json")
        assert forked.returncode == 0, forked
        made += json.loads(forked.stdout)
        assert sh(made[0], "cat /data/f; echo fork > /data/f; cat /data/f") == "source\nfork\n"  # memory and disk came
        assert sh(vm, "cat /data/f") == "source\n"  # the fork wrote its own copy
        cli("rm", "-f", made.pop())
        snapshot = f"disks-{secrets.token_hex(3)}"
        assert cli("snapshot", "create", vm, "--name", snapshot, "--mode", "filesystem").returncode == 0
        refused = cli("run", "-d", "--from-snapshot", snapshot, "--disk", f"@{name}:/data")
        assert refused.returncode != 0 and "cannot be combined with --from-snapshot" in refused.stderr, refused
        restored = cli("run", "-d", "--from-snapshot", snapshot)
        assert restored.returncode == 0, restored
        made.append(restored.stdout.strip())
        assert sh(made[0], "cat /data/f; grep -c ' /data ext4 rw' /proc/mounts") == "source\n1\n"  # booted on the copy
        sh(made[0], "echo restored > /data/f && sync")
        assert cli("snapshot", "rm", snapshot).returncode == 0
    finally:
        for each in (*made, vm):
            cli("rm", "-f", each)
    assert _debugfs_cat(image, "/f") == b"source\n"  # only the source ever wrote the volume
    assert _fsck(image).returncode == 0
