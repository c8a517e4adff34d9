"""The agent's own files (hostname, hosts, resolv.conf, the sandbox CA) are never written into a VFS mount.

Before: `-v ./hosts:/etc/hosts:ro` failed the start (EROFS), `-v ./hosts:/etc/hosts:host_fs` had the
host's file overwritten with the sandbox's hosts, and `-v certs:/etc/ssl/certs:host_fs` with interception
appended the sandbox CA to the host's bundle and left matchlock-ca.crt in the host directory.
"""

from __future__ import annotations

from matchlock.guest import agent
from matchlock.guest import checkpoint as guest_checkpoint
from matchlock.guest.etcfiles import EtcFiles, vfs_mount_points
from matchlock.wire.boot import CA_FALLBACK_PATHS, CA_PATH

MOUNTINFO = """\
22 1 254:1 / / rw,relatime - overlay overlay rw,lowerdir=/run/boot/lower
30 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,mode=755
41 22 0:40 / /etc/hosts rw,nosuid,nodev,relatime - fuse.matchlock matchlock ro,user_id=0,group_id=0
42 22 0:41 / /etc/ssl/certs rw,nosuid,nodev,relatime shared:5 - fuse.matchlock matchlock rw,user_id=0
43 22 0:42 / /workspace/ov rw,nosuid,nodev,relatime - overlay overlay rw,lowerdir=/run/matchlock/vfs-lower/7
"""


def test_the_fuse_daemons_mount_points_are_read_from_mountinfo(tmp_path):
    (tmp_path / "mountinfo").write_text(MOUNTINFO)
    # A guest-local overlay is the sandbox's own disk, written like the rest of the root: not listed.
    assert vfs_mount_points(str(tmp_path / "mountinfo")) == ("/etc/hosts", "/etc/ssl/certs")
    assert vfs_mount_points(str(tmp_path / "absent")) == ()


def test_a_file_at_or_under_a_mount_point_is_left_alone(tmp_path):
    mounted, free = tmp_path / "mounted", tmp_path / "free"
    mounted.mkdir()
    free.mkdir()
    (mounted / "hosts").write_text("the user's\n")
    (tmp_path / "via-link").symlink_to(mounted)  # its directory is resolved before the check
    etc = EtcFiles((str(mounted), str(free / "single")))
    assert not etc.write(str(mounted / "hosts"), "generated\n")
    assert not etc.write(str(tmp_path / "via-link" / "hosts"), "generated\n")
    assert not etc.write(str(free / "single"), "generated\n")  # a single-file mount is its own point
    assert (mounted / "hosts").read_text() == "the user's\n"
    assert not (free / "single").exists()
    assert etc.write(str(free / "hosts"), "generated\n") and (free / "hosts").read_text() == "generated\n"
    assert not EtcFiles(()).on_mount(str(mounted / "hosts"))


def test_the_ca_goes_outside_the_mounts_and_a_mounted_bundle_is_not_appended_to(tmp_path, monkeypatch):
    certs, etc_dir = tmp_path / "certs", tmp_path / "etc"
    certs.mkdir()
    etc_dir.mkdir()
    (certs / "ca-certificates.crt").write_text("HOST-ROOTS\n")
    paths = (str(certs / "matchlock-ca.crt"), str(etc_dir / "matchlock-ca.crt"), str(tmp_path / "last.crt"))
    monkeypatch.setattr(agent, "SYSTEM_BUNDLES", (str(certs / "ca-certificates.crt"),))
    etc = EtcFiles((str(certs),), ca_paths=paths)
    assert agent._install_ca("SANDBOX-CA\n", etc) == paths[1]  # the host points TLS clients there
    assert (etc_dir / "matchlock-ca.crt").read_text() == "SANDBOX-CA\n"
    assert sorted(p.name for p in certs.iterdir()) == ["ca-certificates.crt"]
    assert (certs / "ca-certificates.crt").read_text() == "HOST-ROOTS\n"
    # A restored clone swaps the CA where it is, and still leaves the mounted bundle alone.
    assert guest_checkpoint.replace_ca("NEW-CA\n", etc, agent.SYSTEM_BUNDLES) == paths[1]
    assert (etc_dir / "matchlock-ca.crt").read_text() == "NEW-CA\n"
    assert (certs / "ca-certificates.crt").read_text() == "HOST-ROOTS\n"


def test_without_mounts_the_ca_joins_the_bundle_at_ca_path(tmp_path, monkeypatch):
    bundle = tmp_path / "bundle.crt"
    bundle.write_text("SYSTEM-ROOTS\n")
    monkeypatch.setattr(agent, "SYSTEM_BUNDLES", (str(bundle),))
    etc = EtcFiles((), ca_paths=(str(tmp_path / "matchlock-ca.crt"), str(tmp_path / "fallback.crt")))
    assert agent._install_ca("CA\n", etc) == str(bundle)
    assert (tmp_path / "matchlock-ca.crt").read_text() == "CA\n"
    assert bundle.read_text() == "SYSTEM-ROOTS\n\nCA\n"
    assert not (tmp_path / "fallback.crt").exists()


def test_the_ca_paths_are_the_shared_constants():
    assert EtcFiles(()).ca_paths == (CA_PATH, *CA_FALLBACK_PATHS)
    assert EtcFiles(("/etc/ssl/certs",)).ca_path() == CA_FALLBACK_PATHS[0]
    assert EtcFiles(("/etc",)).ca_path() == CA_FALLBACK_PATHS[1]
