"""A host directory is listed at its first READDIR, not at OPENDIR.

The guest kernel takes its cached listing's mtime baseline at the first READDIR: a listing taken at
OPENDIR would miss a host change (and its notice) landing in between, and stay cached as current.
"""

from __future__ import annotations

import errno
from pathlib import Path

from vfs_kit import Guest

from matchlock.api.vfs import VFSInterceptionConfig
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.router import Mount
from matchlock.wire import vfs as wire


async def _names(guest: Guest, node: int, fh: int, offset: int = 0, size: int = 4096) -> list[bytes]:
    page = await guest.call(wire.Readdir(node, fh, offset, size, 0))
    assert isinstance(page, tuple)
    return [e.name for e in page]


async def test_a_host_change_after_opendir_shows_in_the_first_readdir(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("x")
    guest = Guest([Mount("/w", HostFSProvider(str(tmp_path)))], VFSInterceptionConfig(emit_events=True))
    try:
        node = await guest.node("/w")
        opened = await guest.call(wire.Opendir(node, 0))
        assert isinstance(opened, wire.Opened)
        (tmp_path / "new").write_text("y")
        assert sorted(await _names(guest, node, opened.fh)) == [b".", b"..", b"new", b"old"]
        # Later pages read the same listing; a read at offset 0 (a rewinddir) lists afresh.
        (tmp_path / "old").unlink()
        assert sorted(await _names(guest, node, opened.fh, offset=2)) == [b"new", b"old"]
        assert sorted(await _names(guest, node, opened.fh)) == [b".", b"..", b"new"]
        # One event per listing, at the listing, with its size.
        assert [(e.op, e.size) for e in guest.events if e.op == "readdir" and e.path == "/w"] == [
            ("readdir", 2), ("readdir", 1),
        ]  # fmt: skip
    finally:
        guest.close()


async def test_opendir_still_refuses_what_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "gone").mkdir()
    guest = Guest([Mount("/w", HostFSProvider(str(tmp_path)))])
    try:
        assert await guest.errno_of(wire.Opendir(await guest.node("/w/file"), 0)) == errno.ENOTDIR
        gone = await guest.node("/w/gone")
        (tmp_path / "gone").rmdir()
        assert await guest.errno_of(wire.Opendir(gone, 0)) == errno.ENOENT
        opened = await guest.call(wire.Open(await guest.node("/w/file"), 0))
        assert isinstance(opened, wire.Opened)
        assert await guest.errno_of(wire.Readdir(gone, opened.fh, 0, 4096, 0)) == errno.ENOTDIR
    finally:
        guest.close()


async def test_with_interception_no_listing_is_cached_in_the_guest() -> None:
    # The event comes with the listing at READDIR: a listing the guest kernel kept would fire none.
    for interception, cached in ((VFSInterceptionConfig(emit_events=True), False), (None, True)):
        guest = Guest([Mount("/m", MemoryProvider())], interception)
        try:
            opened = await guest.call(wire.Opendir(await guest.node("/m"), 0))
            assert isinstance(opened, wire.Opened)
            assert bool(opened.flags & wire.OPEN_CACHE_DIR) is cached, interception
        finally:
            guest.close()
