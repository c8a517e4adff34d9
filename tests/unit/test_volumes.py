"""Named volumes: the store, `matchlock volume ...` (outputs as the SDK parses them) and `volume cp`.

These run the real CLI as root (the suite runs as root) against a private MATCHLOCK_CACHE_DIR; no VM.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from matchlock import Client, Config
from matchlock.api.errors import NotFoundError, UsageError
from matchlock.state.volumes import MAX_NAME_LENGTH, VolumeBusyError, VolumeError, VolumeStore, validate_name
from support.cli import MATCHLOCK, run_matchlock


@pytest.fixture
def volumes(cache_dir) -> Path:
    return cache_dir / "volumes"


def _fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)


def _tree_metadata(root: Path) -> dict[str, tuple[int, int, int, int, int | str]]:
    """Relative path -> (mode with type, uid, gid, mtime, content or link target)."""
    result: dict[str, tuple[int, int, int, int, int | str]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            content: int | str = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            content = hash(path.read_bytes())
        else:
            content = 0
        result[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime), content)
    return result


@pytest.fixture
def host_tree(tmp_path) -> Path:
    """Files with unusual modes and owners: suid, sticky, a private dir, a symlink owned by someone else."""
    root = tmp_path / "tree"
    (root / "sub" / "deep").mkdir(parents=True)
    suid = root / "tool"
    suid.write_bytes(b"#!/bin/sh\necho hi\n")
    os.chown(suid, 1234, 5678)
    os.chmod(suid, 0o4755)
    (root / "sub" / 'odd "name" here').write_bytes(os.urandom(300_000))
    os.symlink("../tool", root / "sub" / "link")
    os.chown(root / "sub" / "link", 7, 8, follow_symlinks=False)
    os.utime(root / "sub" / "link", (1_400_000_000, 1_400_000_000), follow_symlinks=False)
    (root / "sub" / "deep" / "empty").touch()
    os.chown(root / "sub" / "deep", 100_000, 100_001)  # over 16 bits: ext4 keeps the high half elsewhere
    os.chmod(root / "sub" / "deep", 0o700)
    os.chmod(root / "sub", 0o1777)
    for path in (root / "sub", root / "sub" / "deep", root, suid):
        os.utime(path, (1_500_000_000, 1_500_000_000), follow_symlinks=False)
    return root


# --- names and the store ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data", "pg-data_1.v2", "A", "9" * MAX_NAME_LENGTH, "  padded  "])
def test_valid_names(name):
    assert validate_name(name) == name.strip()


@pytest.mark.parametrize(
    "name", ["", "   ", "a/b", "../x", ".hidden", "-flag", "_x", "a b", "x:y", "é", "a\nb", "9" * (MAX_NAME_LENGTH + 1)]
)
def test_invalid_names_are_usage_errors(name, volumes):
    with pytest.raises(UsageError):
        validate_name(name)
    with pytest.raises(UsageError):
        VolumeStore(volumes).create(name, 16)
    assert not volumes.exists() or not any(volumes.glob("*.ext4"))


def test_create_is_sparse_ext4_and_listed(volumes):
    store = VolumeStore(volumes)
    assert store.list() == []
    created = store.create("big", 10240)
    assert created.path == volumes / "big.ext4"
    st = created.path.stat()
    assert st.st_size == 10240 * 1024 * 1024
    assert st.st_blocks * 512 < 64 * 1024 * 1024  # sparse: metadata only
    assert _fsck(created.path).returncode == 0
    store.create("a", 16)
    (volumes / ".tmp-c-123.ext4").write_bytes(b"half made")  # a crashed create is not a volume
    (volumes / "notes.txt").write_text("not a volume")
    assert [(v.name, v.size) for v in store.list()] == [("a", "16.0 MB"), ("big", "10240.0 MB")]


def test_duplicate_and_bad_size_are_refused(volumes):
    store = VolumeStore(volumes)
    store.create("v", 16)
    before = (volumes / "v.ext4").read_bytes()
    with pytest.raises(VolumeError, match="named volume already exists"):
        store.create("v", 32)
    assert (volumes / "v.ext4").read_bytes() == before
    for size in (0, -5):
        with pytest.raises(UsageError, match="size must be > 0 MB"):
            store.create("w", size)
    assert sorted(p.name for p in volumes.glob("*ext4")) == ["v.ext4"]  # no temporaries left


def test_remove_twice_and_resolve(volumes):
    store = VolumeStore(volumes)
    path = store.create("v", 16).path
    assert store.resolve("@v") == path == store.resolve("v")
    store.remove("v")
    assert not path.exists()
    with pytest.raises(NotFoundError, match="named volume not found"):
        store.remove("v")
    with pytest.raises(NotFoundError, match="named volume not found"):
        store.resolve("@v")


def test_hold_is_exclusive_for_writers_and_shared_for_readers(volumes):
    store = VolumeStore(volumes)
    store.create("v", 16)
    with store.hold("v", "sandbox vm-one (pid 1)"):
        for readonly in (False, True):
            with pytest.raises(VolumeBusyError, match=r"in use by sandbox vm-one \(pid 1\)"):
                with store.hold("v", "sandbox vm-two", readonly=readonly):
                    pass
        with pytest.raises(VolumeBusyError, match="vm-one"):
            store.remove("v")
    with store.hold("v", "reader vm-a", readonly=True), store.hold("v", "reader vm-b", readonly=True):
        with pytest.raises(VolumeBusyError, match="in use by reader vm-a, reader vm-b"):
            store.remove("v")
    store.remove("v")


# --- the CLI, as the SDK reads it ---------------------------------------------------------------------


def test_cli_json_outputs_match_the_sdk_wire(volumes):
    empty = run_matchlock("volume", "ls", "--json")
    assert (empty.returncode, empty.stdout) == (0, "[]\n")
    created = run_matchlock("volume", "create", "data", "--size", "16", "--json")
    assert created.returncode == 0, created
    path = str(volumes / "data.ext4")
    assert created.stdout == '{"name":"data","size":"16.0 MB","path":"' + path + '"}\n'
    run_matchlock("volume", "create", "cache", "--size", "32")
    listed = run_matchlock("volume", "ls", "--json")
    assert json.loads(listed.stdout) == [
        {"name": "cache", "size": "32.0 MB", "path": str(volumes / "cache.ext4")},
        {"name": "data", "size": "16.0 MB", "path": path},
    ]


def test_cli_human_outputs_and_exit_codes(volumes):
    created = run_matchlock("volume", "create", "my-volume", "--size", "16")
    assert (created.returncode, created.stdout) == (0, "Created volume my-volume (16 MB)\n")
    run_matchlock("volume", "create", "b", "--size", "1024")
    listed = run_matchlock("volume", "list")
    assert listed.stdout.splitlines() == ["NAME        SIZE", "b           1024.0 MB", "my-volume   16.0 MB"]
    again = run_matchlock("volume", "create", "my-volume", "--size", "16")
    assert again.returncode == 1 and "named volume already exists" in again.stderr
    bad = run_matchlock("volume", "create", "../etc", "--size", "16")
    assert bad.returncode == 2 and "invalid volume name '../etc'" in bad.stderr
    removed = run_matchlock("volume", "rm", "my-volume")
    assert (removed.returncode, removed.stdout) == (0, "Removed volume my-volume\n")
    twice = run_matchlock("volume", "remove", "my-volume")
    assert twice.returncode == 1 and "named volume not found" in twice.stderr


def test_cli_rm_of_a_volume_in_use_names_the_holder(volumes):
    VolumeStore(volumes).create("v", 16)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from matchlock.state.volumes import VolumeStore\n"
            "with VolumeStore().hold('v', 'sandbox vm-holder'):\n"
            "    print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        busy = run_matchlock("volume", "rm", "v")
        assert busy.returncode == 1
        assert "in use by sandbox vm-holder" in busy.stderr and (volumes / "v.ext4").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # as a sandbox owner killed with -9: the kernel drops the flock
        holder.wait()
    assert run_matchlock("volume", "rm", "v").returncode == 0


def test_sdk_volume_calls_against_our_cli(volumes):
    client = Client(Config(binary_path=MATCHLOCK))
    info = client.volume_create("sdk-vol", 16)
    assert (info.name, info.size, info.path) == ("sdk-vol", "16.0 MB", str(volumes / "sdk-vol.ext4"))
    assert [(v.name, v.size, v.path) for v in client.volume_list()] == [(info.name, info.size, info.path)]
    client.volume_remove("sdk-vol")
    assert client.volume_list() == []
    with pytest.raises(subprocess.CalledProcessError) as failed:
        client.volume_remove("sdk-vol")
    assert "named volume not found" in failed.value.stderr


# --- volume cp ----------------------------------------------------------------------------------------


def test_cp_round_trip_keeps_modes_owners_and_mtimes(volumes, host_tree, tmp_path):
    run_matchlock("volume", "create", "v", "--size", "16")
    copied_in = run_matchlock("volume", "cp", str(host_tree), "v:/data")
    assert copied_in.returncode == 0, copied_in
    assert _fsck(volumes / "v.ext4").returncode == 0, _fsck(volumes / "v.ext4").stdout
    out = tmp_path / "out"
    copied_out = run_matchlock("volume", "copy", "v:/data", str(out))
    assert (copied_out.returncode, copied_out.stdout) == (0, f"Copied v:/data to {out}\n")
    assert _tree_metadata(out) == _tree_metadata(host_tree)
    # single entries, out and in again under another name
    run_matchlock("volume", "cp", "v:/data/sub/link", str(tmp_path / "link"))
    run_matchlock("volume", "cp", "v:/data/tool", str(tmp_path / "tool"))
    assert _tree_metadata(tmp_path / "link") == _tree_metadata(host_tree / "sub" / "link")
    assert _tree_metadata(tmp_path / "tool") == _tree_metadata(host_tree / "tool")
    assert run_matchlock("volume", "cp", str(tmp_path / "tool"), "v:/tool2").returncode == 0
    root = tmp_path / "root"
    assert run_matchlock("volume", "cp", "v:/", str(root)).returncode == 0
    assert sorted(p.name for p in root.iterdir()) == ["data", "lost+found", "tool2"]
    assert _fsck(volumes / "v.ext4").returncode == 0


def test_cp_refuses_an_existing_destination(volumes, host_tree, tmp_path):
    run_matchlock("volume", "create", "v", "--size", "16")
    run_matchlock("volume", "cp", str(host_tree), "v:/data")
    before = (volumes / "v.ext4").read_bytes()
    again = run_matchlock("volume", "cp", str(host_tree / "tool"), "v:/data/tool")
    assert again.returncode == 1 and "destination v:/data/tool already exists" in again.stderr
    assert (volumes / "v.ext4").read_bytes() == before
    no_parent = run_matchlock("volume", "cp", str(host_tree / "tool"), "v:/missing/tool")
    assert no_parent.returncode == 1 and "v:/missing is not a directory" in no_parent.stderr
    existing = tmp_path / "exists"
    existing.write_text("mine")
    out = run_matchlock("volume", "cp", "v:/data/tool", str(existing))
    assert out.returncode == 1 and f"destination {existing} already exists" in out.stderr
    assert existing.read_text() == "mine"
    missing = run_matchlock("volume", "cp", "v:/nope", str(tmp_path / "x"))
    assert missing.returncode == 1 and "v:/nope does not exist" in missing.stderr


def test_failed_copy_in_leaves_the_volume_untouched(volumes, tmp_path):
    run_matchlock("volume", "create", "v", "--size", "8")
    before = (volumes / "v.ext4").read_bytes()
    too_big = tmp_path / "big"
    too_big.write_bytes(os.urandom(12 * 1024 * 1024))
    full = run_matchlock("volume", "cp", str(too_big), "v:/big")
    assert full.returncode == 1 and "debugfs failed" in full.stderr
    fifo = tmp_path / "dir"
    fifo.mkdir()
    os.mkfifo(fifo / "pipe")
    special = run_matchlock("volume", "cp", str(fifo), "v:/dir")
    assert special.returncode == 2 and "is not a regular file, directory or symlink" in special.stderr
    assert (volumes / "v.ext4").read_bytes() == before
    assert not [p for p in volumes.iterdir() if p.name.startswith(".tmp-")]


def test_corrupt_and_non_ext4_images_give_clear_errors(volumes, tmp_path):
    volumes.mkdir(parents=True)
    (volumes / "junk.ext4").write_bytes(os.urandom(4 * 1024 * 1024))
    junk = run_matchlock("volume", "cp", "junk:/", str(tmp_path / "j"))
    assert junk.returncode == 1 and "junk.ext4 is not an ext4 image" in junk.stderr
    run_matchlock("volume", "create", "v", "--size", "16")
    (tmp_path / "d").mkdir()
    run_matchlock("volume", "cp", str(tmp_path / "d"), "v:/d")
    # Clear the directory's inode: its entry now points at nothing.
    subprocess.run(["debugfs", "-w", "-R", "clri /d", str(volumes / "v.ext4")], check=True, capture_output=True)
    for argv in (("v:/d", str(tmp_path / "out")), (str(tmp_path / "d"), "v:/e")):
        corrupt = run_matchlock("volume", "cp", *argv)
        assert corrupt.returncode == 1 and "v.ext4 is corrupt (" in corrupt.stderr and "e2fsck -f" in corrupt.stderr
    assert not (tmp_path / "out").exists()


def test_cp_between_volumes_clones_the_image(volumes):
    run_matchlock("volume", "create", "a", "--size", "16")
    os.chmod(volumes / "a.ext4", 0o6640)
    os.chown(volumes / "a.ext4", 321, 654)
    os.utime(volumes / "a.ext4", (1_500_000_000, 1_500_000_000))
    cloned = run_matchlock("volume", "cp", "a", "b")
    assert (cloned.returncode, cloned.stdout) == (0, "Copied volume a to b\n")
    a, b = (volumes / "a.ext4").stat(), (volumes / "b.ext4").stat()
    assert (b.st_mode, b.st_uid, b.st_gid, b.st_mtime, b.st_size) == (
        a.st_mode,
        a.st_uid,
        a.st_gid,
        a.st_mtime,
        a.st_size,
    )
    assert (volumes / "b.ext4").read_bytes() == (volumes / "a.ext4").read_bytes()
    assert run_matchlock("volume", "cp", "a", "a").returncode == 2
    exists = run_matchlock("volume", "cp", "b", "a")
    assert exists.returncode == 1 and "named volume already exists" in exists.stderr


def test_journal_of_a_killed_user_is_replayed_before_cp(volumes, tmp_path):
    """An image copied while mounted looks like one whose sandbox was killed -9: synced data is only in the journal."""
    from matchlock.state.volumes import superblock_flags

    run_matchlock("volume", "create", "v", "--size", "16")
    image, snapshot, mnt = volumes / "v.ext4", tmp_path / "snap.ext4", tmp_path / "mnt"
    mnt.mkdir()
    script = f'mount -o loop "{image}" "{mnt}" && echo synced > "{mnt}/s" && sync && cp "{image}" "{snapshot}"; umount "{mnt}"'
    subprocess.run(["unshare", "--mount", "sh", "-c", script], check=True)
    os.replace(snapshot, image)
    assert superblock_flags(image) & 0x4  # needs_recovery
    out = tmp_path / "s"
    assert run_matchlock("volume", "cp", "v:/s", str(out)).returncode == 0
    assert out.read_text() == "synced\n"
    assert superblock_flags(image) & 0x4 == 0 and _fsck(image).returncode == 0
