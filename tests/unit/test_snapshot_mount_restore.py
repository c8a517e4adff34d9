"""A restore of a snapshot with directory mounts: the snapshot's own mounts come back (sandbox/snapshots.py);
the VM side is tests/vm/test_snapshot_mounts.py."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from matchlock.api.config import SandboxConfig, public_config
from matchlock.api.disks import DiskMount
from matchlock.api.errors import MatchlockError, SetupError, UsageError, VMError
from matchlock.api.network import NetworkConfig
from matchlock.api.vfs import MountConfig, VFSConfig, VFSHookRule, VFSInterceptionConfig
from matchlock.sandbox.snapshots import Restore
from matchlock.state.store import StateStore


def _source_vfs(tmp_path) -> VFSConfig:
    (tmp_path / "shared").mkdir()
    (tmp_path / "lower").mkdir()
    mounts = {
        "/workspace": MountConfig("memory"),
        "/workspace/shared": MountConfig("host_fs", str(tmp_path / "shared"), owner_uid=1000, owner_gid=1000),
        "/lower": MountConfig("overlay", str(tmp_path / "lower"), readonly=True),
    }
    rules = (VFSHookRule("no-secrets", "before", ("write",), "/workspace/secret*", "block"),)
    return VFSConfig("/workspace", mounts, VFSInterceptionConfig(emit_events=True, rules=rules))


def _restore(tmp_path, vfs: VFSConfig | dict, mode: str = "filesystem") -> Restore:
    saved = public_config(SandboxConfig(image="snap/image:1", vfs=vfs)) if isinstance(vfs, VFSConfig) else {"vfs": vfs}
    meta = {"mode": mode, "image": "snap/image:1", "cpus": 1.0, "memory_mb": 256, "disk_size_mb": 256,
            "network": False, "secrets": {}, "config": saved}  # fmt: skip
    return Restore("s1", tmp_path, meta)


def _bare() -> SandboxConfig:
    return SandboxConfig(image="x", network=NetworkConfig(no_network=True))


def test_a_restore_brings_back_the_snapshots_own_mounts(tmp_path):
    vfs = _source_vfs(tmp_path)
    prepared = _restore(tmp_path, vfs).prepare(_bare())
    assert prepared.vfs.mounts == vfs.mounts
    assert prepared.vfs.workspace == "/workspace"
    assert prepared.vfs.interception == vfs.interception
    assert not _restore(tmp_path, VFSConfig()).prepare(_bare()).vfs.active  # none before, none after


def test_new_mounts_with_a_restore_are_refused_saying_the_snapshots_come_back(tmp_path):
    given = SandboxConfig(
        image="x", network=NetworkConfig(no_network=True), vfs=VFSConfig(mounts={"/m": MountConfig("memory")})
    )
    with pytest.raises(UsageError, match=r"with --from-snapshot: a restore brings back snapshot 's1'.s own mounts"):
        _restore(tmp_path, _source_vfs(tmp_path)).prepare(given)


def test_a_shared_host_path_that_is_gone_fails_naming_the_mount_and_the_fix(tmp_path):
    restore = _restore(tmp_path, _source_vfs(tmp_path), mode="full")
    (tmp_path / "shared").rmdir()
    with pytest.raises(SetupError) as failed:
        restore.prepare(SandboxConfig(image="x", network=NetworkConfig(no_network=True)))
    message = str(failed.value)
    assert "host_fs mount /workspace/shared" in message and str(tmp_path / "shared") in message
    assert "fix: recreate" in message and "matchlock snapshot rm s1" in message


@pytest.mark.parametrize(
    "saved",
    [
        "mounts",
        {"mounts": []},
        {"mounts": {"/m": "memory"}},
        {"mounts": {"/m": {"type": "host_fs", "host_path": 7}}},
        {"mounts": {"/m": {"type": "host_fs", "host_path": "/tmp", "owner_uid": "0"}}},
        {"mounts": {"/m": {"type": "memory"}}, "interception": {"rules": [{"name": "r"}]}},
        {"mounts": {"/m": {"type": "memory"}}, "workspace": 5},
    ],
)
def test_a_damaged_saved_vfs_config_is_refused(tmp_path, saved):
    with pytest.raises(SetupError, match="is damaged: its vfs config"):
        _restore(tmp_path, saved).prepare(_bare())


def test_a_saved_mount_of_an_unknown_type_fails_validation(tmp_path):
    with pytest.raises(UsageError, match="type 'disk' is not one of"):
        _restore(tmp_path, {"mounts": {"/m": {"type": "disk"}}}).prepare(_bare())


def _with_disks(tmp_path, disks: object) -> Restore:
    restore = _restore(tmp_path, VFSConfig())
    restore.meta["extra_disks"] = disks
    return restore


def test_a_restore_brings_back_the_disks_on_copies_of_its_own(tmp_path):
    saved = [{"host_path": "/var/volumes/v.ext4", "guest_mount": "/data", "readonly": False, "owner_uid": 1000}]
    restore = _with_disks(tmp_path, saved)
    prepared = restore.prepare(_bare())
    (disk,) = prepared.extra_disks
    assert (disk.host_path, disk.guest_mount, disk.readonly, disk.owner_uid) == (
        str(tmp_path / "disk0.ext4"), "/data", False, 1000)  # fmt: skip
    assert restore.prepare(prepared).extra_disks == prepared.extra_disks  # the owner prepares it again
    (tmp_path / "disk0.ext4").write_bytes(b"saved image")
    clone = tmp_path / "clone"
    clone.mkdir()
    restore.make_disks(clone)
    (private,) = restore.private_disks(clone)
    assert private.host_path == str(clone / "disk0.ext4") and (clone / "disk0.ext4").read_bytes() == b"saved image"
    given = dataclasses.replace(_bare(), extra_disks=(DiskMount("@other", "/data"),))
    with pytest.raises(UsageError, match="own mounts and disks; fix: drop them"):
        restore.prepare(given)


@pytest.mark.parametrize(
    "saved",
    [
        "disks",
        [None],
        [{"guest_mount": "/data"}],
        [{"guest_mount": 5, "readonly": True}],
        [{"guest_mount": "/data", "readonly": True, "owner_uid": "0"}],
        [{"guest_mount": "/", "readonly": True}],
    ],
)
def test_damaged_saved_disks_are_refused(tmp_path, saved):
    with pytest.raises(SetupError, match="is damaged: its extra disks"):
        _with_disks(tmp_path, saved).prepare(_bare())


# --- create: the order of the parks and the cleanup on failure ---------------------------------------------


class _FakeVFS:
    def __init__(self, log: list[str], fail: str = "") -> None:
        self.log, self.fail = log, fail

    async def park(self, timeout: float) -> None:
        self.log.append("vfs park")
        if self.fail == "park":
            raise VMError("the guest's VFS daemon did not park within 30 s")

    def wake(self) -> None:
        self.log.append("vfs wake")

    def save(self, directory, *, with_nodes: bool) -> None:
        self.log.append(f"vfs save nodes={with_nodes}")
        if self.fail == "save":
            raise SetupError("disk full")
        (directory / "vfs").mkdir()


def _sandbox(tmp_path, log: list[str], fail: str = ""):
    from matchlock.vm.machine import Disk, MachineSpec
    from matchlock.wire import boot

    disks = tuple(Disk(tmp_path / f"{s}.img", s) for s in (boot.RUNTIME_DISK_SERIAL, boot.LOWER_DISK_SERIAL))
    spec = MachineSpec("vm-1", tmp_path / "kernel", (), (*disks, Disk(tmp_path / "u.img", boot.UPPER_DISK_SERIAL)),
                       tmp_path / "c.log", None)  # fmt: skip
    for path in ("kernel", f"{boot.RUNTIME_DISK_SERIAL}.img", f"{boot.LOWER_DISK_SERIAL}.img"):
        (tmp_path / path).write_text("x")
    return SimpleNamespace(
        id="vm-1", config=SandboxConfig(image="img", vfs=VFSConfig(mounts={"/m": MountConfig("memory")})),
        machine=SimpleNamespace(running=True, spec=spec, pid=None), closed=False, paused=False,
        control_lock=asyncio.Lock(), vfs=_FakeVFS(log, fail), network=None, paths=SimpleNamespace(upper_disk=tmp_path / "u.img"),
    )  # fmt: skip


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    from matchlock.sandbox import snapshots
    from matchlock.vm import checkpoint

    log: list[str] = []

    async def step(name: str, *_: object) -> None:
        log.append(name)

    async def park(sandbox) -> None:
        log.append("agent park")

    monkeypatch.setattr(snapshots, "_park", park)
    monkeypatch.setattr(snapshots, "_wake", lambda sandbox: log.append("agent wake"))
    monkeypatch.setattr(checkpoint, "pause", lambda m: step("stop"))
    monkeypatch.setattr(checkpoint, "resume", lambda m: step("cont"))

    async def save_memory(machine, path, ram) -> checkpoint.SavedRam:
        log.append("save memory")
        return checkpoint.SavedRam.COPIED

    monkeypatch.setattr(checkpoint, "save_memory", save_memory)
    monkeypatch.setattr(checkpoint, "copy_disk", lambda source, target: log.append("copy upper"))
    monkeypatch.setattr(checkpoint, "release_saved_pages", lambda m: None)
    return log


def test_a_full_snapshot_parks_the_agent_before_the_vfs_and_wakes_both(fakes, tmp_path):
    from matchlock.sandbox import snapshots

    store = StateStore(tmp_path / "state")
    try:
        record = asyncio.run(snapshots.create(_sandbox(tmp_path, fakes), store, "s1", "full"))
        assert record.name == "s1"
    finally:
        store.close()
    assert fakes == ["agent park", "vfs park", "stop", "save memory", "copy upper", "vfs save nodes=True",
                     "cont", "agent wake", "vfs wake"]  # fmt: skip


@pytest.mark.parametrize(("fail", "woken"), [("park", ["agent wake"]), ("save", ["agent wake", "vfs wake"])])
def test_a_failed_vfs_park_or_save_wakes_the_guest_and_leaves_no_snapshot(fakes, tmp_path, fail, woken):
    from matchlock.sandbox import snapshots
    from matchlock.state import snapshots as records

    store = StateStore(tmp_path / "state")
    try:
        with pytest.raises(MatchlockError):
            asyncio.run(snapshots.create(_sandbox(tmp_path, fakes, fail), store, "s1", "full"))
        assert records.get(store, "s1") is None and not records.snapshot_dir(store, "s1").exists()
    finally:
        store.close()
    assert [step for step in fakes if "wake" in step] == woken


def test_an_agent_wake_that_fails_still_wakes_the_vfs(fakes, tmp_path, monkeypatch):
    from matchlock.sandbox import snapshots

    def broken(sandbox) -> None:
        fakes.append("agent wake")
        raise ConnectionResetError("the agent's channel closed")

    monkeypatch.setattr(snapshots, "_wake", broken)
    store = StateStore(tmp_path / "state")
    try:
        with pytest.raises(ConnectionResetError):
            asyncio.run(snapshots.create(_sandbox(tmp_path, fakes), store, "s1", "full"))
    finally:
        store.close()
    assert fakes[-2:] == ["agent wake", "vfs wake"]


@pytest.mark.parametrize("mode", ["full", "filesystem"])
def test_a_cancelled_snapshot_wakes_the_vfs_only_once_its_save_has_ended(fakes, tmp_path, mode):
    import threading

    from matchlock.sandbox import snapshots

    sandbox = _sandbox(tmp_path, fakes)
    started, release = threading.Event(), threading.Event()

    def save(directory, *, with_nodes: bool) -> None:
        started.set()
        release.wait(30)  # reading the router: a wake meanwhile would let the guest change it
        fakes.append("vfs save ended")

    async def synced(spec) -> None:
        fakes.append("sync")

    sandbox.vfs.save, sandbox.exec = save, synced

    async def main() -> None:
        task = asyncio.ensure_future(snapshots.create(sandbox, store, "s1", mode))
        await asyncio.to_thread(started.wait, 30)
        task.cancel()
        for _ in range(20):  # the cancelled create's cleanup runs in these turns, unless it waits for the save
            await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    store = StateStore(tmp_path / "state")
    try:
        asyncio.run(main())
    finally:
        release.set()
        store.close()
    assert fakes.index("vfs save ended") < fakes.index("vfs wake")


def test_a_filesystem_snapshot_saves_the_mounts_content_without_nodes(fakes, tmp_path):
    from matchlock.sandbox import snapshots

    sandbox = _sandbox(tmp_path, fakes)

    async def synced(spec) -> None:
        fakes.append("sync")

    sandbox.exec = synced
    store = StateStore(tmp_path / "state")
    try:
        asyncio.run(snapshots.create(sandbox, store, "s1", "filesystem"))
        assert fakes == ["sync", "vfs park", "stop", "copy upper", "vfs save nodes=False", "cont", "vfs wake"]
        fakes.clear()
        sandbox.paused = True  # the daemon must run to park: resumed for that, then stopped and left so
        asyncio.run(snapshots.create(sandbox, store, "s2", "filesystem"))
        # The `stop` after the wake is a no-op (stopped already); it stops a guest whose sync or park failed.
        assert fakes == ["cont", "sync", "vfs park", "stop", "copy upper", "vfs save nodes=False", "vfs wake", "stop"]
        assert sandbox.paused
        # Without mounts it runs for the sync too: copied while stopped without it, the upper disk lacked
        # what the guest had written shortly before the pause (still in its page cache).
        fakes.clear()
        sandbox.vfs, sandbox.config = None, SandboxConfig(image="img")
        asyncio.run(snapshots.create(sandbox, store, "s3", "filesystem"))
    finally:
        store.close()
    assert fakes == ["cont", "sync", "stop", "copy upper", "stop"] and sandbox.paused


def test_a_paused_sandbox_whose_sync_fails_is_stopped_again_and_left_no_snapshot(fakes, tmp_path):
    from matchlock.sandbox import snapshots

    sandbox = _sandbox(tmp_path, fakes)

    async def failing(spec) -> None:
        fakes.append("sync")
        raise VMError("the guest did not answer")

    sandbox.exec, sandbox.paused = failing, True
    store = StateStore(tmp_path / "state")
    try:
        with pytest.raises(VMError, match="did not answer"):
            asyncio.run(snapshots.create(sandbox, store, "s1", "filesystem"))
        assert store.conn.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0] == 0
    finally:
        store.close()
    assert fakes == ["cont", "sync", "stop"] and sandbox.paused


def test_sdk_fork_clones_leave_the_mounts_to_the_snapshot(tmp_path):
    from matchlock.sdk import calls
    from matchlock.sdk.builder import Sandbox as Box

    parent = Box("alpine").with_workspace("/workspace").mount_memory("/workspace").options()
    _, clone = calls.fork_plan(parent, 1)
    assert (clone.mounts, clone.workspace, clone.vfs_interception) == ({}, "", None)  # RPC create refuses them
    assert list(parent.mounts) == ["/workspace"]  # the parent's own options are untouched


def test_preparing_twice_keeps_the_mounts(tmp_path):
    restore = _restore(tmp_path, _source_vfs(tmp_path))
    once = restore.prepare(_bare())
    assert restore.prepare(once).vfs == once.vfs  # `run` prepares in the CLI, then again in the owner
