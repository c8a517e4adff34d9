"""The overlay provider: copy-on-write over a host directory that stays byte-for-byte unchanged."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest
from vfs_kit import Guest

from matchlock.vfs.overlay import OverlayProvider
from matchlock.vfs.router import Mount
from matchlock.wire import vfs as wire


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path below root with its mode and content digest (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            body = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else b""
            digest = hashlib.sha256(body.encode() if isinstance(body, str) else body).hexdigest()
            out[str(path.relative_to(root))] = (st.st_mode, digest)
    return out


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = tmp_path / "lower"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("a = 1\n")
    (root / "pkg" / "sub" / "b.py").write_text("b = 2\n")
    (root / "README").write_text("readme\n")
    (root / "link").symlink_to("README")
    return root


@pytest.fixture
async def overlay(lower: Path, tmp_path: Path):
    provider = OverlayProvider(str(lower), str(tmp_path / "state" / "overlay-0"))
    guest = Guest([Mount("/w", provider)])
    yield guest, provider
    guest.close()


async def test_nothing_is_copied_until_written(overlay, lower: Path, tmp_path: Path) -> None:
    guest, provider = overlay
    before = snapshot(lower)
    assert await guest.read("/w/pkg/sub/b.py") == b"b = 2\n"
    assert await guest.listdir("/w/pkg", plus=True) == ["a.py", "sub"]
    assert os.listdir(provider.upper_path) == []  # reads copied nothing up
    await guest.write("/w/pkg/a.py", b"a = 10\n")
    assert sorted(os.listdir(Path(provider.upper_path) / "pkg")) == ["a.py"]  # only the written file
    assert await guest.read("/w/pkg/a.py") == b"a = 10\n"
    assert snapshot(lower) == before


async def test_deletes_renames_and_recreates_leave_the_host_unchanged(overlay, lower: Path) -> None:
    guest, provider = overlay
    before = snapshot(lower)
    await guest.unlink("/w/README")
    assert "README" not in await guest.listdir("/w")
    assert await guest.errno_of(wire.Lookup(await guest.node("/w"), b"README")) == errno.ENOENT
    await guest.write("/w/README", b"new\n")
    assert await guest.read("/w/README") == b"new\n"
    # A directory renamed: its lower content moves with it, and the old name is gone.
    await guest.rename("/w/pkg", "/w/lib")
    assert await guest.listdir("/w/lib") == ["a.py", "sub"]
    assert await guest.read("/w/lib/sub/b.py") == b"b = 2\n"
    assert "pkg" not in await guest.listdir("/w")
    # Made again where one was deleted, a directory is opaque: the lower's entries stay hidden.
    await guest.mkdir("/w/pkg")
    assert await guest.listdir("/w/pkg") == []
    await guest.chmod("/w/lib/a.py", 0o600)
    assert (await guest.stat("/w/lib/a.py")).mode & 0o777 == 0o600
    await guest.truncate("/w/lib/sub/b.py", 1)
    assert await guest.read("/w/lib/sub/b.py") == b"b"
    await guest.rmdir("/w/pkg")
    assert sorted(await guest.listdir("/w")) == ["README", "lib", "link"]
    assert snapshot(lower) == before


async def test_rmdir_of_a_lower_directory_needs_it_empty(overlay, lower: Path) -> None:
    guest, _ = overlay
    assert await guest.errno_of(wire.Rmdir(await guest.node("/w"), b"pkg")) == errno.ENOTEMPTY  # two entries
    assert await guest.errno_of(wire.Rmdir(await guest.node("/w/pkg"), b"sub")) == errno.ENOTEMPTY
    await guest.unlink("/w/pkg/sub/b.py")
    await guest.rmdir("/w/pkg/sub")
    assert await guest.listdir("/w/pkg") == ["a.py"]
    assert (lower / "pkg" / "sub" / "b.py").exists()


async def test_close_removes_the_private_copy(lower: Path, tmp_path: Path) -> None:
    provider = OverlayProvider(str(lower), str(tmp_path / "state" / "overlay-0"))
    guest = Guest([Mount("/w", provider)])
    await guest.write("/w/new.txt", b"x")
    upper = Path(provider.upper_path)
    assert (upper / "new.txt").exists()
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"  # no host user reaches the copy
    guest.close()
    assert not upper.exists()
    assert not (lower / "new.txt").exists()


async def _listed_inos(guest: Guest, path: str) -> dict[str, int]:
    node = await guest.node(path)
    opened = await guest.call(wire.Opendir(node, 0))
    assert isinstance(opened, wire.Opened)
    page = await guest.call(wire.Readdir(node, opened.fh, 0, 4096, 0))
    await guest.call(wire.Releasedir(node, opened.fh))
    assert isinstance(page, tuple)
    return {e.name.decode(): e.ino for e in page}


async def test_a_copied_up_file_keeps_its_inode_number(overlay, lower: Path) -> None:
    guest, _ = overlay
    before = (await guest.stat("/w/pkg/a.py")).ino
    assert (await _listed_inos(guest, "/w/pkg"))["a.py"] == before
    await guest.write("/w/pkg/a.py", b"a = 2\n")  # copies the file (and pkg) up
    assert (await guest.stat("/w/pkg/a.py")).ino == before
    assert (await _listed_inos(guest, "/w/pkg"))["a.py"] == before
    node = await guest.node("/w/pkg/a.py")
    opened = await guest.call(wire.Open(node, os.O_RDWR))
    assert isinstance(opened, wire.Opened)
    by_handle = await guest.call(wire.Getattr(node, opened.fh))
    assert isinstance(by_handle, wire.AttrReply) and by_handle.attr.ino == before
    await guest.call(wire.Release(node, opened.fh))
    # Renamed with its whole directory, and hard-linked, it is still the same inode.
    await guest.rename("/w/pkg", "/w/moved")
    assert (await guest.stat("/w/moved/a.py")).ino == before
    await guest.call(wire.Link(await guest.node("/w/moved/a.py"), await guest.node("/w/moved"), b"hard.py"))
    assert (await guest.stat("/w/moved/hard.py")).ino == before
    assert (lower / "pkg" / "a.py").read_text() == "a = 1\n"


async def test_rename_of_one_hard_link_onto_another_does_nothing(overlay, lower: Path) -> None:
    # rename(2) of two names of one file leaves both; the overlay used to remove the source.
    guest, _ = overlay
    os.link(lower / "README", lower / "README.hard")
    before = snapshot(lower)
    await guest.rename("/w/README", "/w/README.hard")
    assert sorted(await guest.listdir("/w")) == ["README", "README.hard", "link", "pkg"]
    await guest.write("/w/made", b"x")
    parent, _ = await guest.parent("/w/made")
    await guest.call(wire.Link(await guest.node("/w/made"), parent, b"made.2"))
    await guest.rename("/w/made.2", "/w/made")  # two names in the upper
    assert await guest.read("/w/made.2") == b"x" and await guest.read("/w/made") == b"x"
    assert snapshot(lower) == before


async def test_sockets_are_made_and_copied_up_like_fifos(overlay, lower: Path) -> None:
    # bind() of a unix socket in the workspace makes a socket node: EPERM used to fail it.
    guest, _ = overlay
    held = socket.socket(socket.AF_UNIX)
    held.bind(str(lower / "lower.sock"))
    before = snapshot(lower)
    try:
        parent, _ = await guest.parent("/w/pkg/app.sock")
        entry = await guest.call(wire.Mknod(parent, stat.S_IFSOCK | 0o755, 0, b"app.sock"))
        assert isinstance(entry, wire.Entry) and stat.S_ISSOCK(entry.attr.mode)
        await guest.chmod("/w/lower.sock", 0o700)  # copies the lower's node up
        assert stat.S_IMODE((await guest.stat("/w/lower.sock")).mode) == 0o700
        await guest.rename("/w/lower.sock", "/w/pkg/moved.sock")
        assert stat.S_ISSOCK((await guest.stat("/w/pkg/moved.sock")).mode)
        assert snapshot(lower) == before
    finally:
        held.close()
