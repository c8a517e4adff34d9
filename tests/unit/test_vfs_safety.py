"""A hostile guest against host_fs and overlay: no path leads outside the mount root."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from vfs_kit import Guest

from matchlock.vfs import hostdir
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.overlay import OverlayProvider
from matchlock.vfs.router import Mount
from matchlock.vfs.types import FsError, Limits
from matchlock.wire import vfs as wire


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "share"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("top secret")
    (root / "etc").symlink_to("/etc")
    (root / "out").symlink_to(outside)
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "dir").mkdir()
    return root, outside


@pytest.fixture(params=["openat2", "walk"])
def resolution(request, monkeypatch):
    """Both ways of resolving beneath the root: openat2, and the O_NOFOLLOW walk of older kernels."""
    monkeypatch.setattr(hostdir, "_openat2_works", request.param == "openat2")
    return request.param


async def test_host_symlinks_never_lead_outside(tree, resolution) -> None:
    root, outside = tree
    guest = Guest([Mount("/w", HostFSProvider(str(root)))])
    try:
        for path in ("/w/etc/passwd", "/w/out/secret", "/w/etc/hostname"):
            with pytest.raises(FsError) as caught:
                await guest.stat(path)
            assert caught.value.errno == errno.ENOTDIR, path
        # The link itself is visible as a link, and opening it never follows it.
        node = await guest.node("/w/passwd")
        assert await guest.call(wire.Readlink(node)) == b"/etc/passwd"
        assert await guest.errno_of(wire.Open(node, os.O_RDONLY)) in (errno.ENOTDIR, errno.ELOOP, errno.EACCES)
        out = await guest.node("/w/out")
        assert await guest.errno_of(wire.Create(out, os.O_RDWR, 0o644, b"planted")) == errno.ENOTDIR
        assert await guest.errno_of(wire.Opendir(out, 0)) == errno.ENOTDIR
        assert os.listdir(outside) == ["secret"]
    finally:
        guest.close()


async def test_dot_dot_and_bad_names_are_refused(tree) -> None:
    root, _ = tree
    guest = Guest([Mount("/w", HostFSProvider(str(root)))])
    try:
        base = await guest.node("/w/dir")
        for name in (b"..", b".", b"a/b", b"x" * 256):
            assert await guest.errno_of(wire.Lookup(base, name)) in (errno.EINVAL, errno.ENAMETOOLONG), name
    finally:
        guest.close()


async def test_directory_swapped_for_a_symlink_cannot_escape(tree, resolution) -> None:
    root, outside = tree
    guest = Guest([Mount("/w", HostFSProvider(str(root)))])
    try:
        node = await guest.node("/w/dir")
        # The host (or a racing writer) replaces the directory the guest holds by a link outside.
        os.rmdir(root / "dir")
        (root / "dir").symlink_to(outside)
        assert await guest.errno_of(wire.Lookup(node, b"secret")) == errno.ENOTDIR
        assert await guest.errno_of(wire.Create(node, os.O_RDWR, 0o644, b"planted")) == errno.ENOTDIR
        assert await guest.errno_of(wire.Opendir(node, 0)) == errno.ENOTDIR
        assert os.listdir(outside) == ["secret"]
    finally:
        guest.close()


async def test_devices_and_fifos_on_the_host_are_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    os.mkfifo(root / "fifo")  # opening it for reading would block a thread forever
    (root / "null").symlink_to("/dev/null")
    guest = Guest([Mount("/w", HostFSProvider(str(root)))])
    try:
        assert await guest.errno_of(wire.Open(await guest.node("/w/fifo"), os.O_RDONLY)) == errno.EACCES
        parent = await guest.node("/w")
        mknod = wire.Mknod(parent, 0o20644, os.makedev(1, 3), b"mem")  # a character device
        assert await guest.errno_of(mknod) == errno.EPERM
        assert not (root / "mem").exists()
        # A socket node is allowed: an inert inode (the guest's socket stays in the guest kernel).
        sock = await guest.call(wire.Mknod(parent, stat.S_IFSOCK | 0o755, 0, b"sock"))
        assert isinstance(sock, wire.Entry) and stat.S_ISSOCK(os.lstat(root / "sock").st_mode)
        assert await guest.errno_of(wire.Open(await guest.node("/w/sock"), os.O_RDONLY)) == errno.ENXIO  # as open(2)
    finally:
        guest.close()


async def test_overlay_lower_symlinks_stay_inside(tree, tmp_path: Path) -> None:
    root, outside = tree
    guest = Guest([Mount("/w", OverlayProvider(str(root), str(tmp_path / "state" / "o")))])
    try:
        with pytest.raises(FsError):
            await guest.stat("/w/out/secret")
        out = await guest.node("/w/out")
        assert await guest.errno_of(wire.Create(out, os.O_RDWR, 0o644, b"x")) == errno.ENOTDIR
        assert os.listdir(outside) == ["secret"]
    finally:
        guest.close()


async def test_memory_mount_is_bounded(tmp_path: Path) -> None:
    guest = Guest([Mount("/m", MemoryProvider(Limits(memory_bytes=1 << 20)))])
    try:
        await guest.write("/m/a", b"x" * (1 << 19))
        with pytest.raises(FsError) as caught:
            await guest.write("/m/b", b"x" * (1 << 20))
        assert caught.value.errno == errno.ENOSPC
        # Larger than the whole mount could ever hold: the file's maximum size (pjdfstest ftruncate/12.t).
        with pytest.raises(FsError) as caught:
            await guest.truncate("/m/a", (1 << 20) + 1)
        assert caught.value.errno == errno.EFBIG
    finally:
        guest.close()


@pytest.mark.parametrize("kind", ["host_fs", "overlay"])
async def test_a_path_longer_than_path_max_still_resolves(tmp_path: Path, resolution, kind: str) -> None:
    # pjdfstest mkdir/03.t: the guest walks to a directory whose path from the mount root is over
    # PATH_MAX; openat2 refuses that in one string, so the host opens it a name at a time.
    root = tmp_path / "share"
    root.mkdir()
    made = HostFSProvider(str(root)) if kind == "host_fs" else OverlayProvider(str(root), str(tmp_path / "up"))
    guest = Guest([Mount("/w", made)])
    try:
        names = [f"{i:02d}" + "d" * 200 for i in range(22)]  # 22 * 203 bytes: past 4096
        for depth in range(1, len(names) + 1):
            await guest.mkdir("/w/" + "/".join(names[:depth]))
        deepest = "/w/" + "/".join(names)
        await guest.write(deepest + "/f", b"deep")
        assert await guest.read(deepest + "/f") == b"deep"
        await guest.unlink(deepest + "/f")
        await guest.rmdir(deepest)
    finally:
        guest.close()
