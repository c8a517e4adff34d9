"""The memory provider: POSIX behaviour the guest's tools rely on, within its bounds."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from vfs_kit import Guest

from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.router import Mount
from matchlock.vfs.types import FsError, Limits
from matchlock.wire import vfs as wire


async def test_files_links_renames_and_truncate() -> None:
    provider = MemoryProvider(Limits(max_nodes=10))
    guest = Guest([Mount("/m", provider)], uid=1000, gid=1000)
    try:
        await guest.mkdir("/m/d")
        await guest.write("/m/d/f", b"hello")
        attr = await guest.stat("/m/d/f")
        assert (attr.uid, attr.gid, attr.size, stat.S_IMODE(attr.mode)) == (1000, 1000, 5, 0o644)
        node = await guest.node("/m/d/f")
        entry = await guest.call(wire.Link(node, await guest.node("/m"), b"hard"))
        assert isinstance(entry, wire.Entry) and entry.attr.nlink == 2
        await guest.unlink("/m/d/f")
        assert await guest.read("/m/hard") == b"hello"
        await guest.rename("/m/hard", "/m/d/g")
        await guest.truncate("/m/d/g", 2)
        assert await guest.read("/m/d/g") == b"he"
        await guest.truncate("/m/d/g", 4)
        assert await guest.read("/m/d/g") == b"he\0\0"
        await guest.symlink("/m/s", "d/g")
        assert await guest.call(wire.Readlink(await guest.node("/m/s"))) == b"d/g"
        assert await guest.errno_of(wire.Rmdir(await guest.node("/m"), b"d")) == errno.ENOTEMPTY
        assert await guest.listdir("/m", plus=True) == ["d", "s"]
        assert provider.nodes == 4  # root, d, g, s: the hard link added a name, not an inode
    finally:
        guest.close()


async def test_append_writes_at_the_end() -> None:
    guest = Guest([Mount("/m", MemoryProvider())])
    try:
        await guest.write("/m/log", b"one\n")
        node = await guest.node("/m/log")
        opened = await guest.call(wire.Open(node, os.O_WRONLY | os.O_APPEND))
        assert isinstance(opened, wire.Opened)
        await guest.call(wire.Write(node, opened.fh, 0, os.O_WRONLY | os.O_APPEND, b"two\n"))
        assert await guest.read("/m/log") == b"one\ntwo\n"
    finally:
        guest.close()


async def test_node_count_is_bounded() -> None:
    guest = Guest([Mount("/m", MemoryProvider(Limits(max_nodes=3)))])
    try:
        await guest.mkdir("/m/a")
        await guest.mkdir("/m/b")
        with pytest.raises(FsError) as caught:
            await guest.mkdir("/m/c")
        assert caught.value.errno == errno.ENOSPC
    finally:
        guest.close()


async def test_mknod_makes_device_nodes_fifos_and_sockets_as_metadata() -> None:
    guest = Guest([Mount("/m", MemoryProvider())], uid=1000, gid=1000)
    try:
        root = await guest.node("/m")
        kinds = {b"blk": stat.S_IFBLK, b"chr": stat.S_IFCHR, b"fifo": stat.S_IFIFO, b"sock": stat.S_IFSOCK}
        for name, kind in kinds.items():
            entry = await guest.call(wire.Mknod(root, kind | 0o640, os.makedev(1, 2), name))
            assert isinstance(entry, wire.Entry), name
            assert (stat.S_IFMT(entry.attr.mode), stat.S_IMODE(entry.attr.mode)) == (kind, 0o640)
        for name in ("blk", "chr"):  # the number is kept only on devices, and stat sees it
            attr = await guest.stat(f"/m/{name}")
            assert (os.major(attr.rdev), os.minor(attr.rdev), attr.uid, attr.gid) == (1, 2, 1000, 1000)
        assert (await guest.stat("/m/fifo")).rdev == 0
        # Nothing stands behind a device node: opening one through the host is refused.
        assert await guest.errno_of(wire.Open(await guest.node("/m/chr"), os.O_RDONLY)) == errno.EACCES
        for kind in (stat.S_IFDIR, stat.S_IFLNK, 0o170000):  # directories and links have calls of their own
            assert await guest.errno_of(wire.Mknod(root, kind | 0o755, 0, b"bad")) == errno.EINVAL
        await guest.unlink("/m/blk")
        assert sorted(await guest.listdir("/m")) == ["chr", "fifo", "sock"]
    finally:
        guest.close()
