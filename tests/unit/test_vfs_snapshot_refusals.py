"""vfs/snapshot.py refuses, with a clear error, mounts that differ, a host path that is gone, and tampered state."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vfs_kit import Guest

from matchlock.vfs import snapshot
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.memory import MemoryProvider
from matchlock.vfs.overlay import OverlayProvider
from matchlock.vfs.router import Mount
from matchlock.vfs.types import Limits
from matchlock.wire import vfs as wire


class Sandboxes:
    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0
        self.guests: list[Guest] = []
        (root / "shared").mkdir()
        (root / "lower").mkdir()
        (root / "lower" / "f").write_text("lower\n")

    def build(self, memory: str = "/m", limits: Limits | None = None) -> Guest:
        self.count += 1
        upper = self.root / f"sandbox-{self.count}" / "vfs" / "overlay-0"
        guest = Guest([
            Mount("/h", HostFSProvider(str(self.root / "shared"))),
            Mount(memory, MemoryProvider(limits)),
            Mount("/o", OverlayProvider(str(self.root / "lower"), str(upper))),
        ], limits=limits)  # fmt: skip
        self.guests.append(guest)
        return guest


@pytest.fixture
def boxes(tmp_path: Path) -> Any:
    made = Sandboxes(tmp_path)
    yield made
    for guest in made.guests:
        guest.close()


async def saved(boxes: Sandboxes, *, with_nodes: bool = True) -> Path:
    guest = boxes.build()
    await guest.mkdir("/m/d")
    await guest.write("/m/d/f", b"data")
    await guest.write("/o/f", b"upper\n")
    node = await guest.node("/m/d/f")
    await guest.call(wire.Open(node, os.O_RDWR))
    snapshot.save(guest.router, boxes.root / "snap", with_nodes=with_nodes)
    return boxes.root / "snap"


def refused(boxes: Sandboxes, where: Path, *words: str, with_nodes: bool = True, guest: Guest | None = None) -> None:
    with pytest.raises(snapshot.VfsStateError) as caught:
        snapshot.restore((guest or boxes.build()).router, where, with_nodes=with_nodes)
    for word in words:
        assert word in str(caught.value)


async def test_mounts_that_differ_are_refused_naming_the_mount(boxes: Sandboxes) -> None:
    where = await saved(boxes)
    refused(boxes, where, "/scratch", "fix:", guest=boxes.build(memory="/scratch"))
    state = json.loads((where / "vfs" / "state.json").read_text())
    state["mounts"][0]["readonly"] = True  # /h saved read-only: this sandbox's is writable
    (where / "vfs" / "state.json").write_text(json.dumps(state))
    refused(boxes, where, "vfs mount /h", "read-only", "fix: restore with the snapshot's own mounts")


async def test_a_host_path_that_is_gone_is_refused(boxes: Sandboxes) -> None:
    where = await saved(boxes)
    guest = boxes.build()
    (boxes.root / "shared").rename(boxes.root / "moved")
    refused(boxes, where, "vfs mount /h", str(boxes.root / "shared"), "is gone", "fix:", guest=guest)


async def test_a_filesystem_snapshot_has_no_node_table_to_restore(boxes: Sandboxes) -> None:
    where = await saved(boxes, with_nodes=False)
    refused(boxes, where, "no node table")
    fresh = boxes.build()
    snapshot.restore(fresh.router, where, with_nodes=False)
    assert await fresh.read("/m/d/f") == b"data" and await fresh.read("/o/f") == b"upper\n"


def _edit_nodes(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda state: change(state["nodes"])


def _row(nodes: dict[str, Any], name: str) -> list[Any]:
    return next(r for r in nodes["table"] if r[2] == name)


def _loop(nodes: dict[str, Any]) -> None:
    d, f = _row(nodes, "d"), _row(nodes, "f")
    d[1] = f[0]  # d's parent is its own child


def _root_id_below(nodes: dict[str, Any]) -> None:
    root = next(r for r in nodes["table"] if r[1] is None)
    nodes["table"].remove(root)
    _row(nodes, "f")[0] = root[0]  # the root row gone, its id on a file: every check but the root's passes


TAMPERED_STATE: dict[str, Callable[[dict[str, Any]], None]] = {
    "version": lambda s: s.update(version=2),
    "a parent loop": _edit_nodes(_loop),
    "a slash in a name": _edit_nodes(lambda n: _row(n, "f").__setitem__(2, "a/b")),
    "a dot-dot name": _edit_nodes(lambda n: _row(n, "f").__setitem__(2, "..")),
    "a NUL in a name": _edit_nodes(lambda n: _row(n, "f").__setitem__(2, "a\0b")),
    "a name too long": _edit_nodes(lambda n: _row(n, "f").__setitem__(2, "x" * 256)),
    "a missing parent": _edit_nodes(lambda n: _row(n, "f").__setitem__(1, 999_999)),
    "a duplicate node": _edit_nodes(lambda n: n["table"].append(list(_row(n, "f")))),
    "two nodes with one name": _edit_nodes(lambda n: n["table"].append([999_999, *_row(n, "f")[1:]])),
    "a boolean id": _edit_nodes(lambda n: _row(n, "f").__setitem__(0, True)),
    "a root that is no root": _edit_nodes(lambda n: _row(n, "f").__setitem__(1, None)),
    "a root's id on a node below it": _edit_nodes(_root_id_below),
    "a handle on a huge fh": _edit_nodes(lambda n: n["handles"][0].__setitem__(0, 1 << 64)),
    "too many handles": _edit_nodes(
        lambda n: n["handles"].extend([[k, None, 0, False, True, None] for k in range(9, 30)])
    ),
    "a negative next id": _edit_nodes(lambda n: n.update(next_id=-1)),
    "a mount list that is no list": lambda s: s.update(mounts={"/m": 1}),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_STATE))
async def test_a_tampered_state_json_is_refused(boxes: Sandboxes, case: str) -> None:
    guest = boxes.build(limits=Limits(max_handles=16))
    await guest.mkdir("/m/d")
    await guest.write("/m/d/f", b"data")
    opened = await guest.call(wire.Open(await guest.node("/m/d/f"), os.O_RDWR))
    assert isinstance(opened, wire.Opened)
    where = boxes.root / "snap"
    snapshot.save(guest.router, where, with_nodes=True)
    state = json.loads((where / "vfs" / "state.json").read_text())
    TAMPERED_STATE[case](state)
    (where / "vfs" / "state.json").write_text(json.dumps(state))
    refused(boxes, where, "fix:", guest=boxes.build(limits=Limits(max_handles=16)))


def _memory_index(where: Path, change: Callable[[list[Any]], None]) -> None:
    path = where / "vfs" / "mount-1" / "index.json"
    index = json.loads(path.read_text())
    change(index["inodes"])
    path.write_text(json.dumps(index))


async def test_a_tampered_memory_mount_is_refused(boxes: Sandboxes) -> None:
    where = await saved(boxes)
    original = (where / "vfs" / "mount-1" / "index.json").read_text()
    cases: dict[str, Callable[[list[Any]], None]] = {
        "a directory with two names": lambda rows: rows[0][10].append(["again", rows[0][10][0][1]]),
        "more data than its limit": lambda rows: rows[-1].__setitem__(8, (512 << 20) + 1),
        "data past the end": lambda rows: rows[-1].__setitem__(7, 1 << 20),
        "an unreachable inode": lambda rows: rows.append([0o100644, 0, 0, 999, 0, 0, 0, 0, 0, "", []]),
        "an inode of no known type": lambda rows: rows[-1].__setitem__(0, 0o170644),
        "a device number on a file": lambda rows: rows[-1].__setitem__(11, 5),
        "a row too long": lambda rows: rows[-1].append(0),
        "a bad child name": lambda rows: rows[0][10][0].__setitem__(0, "../x"),
    }
    for name, change in cases.items():
        (where / "vfs" / "mount-1" / "index.json").write_text(original)
        _memory_index(where, change)
        with pytest.raises(snapshot.VfsStateError, match="memory mount /m|is not"):
            snapshot.restore(boxes.build().router, where, with_nodes=True)
        assert name
    (where / "vfs" / "mount-1" / "index.json").write_text(original)
    data = where / "vfs" / "mount-1" / "data.bin"
    data.rename(where / "elsewhere.bin")
    data.symlink_to(where / "elsewhere.bin")  # never followed
    refused(boxes, where, "data.bin")


async def test_a_saved_overlay_upper_with_a_device_or_a_symlinked_root_is_refused(boxes: Sandboxes) -> None:
    where = await saved(boxes)
    upper = where / "vfs" / "mount-2" / "upper"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(upper / "sock"))  # the overlay makes socket nodes (a guest's bind()): kept
    snapshot.restore(boxes.build().router, where, with_nodes=True)
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # it never makes a device
    refused(boxes, where, "overlay mount /o", "neither file")
    (upper / "null").unlink()
    upper.rename(where / "real-upper")
    upper.symlink_to(where / "real-upper")
    refused(boxes, where, "overlay mount /o", "no directory")


@pytest.mark.parametrize("link", ["vfs", "vfs/mount-1", "vfs/mount-2"])
async def test_a_symlinked_state_or_mount_directory_is_never_followed(boxes: Sandboxes, link: str) -> None:
    where = await saved(boxes)
    (where / link).rename(boxes.root / "moved")
    (where / link).symlink_to(boxes.root / "moved")  # its content intact: only the symlink is refused
    refused(boxes, where, link.split("/")[-1], "no directory", "fix:")


async def test_a_tampered_overlay_index_or_a_partial_save_is_refused(boxes: Sandboxes) -> None:
    where = await saved(boxes)
    index_path = where / "vfs" / "mount-2" / "index.json"
    original = index_path.read_text()
    for change in ({"whiteouts": [["..", "etc"]]}, {"opaque": [["a/b"]]}, {"kept_ino": [[["f"], -1]]}):
        index_path.write_text(json.dumps({**json.loads(original), **change}))
        refused(boxes, where, "fix: take the snapshot again")
    index_path.write_text(original)
    (where / "vfs" / "state.json").unlink()  # a save that did not finish writes none
    refused(boxes, where, "state.json")


async def test_a_tampered_node_table_is_refused_before_any_content_is_copied(boxes: Sandboxes) -> None:
    where = await saved(boxes)
    state = json.loads((where / "vfs" / "state.json").read_text())
    state["nodes"]["table"].append([999_999, 999_998, "orphan", 1, False])
    (where / "vfs" / "state.json").write_text(json.dumps(state))
    fresh = boxes.build()
    refused(boxes, where, "no parent", guest=fresh)
    memory = next(m.provider for m in fresh.router.mounts if m.path == "/m")
    overlay = next(m.provider for m in fresh.router.mounts if m.path == "/o")
    assert isinstance(memory, MemoryProvider) and isinstance(overlay, OverlayProvider)
    assert not memory.root.children and not os.listdir(overlay.upper_path)
