"""`Notifier.settled`: once it returns, every host change made before it has been told (or explained)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_vfs_watch import _watched
from vfs_kit import Guest

from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.notify import OFF_ENV
from matchlock.vfs.router import Mount
from matchlock.wire import vfs as wire


async def test_settled_returns_once_the_host_changes_are_told(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    guest, sent = await _watched(tmp_path)
    try:
        src = await guest.node("/data/src")
        (tmp_path / "src" / "new").write_text("x")
        async with asyncio.timeout(10):
            await guest.router.notifier.settled()
        # No polling for them: they were sent before settled() returned (three looks, DELAY apart).
        assert (wire.INVAL_ENTRY, src, b"new") in sent.notices
        assert (wire.INVAL_INODE, src, b"") in sent.notices
        told = len(sent.notices)
        await guest.write("/data/src/mine", b"guest")  # the guest's own change: explained, not told
        async with asyncio.timeout(10):
            await guest.router.notifier.settled()
        assert len(sent.notices) == told
    finally:
        guest.close()


async def test_settled_returns_at_once_when_watching_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OFF_ENV, "1")  # a host_fs mount, never walked: nothing will ever be told
    guest = Guest([Mount("/data", HostFSProvider(str(tmp_path)))])
    try:
        guest.router.notifier.start(lambda frame: None)
        async with asyncio.timeout(10):
            await guest.router.notifier.settled()
        assert guest.router.notifier.sent == 0
    finally:
        guest.close()
