"""Interception rules are by name: a rename or hard link may not take a file out from under its block
rules, nor put another file under them (EXDEV, so `mv` copies through the checked ops)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from vfs_kit import Guest

from matchlock.api.vfs import VFSHookRule, VFSInterceptionConfig
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.intercept import Interceptor
from matchlock.vfs.router import Mount
from matchlock.vfs.types import FsError
from matchlock.wire import vfs as wire

NO_WRITES = VFSHookRule(name="frozen", phase="before", ops=("write", "truncate"), path="/w/frozen/*", action="block")


@pytest.fixture
def guest(tmp_path: Path):
    for name in ("frozen", "free", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "frozen" / "f").write_bytes(b"original")
    (tmp_path / "free" / "g").write_bytes(b"replacement")
    guest = Guest([Mount("/w", HostFSProvider(str(tmp_path)))], VFSInterceptionConfig(rules=(NO_WRITES,)))
    yield guest
    guest.close()


async def _errno(coro) -> int:
    try:
        await coro
    except FsError as exc:
        return exc.errno
    return 0


async def test_a_hard_link_cannot_give_a_write_blocked_file_a_writable_name(guest: Guest, tmp_path: Path) -> None:
    newparent, name = await guest.parent("/w/free/alias")
    link = wire.Link(await guest.node("/w/frozen/f"), newparent, name)
    assert await _errno(guest.call(link)) == errno.EXDEV
    assert not (tmp_path / "free" / "alias").exists()
    assert (tmp_path / "frozen" / "f").read_bytes() == b"original"


async def test_a_rename_cannot_move_a_file_out_from_under_its_rule_nor_over_a_blocked_name(
    guest: Guest, tmp_path: Path
) -> None:
    assert await _errno(guest.rename("/w/frozen/f", "/w/free/f")) == errno.EXDEV  # then writable
    assert await _errno(guest.rename("/w/free/g", "/w/frozen/f")) == errno.EXDEV  # replaces the frozen file
    exchange = guest.rename("/w/free/g", "/w/frozen/f", wire.RENAME_EXCHANGE)
    assert await _errno(exchange) == errno.EXDEV
    assert (tmp_path / "frozen" / "f").read_bytes() == b"original"
    assert (tmp_path / "free" / "g").read_bytes() == b"replacement"


async def test_a_directory_keeps_its_contents_rules(guest: Guest, tmp_path: Path) -> None:
    assert await _errno(guest.rename("/w/frozen", "/w/thawed")) == errno.EXDEV  # /w/thawed/f: no rule
    assert await _errno(guest.rename("/w/free", "/w/frozen2")) == 0  # no rule reaches under either name
    assert (tmp_path / "frozen2" / "g").exists() and (tmp_path / "frozen" / "f").exists()


async def test_moves_and_links_under_the_same_rules_still_work(guest: Guest, tmp_path: Path) -> None:
    await guest.rename("/w/frozen/f", "/w/frozen/f2")
    newparent, name = await guest.parent("/w/frozen/f3")
    await guest.call(wire.Link(await guest.node("/w/frozen/f2"), newparent, name))
    await guest.rename("/w/free/g", "/w/other/g")
    assert (tmp_path / "frozen" / "f3").read_bytes() == b"original"
    assert (tmp_path / "other" / "g").read_bytes() == b"replacement"


def test_differ_compares_ops_and_rules_below_a_directory() -> None:
    rules = (
        VFSHookRule(phase="before", ops=("write",), path="/a/*", action="block"),
        VFSHookRule(phase="before", ops=("write",), path="/b/*", action="block"),
        VFSHookRule(phase="before", ops=("remove",), path="/c/d/*.key", action="block"),
        VFSHookRule(phase="after", ops=("write",), path="/e/*", action="block"),  # after: never blocks
    )
    rules_of = Interceptor(VFSInterceptionConfig(rules=rules))
    assert not rules_of.differ("/a/x", "/b/x")  # other rules, the same ops blocked
    assert rules_of.differ("/a/x", "/z/x")
    assert rules_of.differ("/c/d", "/c/e")  # d's *.key files would lose their rule
    assert not rules_of.differ("/c/e", "/c/f")
    assert not rules_of.differ("/e/x", "/z/x")
    assert not Interceptor(None).differ("/a/x", "/z/x")
    assert not Interceptor(VFSInterceptionConfig(rules=(VFSHookRule(phase="before", action="block"),))).differ(
        "/a", "/b"
    )  # a rule on every path applies on both
