"""READDIRPLUS with a full node table: the entries past it come without a node, and nothing is counted for them.

An error reply instead would leave the lookups already counted for the page's first entries with no guest
to FORGET them: the nodes would stay in the host's table for good.
"""

from __future__ import annotations

from pathlib import Path

from vfs_kit import Guest

from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.router import Mount
from matchlock.vfs.types import Limits
from matchlock.wire import vfs as wire


async def test_entries_past_a_full_table_have_no_node_and_the_rest_are_given_back(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).write_text("x")
    guest = Guest([Mount("/w", HostFSProvider(str(tmp_path)))], limits=Limits(max_nodes=3))
    try:
        root = await guest.node("/w")
        opened = await guest.call(wire.Opendir(root, 0))
        assert isinstance(opened, wire.Opened)
        page = await guest.call(wire.Readdir(root, opened.fh, 0, 1 << 16, 1))
        assert isinstance(page, tuple)
        listed = [e for e in page if e.name not in (b".", b"..")]
        assert sorted(e.name for e in listed) == [b"a", b"b", b"c", b"d"]
        nodes = [e.entry.node for e in listed if e.entry is not None]
        assert len(nodes) == 2 and all(guest.router.nodes[n].nlookup == 1 for n in nodes)  # root + 2: the limit
        guest.router.forget(tuple((n, 1) for n in nodes))
        assert set(guest.router.nodes) == {root}
    finally:
        guest.close()
