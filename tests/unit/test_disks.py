"""`--disk` / `extra_disks` parsing and validation, the guest's view of them, and raw-image locks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from matchlock.api import disks as api_disks
from matchlock.api.config import SandboxConfig, public_config
from matchlock.api.disks import DiskMount, parse_disk, parse_disks, validate_disks
from matchlock.api.errors import UsageError
from matchlock.guest.disks import initialise_owner
from matchlock.rpc.params import parse_create
from matchlock.sandbox import disks as sandbox_disks
from matchlock.state.volumes import VolumeBusyError, VolumeError, VolumeStore
from matchlock.wire import boot
from matchlock.wire.agent import GuestConfig, GuestDisk


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "data.ext4"
    path.write_bytes(b"")
    return path


def test_named_volume_with_mode_and_owner() -> None:
    assert parse_disk("@cache:/var/cache:ro,uid=1000,gid=100") == DiskMount("@cache", "/var/cache", True, 1000, 100)
    disk = parse_disk("@pg:/var/lib/postgresql")
    assert (disk.volume, disk.readonly, disk.owner_uid) == ("pg", False, None)
    assert parse_disk("@pg:/d:rw").readonly is False
    assert parse_disk("@pg:/d:readonly").readonly is True


def test_raw_image_is_made_absolute(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image.parent)
    disk = parse_disk("data.ext4:/data:ro")
    assert disk == DiskMount(str(image), "/data", True)
    assert disk.volume == ""


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("@v", "use HOST_PATH:/guest/path"),
        ("@v:/a:ro:x", "use HOST_PATH:/guest/path"),
        (":/data", "use HOST_PATH:/guest/path"),
        ("@v:/data:rx", "mode 'rx' must be ro, readonly or rw"),
        ("@v:/data,uid=x", "uid='x' must be a whole number"),
        ("@v:/data,uid=1,uid=2", "uid is given twice"),
        ("@v:/data,mode=1", "unknown option 'mode=1'"),
        ("/no/such/image.ext4:/data", "/no/such/image.ext4 does not exist"),
        ("@v:data", "must be an absolute path"),
        ("@v:/", "cannot replace the root"),
        ("@v:/data/", "write it normalized, as '/data'"),
        ("@v:/a/../b", "write it normalized, as '/b'"),
        ("@v://data", "write it normalized, as '/data'"),
        ("@v:/da ta", "letters, digits"),
        ("@v:/proc", "/proc is the guest's own"),
        ("@v:/sys/fs", "/sys is the guest's own"),
        ("@v:/dev/x", "/dev is the guest's own"),
        ("@v:/run/matchlock/rt", "/run/matchlock is the guest's own"),
    ],
)
def test_bad_specs_name_the_value_and_the_fix(spec: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_disk(spec)
    assert fragment in str(caught.value)


def test_lookalikes_of_reserved_paths_are_fine() -> None:
    assert parse_disk("@v:/process").guest_mount == "/process"
    assert parse_disk("@v:/run/other").guest_mount == "/run/other"


def test_duplicates_and_the_limit(image: Path) -> None:
    with pytest.raises(UsageError, match="two disks are mounted at /data"):
        parse_disks(["@a:/data", "@b:/data"])
    with pytest.raises(UsageError, match="is given twice"):
        parse_disks([f"{image}:/a", f"{image.parent}/./data.ext4:/b"])
    specs = [f"@v{i}:/d{i}" for i in range(api_disks.MAX_EXTRA_DISKS + 1)]
    with pytest.raises(UsageError, match=f"at most {api_disks.MAX_EXTRA_DISKS}"):
        parse_disks(specs)
    assert len(parse_disks(specs[:-1])) == api_disks.MAX_EXTRA_DISKS


def test_host_and_guest_agree_on_the_limit() -> None:
    assert api_disks.MAX_EXTRA_DISKS == boot.MAX_EXTRA_DISKS


def test_config_validates_and_records_disks_without_secrets() -> None:
    disk = DiskMount("@cache", "/cache", owner_uid=5)
    config = SandboxConfig(image="alpine", extra_disks=(disk,), env={"TOKEN": "s3cret"})
    config.validate()
    recorded = public_config(config)
    assert recorded["extra_disks"] == [{"host_path": "@cache", "guest_mount": "/cache", "readonly": False,
                                        "owner_uid": 5}]  # fmt: skip
    assert "s3cret" not in repr(recorded)
    with pytest.raises(UsageError, match="uid=-1"):
        SandboxConfig(image="a", extra_disks=(DiskMount("@c", "/c", owner_uid=-1),)).validate()
    with pytest.raises(UsageError, match="is not absolute"):
        validate_disks((DiskMount("rel.img", "/c"),))


def test_rpc_extra_disks_parse_into_disk_mounts() -> None:
    params = {"image": "a", "extra_disks": [
        {"host_path": "@cache", "guest_mount": "/cache", "readonly": True, "owner_uid": 1, "owner_gid": 2},
        {"host_path": "/img.ext4", "guest_mount": "/img"},
    ]}  # fmt: skip
    assert parse_create(params).config.extra_disks == (
        DiskMount("@cache", "/cache", True, 1, 2),
        DiskMount("/img.ext4", "/img"),
    )


def test_guest_disk_round_trip_and_refusals() -> None:
    disks = sandbox_disks.guest_disks((DiskMount("@a", "/a"), DiskMount("/b.img", "/b", True, 7, 8)))
    assert disks == (GuestDisk("disk0", "/a", False, -1, -1), GuestDisk("disk1", "/b", True, 7, 8))
    config = GuestConfig(hostname="h", time_ns=1, disks=disks)
    assert GuestConfig.parse(config.to_wire()) == config
    for bad in (
        {"serial": "upper", "mount": "/a"},
        {"serial": f"disk{boot.MAX_EXTRA_DISKS}", "mount": "/a"},
        {"serial": "disk0", "mount": "a"},
        {"serial": "disk0", "mount": "/"},
        {"serial": "disk0", "mount": "/a/../proc"},
        {"serial": "disk0", "mount": "/proc/1"},
        {"serial": "disk0", "mount": "/run/matchlock"},
        {"serial": "disk0", "mount": "/a", "owner_uid": 2**32 - 1},
        {"serial": "disk0", "mount": "/a", "readonly": 1},
    ):
        with pytest.raises(ValueError):
            GuestDisk.parse(bad)
    twice = {**config.to_wire(), "disks": [disks[0].to_wire(), {**disks[1].to_wire(), "mount": "/a"}]}
    with pytest.raises(ValueError, match="repeats"):
        GuestConfig.parse(twice)


def test_owner_is_set_only_on_a_fresh_root(tmp_path: Path) -> None:
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    for root in (fresh, used):
        (root / "lost+found").mkdir(parents=True)
    (used / "file").write_text("x")
    initialise_owner(str(fresh), 1234, 5678)
    initialise_owner(str(used), 1234, 5678)
    assert (fresh.stat().st_uid, fresh.stat().st_gid) == (1234, 5678)
    assert (used.stat().st_uid, used.stat().st_gid) == (0, 0)
    initialise_owner(str(fresh), 1, 1)  # no longer root-owned: an earlier attach's owner stays
    assert fresh.stat().st_uid == 1234


def _locker(path: Path, shared: bool) -> subprocess.Popen:
    """Another process holding a flock on `path` until its stdin closes."""
    code = (
        "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDONLY);"
        f"fcntl.flock(fd, fcntl.{'LOCK_SH' if shared else 'LOCK_EX'}); print('locked', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
    return proc


def test_raw_image_lock_names_the_holder(image: Path) -> None:
    holder = _locker(image, shared=False)
    try:
        with pytest.raises(VolumeBusyError) as caught, sandbox_disks.hold_raw_image(image, readonly=True):
            pass
        assert f"pid {holder.pid}" in str(caught.value)
    finally:
        holder.communicate(b"")
    with sandbox_disks.hold_raw_image(image, readonly=False):
        pass


def test_raw_image_read_only_attaches_share(image: Path) -> None:
    holder = _locker(image, shared=True)
    try:
        with sandbox_disks.hold_raw_image(image, readonly=True):
            pass
        with (
            pytest.raises(VolumeBusyError, match=f"pid {holder.pid}"),
            sandbox_disks.hold_raw_image(image, readonly=False),
        ):
            pass
    finally:
        holder.communicate(b"")


async def test_attach_locks_checks_and_names_serials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = VolumeStore(tmp_path / "volumes")
    monkeypatch.setattr(sandbox_disks, "VolumeStore", lambda: store)
    store.create("cache", 16)
    raw = tmp_path / "raw.ext4"
    raw.write_bytes(b"\0" * 4096)  # no superblock
    with contextlib.ExitStack() as holds:
        attached = await sandbox_disks.attach((DiskMount("@cache", "/c"),), "sandbox vm-1 (pid 1)", holds)
        assert [(d.path, d.serial, d.readonly) for d in attached] == [(store.path_of("cache"), "disk0", False)]
        with pytest.raises(VolumeBusyError, match=r"sandbox vm-1 \(pid 1\)"):
            store.remove("cache")
        # The same image spelled as a path is the same volume, and as busy.
        with pytest.raises(VolumeBusyError, match="vm-1"), contextlib.ExitStack() as other:
            await sandbox_disks.attach((DiskMount(str(store.path_of("cache")), "/c"),), "sandbox vm-2", other)
    store.remove("cache")
    with pytest.raises(VolumeError, match="is not an ext4 image"), contextlib.ExitStack() as holds:
        await sandbox_disks.attach((DiskMount(str(raw), "/r"),), "sandbox vm-3", holds)
    assert os.path.exists(raw)
