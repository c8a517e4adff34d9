"""The host's LOOKUP_DIR: a directory's whole listing for a LOOKUP, only where the guest may cache long."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator

from vfs_peer import Peer, serving

from matchlock.api.vfs import VFSInterceptionConfig
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.notify import OFF_ENV
from matchlock.vfs.provider import Provider
from matchlock.vfs.router import Mount, Router
from matchlock.vfs.types import Limits
from matchlock.wire import vfs as wire


@contextlib.asynccontextmanager
async def _serving(
    provider: Provider,
    features: int = wire.FEATURES_ALL,
    interception: VFSInterceptionConfig | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[tuple[Peer, Router, int, int]]:
    """A served mount of `provider` after a HELLO: the guest's end, the router, the root, the features served."""
    async with serving([Mount("/m", provider)], features, interception, limits) as (guest, server, hello):
        yield guest, server.router, hello.mounts[0].root, hello.features


async def _files(guest: Peer, root: int, *names: bytes) -> None:
    for name in names:
        node, fh = await _create(guest, root, name)
        await guest.send(0, wire.Release(node, fh))


async def _create(guest: Peer, root: int, name: bytes) -> tuple[int, int]:
    created = wire.decode_result(wire.Op.CREATE, wire.split_parent(
        wire.Op.CREATE, await guest.ok(wire.Create(root, 0o101, 0o644, name)))[0])  # fmt: skip
    assert isinstance(created, wire.Created)
    await guest.send(0, wire.Forget(((created.entry.node, 1),)))
    return created.entry.node, created.fh


async def _listed(guest: Peer, root: int, name: bytes) -> wire.Listed:
    got = wire.decode_result(wire.Op.LOOKUP_DIR, await guest.ok(wire.LookupDir(root, name)))
    assert isinstance(got, wire.Listed)
    return got


async def test_a_private_mount_answers_with_the_whole_listing_each_node_counted_once() -> None:
    async with _serving(MemoryProvider()) as (guest, router, root, features):
        assert features & wire.FEATURE_LOOKUP_DIR
        await _files(guest, root, b"a", b"b", b"c")
        got = await _listed(guest, root, b"zzz")  # absent: still the listing, the guest answers ENOENT
        assert got.entry is None and sorted(item.name for item in got.entries) == [b"a", b"b", b"c"]
        nodes = [item.entry.node for item in got.entries if item.entry is not None]
        assert len(nodes) == 3 and all(router.nodes[n].nlookup == 1 for n in nodes)
        await guest.send(0, wire.Forget(tuple((n, 1) for n in nodes)))
        await guest.ok(wire.Statfs(root))  # the FORGET is served before this reply
        assert set(router.nodes) == {root}  # every node given back: the table is as before


async def test_a_short_lived_mount_or_a_big_directory_gets_a_lookups_answer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(OFF_ENV, "1")
    (tmp_path / "a").write_bytes(b"x")
    async with _serving(HostFSProvider(str(tmp_path))) as (guest, router, root, _):  # unwatched: cached 1 s
        got = await _listed(guest, root, b"a")
        assert got.entry is not None and got.entries == () and router.nodes[got.entry.node].nlookup == 1
        assert (await guest.call(wire.LookupDir(root, b"nope"))).status == -errno.ENOENT
    async with _serving(MemoryProvider()) as (guest, router, root, _):
        await _files(guest, root, *(b"f%d" % i for i in range(wire.MAX_LISTED + 1)))
        got = await _listed(guest, root, b"f7")
        assert got.entry is not None and got.entries == ()


async def test_with_interception_the_feature_is_not_served_and_the_op_refused() -> None:
    rules = VFSInterceptionConfig(emit_events=True)
    async with _serving(MemoryProvider(), interception=rules) as (guest, _, root, features):
        assert not features & wire.FEATURE_LOOKUP_DIR
        assert (await guest.call(wire.LookupDir(root, b"a"))).status == -errno.ENOSYS
    async with _serving(MemoryProvider(), features=wire.FEATURE_GUEST_OPENDIR) as (guest, _, root, _):
        assert (await guest.call(wire.LookupDir(root, b"a"))).status == -errno.ENOSYS  # not offered


async def test_a_full_node_table_gives_a_lookups_answer_and_keeps_nothing_of_the_listing() -> None:
    async with _serving(MemoryProvider(), limits=Limits(max_nodes=4)) as (guest, router, root, _):
        await _files(guest, root, b"a", b"b", b"c", b"d")
        got = await _listed(guest, root, b"a")  # room for 3 of the 4 nodes: none kept but the answer's
        assert got.entry is not None and set(router.nodes) == {root, got.entry.node}


def test_a_bad_lookup_dir_request_is_refused_with_its_reason() -> None:
    import pytest

    from matchlock.wire.frames import RemoteProtocolError

    frame = wire.encode_request(3, 0, 0, 0, wire.LookupDir(2, b"ok"))
    bad_name = frame[:-2] + b"a/"
    with pytest.raises(RemoteProtocolError, match="contains '/'"):
        wire.RequestDecoder().feed(bad_name)
    node_zero = frame[: wire.REQUEST_HEADER.size] + bytes(8) + frame[wire.REQUEST_HEADER.size + 8 :]
    with pytest.raises(RemoteProtocolError, match="LOOKUP_DIR names node 0"):
        wire.RequestDecoder().feed(node_zero)


async def test_nested_mount_points_past_max_listed_give_a_lookups_answer(monkeypatch) -> None:
    from vfs_kit import Guest

    monkeypatch.setattr(wire, "MAX_LISTED", 2)
    guest = Guest([Mount("/m", MemoryProvider()), Mount("/m/sub", MemoryProvider())])
    guest.router.lookup_dir = True
    try:
        await guest.write("/m/a", b"x")
        await guest.write("/m/b", b"x")  # two files and the mount point: one more than MAX_LISTED
        root = guest.roots["/m"]
        before = {n: node.nlookup for n, node in guest.router.nodes.items()}
        got = await guest.call(wire.LookupDir(root, b"a"))
        assert isinstance(got, wire.Listed) and got.entry is not None and got.entries == ()
        wire.encode_reply(1, got)  # a listing it could not send would have counted a lookup per entry
        after = {n: node.nlookup for n, node in guest.router.nodes.items()}
        assert after == {**before, got.entry.node: before[got.entry.node] + 1}
    finally:
        guest.close()


async def test_a_directory_that_cannot_be_listed_still_answers_as_lookup(monkeypatch) -> None:
    from matchlock.vfs.types import FsError

    def unreadable(self: MemoryProvider, path: tuple[str, ...], limit: int) -> list:
        raise FsError(errno.EACCES, "searchable, not readable")  # a host directory of mode 0o311

    async with _serving(MemoryProvider()) as (guest, router, root, _):
        await _files(guest, root, b"a")
        monkeypatch.setattr(MemoryProvider, "listdir", unreadable)
        got = await _listed(guest, root, b"a")
        assert got.entry is not None and got.entries == () and router.nodes[got.entry.node].nlookup == 1
