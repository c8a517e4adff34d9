"""LOOKUPs answered from one listing per directory (FEATURE_LOOKUP_DIR) in a real VM, on a watched host_fs mount.

A cold `stat` of every file (the guest's caches dropped first) must give the right answers with about
one host request per directory, not one per path; host changes made afterwards must be seen (the
listing is cached long, so only the host's notices can make the guest see them); and repeated cold
walks must not grow the host's node table or its lookup counts (every listed node the kernel never
took is given back or held once).
"""

from __future__ import annotations

import asyncio

import pytest
from vfs_support import sh

pytestmark = [pytest.mark.vm]

DIRS, FILES = 6, 25
DROP = "sync; echo 3 > /proc/sys/vm/drop_caches"
SEEN = "for i in $(seq 50); do {test} && exit 0; sleep 0.1; done; echo never: {test}; exit 1"


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    for d in range(DIRS):
        for f in range(FILES):
            (root / f"d{d}" / "sub").mkdir(parents=True, exist_ok=True)
            (root / f"d{d}" / "sub" / f"f{f}").write_bytes(b"x" * (d * 100 + f))
    return root


@pytest.fixture(scope="module")
def box(vm_prerequisites, loop_thread, module_state_dir, host_dir):
    from matchlock.api.config import SandboxConfig
    from matchlock.api.vfs import MountConfig, VFSConfig
    from matchlock.sandbox.sandbox import Sandbox

    mounts = {"/work": MountConfig("host_fs", str(host_dir))}
    config = SandboxConfig(image="matchlock/busybox:builtin", privileged=True, vfs=VFSConfig(mounts=mounts))
    sandbox = loop_thread.run(Sandbox.create(config))

    async def watched() -> None:  # cached long only once the host watches the mount
        async with asyncio.timeout(60):
            while not sandbox.vfs.router.notifier.watched:
                await asyncio.sleep(0.05)

    loop_thread.run(watched())
    yield sandbox
    loop_thread.run(sandbox.aclose())


PATHS = " ".join(f"/work/d{d}/sub/f{f}" for d in range(DIRS) for f in range(FILES))


def cold_walk(box, loop_thread) -> tuple[str, int, int]:
    """Drop the guest's caches, stat every file: (output, LOOKUP_DIRs, LOOKUPs) the host served for it."""
    sh(box, loop_thread, DROP)
    ops = box.vfs.server.op_counts
    before = (ops["LOOKUP_DIR"], ops["LOOKUP"])
    out = sh(box, loop_thread, f"stat -c '%n %s' {PATHS}")
    return out, ops["LOOKUP_DIR"] - before[0], ops["LOOKUP"] - before[1]


def test_a_cold_stat_walk_is_right_with_about_one_request_per_directory(box, loop_thread):
    out, listed, plain = cold_walk(box, loop_thread)
    expected = "".join(f"/work/d{d}/sub/f{f} {d * 100 + f}\n" for d in range(DIRS) for f in range(FILES))
    assert out == expected
    directories = 1 + 2 * DIRS  # the root, each d, each sub
    assert 1 <= listed <= directories and listed + plain <= directories + 2, (listed, plain)  # not one per path
    # Names absent from a listed directory are ENOENT (from the listing), present ones are right.
    sh(box, loop_thread, "! stat /work/d0/sub/nope 2>/dev/null && test -f /work/d0/sub/f3")


def test_host_changes_after_the_listing_are_seen(box, loop_thread, host_dir):
    cold_walk(box, loop_thread)
    sh(box, loop_thread, "test ! -e /work/d1/sub/new && test -e /work/d2/sub/f0")  # both cached now
    (host_dir / "d1" / "sub" / "new").write_bytes(b"fresh")
    (host_dir / "d2" / "sub" / "f0").unlink()
    sh(box, loop_thread, SEEN.format(test="test -e /work/d1/sub/new"))
    sh(box, loop_thread, SEEN.format(test="test ! -e /work/d2/sub/f0"))
    assert sh(box, loop_thread, "cat /work/d1/sub/new") == "fresh"
    (host_dir / "d2" / "sub" / "f0").write_bytes(b"")  # as the other tests expect


def dropped(box, loop_thread) -> list[tuple[str, str, int]]:
    """Drop the guest's caches: the host's nodes then, (parent name, name, lookups), once the kernel's
    FORGETs are in (they reach the host as notices after the exec ends: the table stops changing)."""
    sh(box, loop_thread, DROP)

    async def settled() -> list[tuple[str, str, int]]:
        seen: list[list[tuple[str, str, int]]] = []
        for _ in range(50):  # bounded: 5 s at most
            nodes = box.vfs.router.nodes.values()
            seen.append(sorted((n.parent.name, n.name, n.nlookup) for n in nodes if n.parent is not None))
            if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
                break
            await asyncio.sleep(0.1)
        return seen[-1]

    return loop_thread.run(settled())


def test_repeated_cold_walks_do_not_grow_the_hosts_node_table(box, loop_thread):
    cold_walk(box, loop_thread)
    held = dropped(box, loop_thread)
    first = (len(held), sum(n for _, _, n in held))
    for _ in range(2):
        cold_walk(box, loop_thread)
    held = dropped(box, loop_thread)
    again = (len(held), sum(n for _, _, n in held))
    assert again[0] <= first[0] and again[1] <= first[1], (first, again)
    assert first[0] <= DIRS * (FILES + 2) + 8  # the tree at most, once


READS = ("OPENDIR", "OPENDIR_READ", "READDIR")  # what a directory read costs when the guest cannot answer it


def listed_then_read(box, loop_thread, where: str) -> tuple[str, int]:
    """Cold, stat a file of `where` (its LOOKUP lists `where`), then `ls -l` it: (size and name of each
    entry, the directory reads the host served). The listing answers reads only within the mount's
    negative lifetime, so a VM stalled past it between the two gets up to two more tries."""
    ops = box.vfs.server.op_counts
    for _ in range(3):
        sh(box, loop_thread, DROP)
        before = sum(ops[op] for op in READS)
        out = sh(
            box, loop_thread, f"stat -c %n {where}/f0 >/dev/null && ls -l {where} | sed 1d | awk '{{print $5, $9}}'"
        )
        reads = sum(ops[op] for op in READS) - before
        if not reads:
            break
    return out, reads


def test_a_listed_directory_is_read_in_the_guest_and_host_changes_are_seen(box, loop_thread, host_dir):
    out, reads = listed_then_read(box, loop_thread, "/work/d3/sub")
    assert out == "".join(f"{300 + f} f{f}\n" for f in sorted(range(FILES), key=str)) and reads == 0
    (host_dir / "d3" / "sub" / "late").write_bytes(b"")
    sh(box, loop_thread, SEEN.format(test="ls /work/d3/sub | grep -qx late"))
    (host_dir / "d3" / "sub" / "late").unlink()
    sh(box, loop_thread, SEEN.format(test="! ls /work/d3/sub | grep -qx late"))


def test_listings_read_in_the_guest_do_not_grow_the_hosts_node_table(box, loop_thread):
    for _ in range(3):
        assert listed_then_read(box, loop_thread, "/work/d4/sub")[1] == 0
        # The kernel holds nothing now; the guest's cache may still hold one lookup per entry of a listing
        # it keeps (the root's), never more, and none of the directory it read (its inode is gone).
        held = dropped(box, loop_thread)
        assert all(count == 1 and parent == "" for parent, _, count in held), held
        assert len(held) <= DIRS, held
