"""Watched host_fs mounts in a real VM: cached long, yet the guest sees every host change.

The guest caches everything first (names, attributes, pages, a listing and a missing name); the
host then creates, modifies, renames and deletes, and the guest polls (a bounded number of tries)
until it sees each change. The mounts are cached for `notify.LONG` throughout, far longer than
the polls run, so only the host's notices can make the guest see them.

Where a test counts requests or notices, it first waits (bounded) until the host has told every
change it made (`Notifier.settled`), and a LOOKUP of a name never seen (`SYNC`) then comes back
behind those notices, so the guest has read them: no late notice can land inside the count.
"""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest
from vfs_support import SEEN, sh

from matchlock.vfs import notify

pytestmark = [pytest.mark.vm]

_SYNCS = itertools.count()


@pytest.fixture(scope="module")
def host_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("watched")
    (root / "rw" / "sub").mkdir(parents=True)
    (root / "rw" / "sub" / "keep.txt").write_text("version-1\n")
    (root / "rw" / "old.txt").write_text("old\n")
    (root / "rw" / "gone.txt").write_text("bye\n")
    (root / "rw" / "dir" / "inner").mkdir(parents=True)
    (root / "rw" / "listed").mkdir()  # made before the watch: no notice about it can come late
    (root / "rw" / "listed" / "a").write_text("a\n")
    (root / "ro").mkdir()
    (root / "ro" / "conf").write_text("a = 1\n")
    (root / "single.conf").write_text("single-1\n")
    return root


@pytest.fixture(scope="module")
def box(vm_prerequisites, loop_thread, module_state_dir, host_dirs):
    from matchlock.api.config import SandboxConfig
    from matchlock.api.vfs import MountConfig, VFSConfig
    from matchlock.sandbox.sandbox import Sandbox

    mounts = {
        "/work": MountConfig("host_fs", str(host_dirs / "rw")),
        "/ro": MountConfig("host_fs", str(host_dirs / "ro"), readonly=True),
        "/etc/single.conf": MountConfig("host_fs", str(host_dirs / "single.conf")),
    }
    config = SandboxConfig(image="matchlock/busybox:builtin", vfs=VFSConfig(mounts=mounts))
    sandbox = loop_thread.run(Sandbox.create(config))
    yield sandbox
    loop_thread.run(sandbox.aclose())


def _notifier(box) -> notify.Notifier:
    return box.vfs.router.notifier


def settle(box, loop_thread) -> None:
    """Until every host change so far is told to the guest (or explained as its own)."""

    async def settled() -> None:
        async with asyncio.timeout(60):
            await _notifier(box).settled()

    loop_thread.run(settled())


def sync(directory: str) -> str:
    """A command whose LOOKUP reaches the host, so its reply comes after every notice already sent."""
    return f"[ -e {directory}/.sync-{next(_SYNCS)} ] || true"


def test_every_mount_is_watched_and_cached_long(box):
    providers = [m.provider for m in box.vfs.router.mounts]
    assert [p.cache_seconds for p in providers] == [notify.LONG] * 3
    assert len(_notifier(box).watched) == 3


