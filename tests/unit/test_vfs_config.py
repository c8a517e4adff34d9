"""VFS configuration: `-v` specs, the workspace rules, and disks shadowed by mounts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from matchlock.api.config import SandboxConfig
from matchlock.api.disks import DiskMount
from matchlock.api.errors import UsageError
from matchlock.api.vfs import MountConfig, VFSConfig, build_vfs, parse_volume_spec, split_volume_flags


def test_volume_specs(tmp_path: Path) -> None:
    host = str(tmp_path)
    assert parse_volume_spec(f"{host}:src", "/workspace") == ("/workspace/src", MountConfig("overlay", host))
    assert parse_volume_spec(f"{host}:/root/.ssh:ro", "") == ("/root/.ssh", MountConfig("host_fs", host, True))
    assert parse_volume_spec(f"{host}:/w/x:host_fs,uid=1000,gid=50", "/w") == (
        "/w/x",
        MountConfig("host_fs", host, False, 1000, 50),
    )


@pytest.mark.parametrize(
    ("spec", "workspace", "fragment"),
    [
        ("{h}", "/w", "use HOST:GUEST"),
        ("{h}:rel", "", "relative guest path 'rel' needs --workspace"),
        ("{h}:/w/x:rw", "/w", "unknown option 'rw'"),
        ("{h}:/w/x:host_fs,uid=x", "/w", "option 'uid=x' must be uid=N or gid=N"),
        (
            "{h}:/w/x,uid=5",
            "/w",
            "uid=/gid= apply only to host_fs and ro mounts, not overlay; fix: {h}:/w/x:host_fs,uid=5",
        ),
        ("{h}:/w/x:host_fs,foo=1", "/w", "invalid -v '{h}:/w/x:host_fs,foo=1': option 'foo=1' must be uid=N"),
        ("{h}:/w/x:host_fs,uid=1,uid=2", "/w", "uid= is given twice"),
        ("{h}/f/:/w/x:host_fs", "/w", "host path {h}/f/ is not a directory; fix: drop the trailing '/'"),
        ("{h}/f:/w/x", "/w", "invalid -v '{h}/f:/w/x': vfs mount /w/x: overlay host_path {h}/f is not a directory"),
        ("/dev/null:/w/x:host_fs", "/w", "/dev/null is neither a directory nor a regular file"),
        ("{h}/fifo:/w/x:ro", "/w", "/fifo is neither a directory nor a regular file"),
        ("{h}/missing:/w/x", "/w", "does not exist"),
        ("{h}:/proc/x", "/w", "/proc is the guest's"),
        ("{h}:/", "/w", "cannot replace the guest's root"),
    ],
)
def test_bad_volume_specs_name_the_value(tmp_path: Path, spec: str, workspace: str, fragment: str) -> None:
    (tmp_path / "f").write_text("a file")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UsageError) as caught:
        build_vfs(workspace, split_volume_flags([spec.format(h=tmp_path)]))
    assert fragment.format(h=tmp_path) in str(caught.value)


def test_comma_split_keeps_owner_options_with_their_spec() -> None:
    assert split_volume_flags(["/a:/w/a,/b:/w/b:host_fs,uid=1,gid=2", "/c:/w/c"]) == [
        "/a:/w/a",
        "/b:/w/b:host_fs,uid=1,gid=2",
        "/c:/w/c",
    ]
    # Any key=value item with no ':' is an option of the spec before it (an error then names that spec).
    assert split_volume_flags(["/a:/w/a:host_fs,foo=1,/b:/w/b"]) == ["/a:/w/a:host_fs,foo=1", "/b:/w/b"]


def test_workspace_without_mounts_is_refused() -> None:
    with pytest.raises(UsageError, match="needs at least one -v"):
        build_vfs("/workspace", [])
    with pytest.raises(UsageError, match="has no mounts"):
        VFSConfig(workspace="/workspace").validate()


def test_a_workspace_with_no_mount_at_or_under_it_is_refused(tmp_path: Path) -> None:
    # Mounts may be anywhere, but a workspace nothing makes left every command running in / silently.
    with pytest.raises(UsageError, match=r"vfs workspace /ws holds no mount \(they are at /other\); fix: mount"):
        build_vfs("/ws", [f"{tmp_path}:/other:host_fs"])
    assert build_vfs("/ws", [f"{tmp_path}:sub", f"{tmp_path}:/other:host_fs"]).workspace == "/ws"
    assert build_vfs("/ws", [f"{tmp_path}:/ws"]).workspace == "/ws"
    with pytest.raises(UsageError, match="holds no mount"):
        build_vfs("/ws", [f"{tmp_path}:/wsx"])  # a sibling with the same prefix is not under it


def test_disks_shadowed_by_mounts_are_refused(tmp_path: Path) -> None:
    vfs = VFSConfig(
        workspace="/workspace", mounts={"/workspace": MountConfig("memory"), "/srv/h": MountConfig("memory")}
    )
    for mount in ("/workspace/cache", "/srv/h/db"):
        config = SandboxConfig(image="a", extra_disks=(DiskMount("@v", mount),), vfs=vfs)
        with pytest.raises(UsageError, match="would shadow it"):
            config.validate()
    SandboxConfig(image="a", extra_disks=(DiskMount("@v", "/data"),), vfs=vfs).validate()


def test_overlay_needs_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(UsageError, match="is not a directory; fix: use host_fs"):
        MountConfig("overlay", str(file)).validate("/w")
    MountConfig("host_fs", str(file)).validate("/w")  # a single-file mount