def test_the_guest_sees_host_creates_modifies_renames_and_deletes(box, loop_thread, host_dirs):
    host = host_dirs / "rw"
    cached = sh(
        box, loop_thread, "cat /work/sub/keep.txt; ls /work; ls /work/dir; [ ! -e /work/new.txt ] && echo absent"
    )
    assert cached.split() == ["version-1", "dir", "gone.txt", "listed", "old.txt", "sub", "inner", "absent"]
    sent = _notifier(box).sent

    (host / "new.txt").write_text("fresh\n")  # a name the guest looked up and found missing
    sh(box, loop_thread, SEEN.format(test='[ "$(cat /work/new.txt)" = fresh ]'))
    sh(box, loop_thread, SEEN.format(test="ls /work | grep -qx new.txt"))  # the cached listing too

    with open(host / "sub" / "keep.txt", "r+") as f:  # same size: only the notice drops the cached pages
        f.write("version-2\n")
    sh(box, loop_thread, SEEN.format(test='[ "$(cat /work/sub/keep.txt)" = version-2 ]'))

    (host / "old.txt").rename(host / "renamed.txt")
    sh(box, loop_thread, SEEN.format(test='[ ! -e /work/old.txt ] && [ "$(cat /work/renamed.txt)" = old ]'))

    (host / "dir").rename(host / "moved")  # a watched directory moves: its watches follow it
    (host / "moved" / "inner" / "later.txt").write_text("later\n")
    sh(box, loop_thread, SEEN.format(test='[ ! -e /work/dir ] && [ "$(cat /work/moved/inner/later.txt)" = later ]'))

    (host / "gone.txt").unlink()
    sh(box, loop_thread, SEEN.format(test="[ ! -e /work/gone.txt ]"))
    os.chmod(host / "renamed.txt", 0o600)
    sh(box, loop_thread, SEEN.format(test='[ "$(stat -c %a /work/renamed.txt)" = 600 ]'))

    assert _notifier(box).sent > sent
    assert box.vfs.router.mounts[0].provider.cache_seconds == notify.LONG  # still trusted


def test_read_only_and_single_file_mounts_see_host_changes(box, loop_thread, host_dirs):
    assert sh(box, loop_thread, "cat /ro/conf /etc/single.conf") == "a = 1\nsingle-1\n"
    (host_dirs / "ro" / "conf").write_text("a = 2\n")
    (host_dirs / "ro" / "added").write_text("x\n")
    with open(host_dirs / "single.conf", "r+") as f:
        f.write("single-2\n")
    sh(box, loop_thread, SEEN.format(test='[ "$(cat /ro/conf)" = "a = 2" ] && [ -e /ro/added ]'))
    sh(box, loop_thread, SEEN.format(test='[ "$(cat /etc/single.conf)" = single-2 ]'))


def test_the_guests_own_writes_cost_no_notices(box, loop_thread):
    settle(box, loop_thread)  # the earlier tests' host changes are not counted here
    sent = _notifier(box).sent
    out = sh(box, loop_thread, "cd /work && mkdir own && for i in 1 2 3 4 5 6 7 8; do echo $i > own/f$i; done; "
             "mv own/f1 own/g1 && rm own/f2 && chmod 600 own/f3 && cat own/f8 && ls own | wc -l")  # fmt: skip
    assert out.split() == ["8", "7"]
    settle(box, loop_thread)  # and every event of the guest's own ops is counted
    assert _notifier(box).sent - sent < 8  # unsuppressed, each file costs three (an op racing its own event: one)


def test_directories_opened_in_the_guest_still_see_host_changes(box, loop_thread, host_dirs):
    host = host_dirs / "rw" / "listed"
    ops = box.vfs.server.op_counts
    assert sh(box, loop_thread, "ls /work/listed").split() == ["a"]  # the host's OPENDIR gives leave
    opened = (ops["OPENDIR"], ops["RELEASEDIR"])
    assert sh(box, loop_thread, "ls /work/listed; ls /work/listed").split() == ["a", "a"]
    assert (ops["OPENDIR"], ops["RELEASEDIR"]) == opened  # opened in the guest, listed from the kernel's cache

    (host / "b").write_text("b\n")  # the notice drops the cached listing and the leave
    sh(box, loop_thread, SEEN.format(test='[ "$(ls /work/listed | tr "\\n" " ")" = "a b " ]'))

    # The guest's own change drops the kernel's cached listing but not the leave: the next listing is
    # read through a handle the guest opened, the host's opened with that first read. (Every notice
    # about b has reached the guest before the leave is taken again.)
    settle(box, loop_thread)
    sh(box, loop_thread, f"{sync('/work/listed')}; ls /work/listed > /dev/null")
    reads = ops["OPENDIR_READ"]
    assert sh(box, loop_thread, "touch /work/listed/c && ls /work/listed").split() == ["a", "b", "c"]
    assert ops["OPENDIR_READ"] > reads
