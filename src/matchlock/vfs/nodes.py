"""The router's node table: node ids are (parent node, name) pairs of the guest's tree.

A rename moves a whole subtree at once; the guest gives ids back with FORGET, and the table is
bounded (`Limits.max_nodes`). It changes only on the event loop.

So a host file with two names is two guest inodes. Each reports the host's st_ino (`stat -c %i`,
`find -samefile` and tar's link detection agree) and its true nlink; a `linked` node's attributes and
pages are never cached across opens (`Router._attr_validity`). What still differs from one inode:
POSIX and flock locks taken through one name do not exclude the other, and MAP_SHARED maps of the
two names are two page caches. One node per (st_dev, st_ino) would need the provider interface,
which is by path, to resolve a node through any of its names and to check the opened file's
identity on every call (the host reuses inode numbers), in hostfs, overlay and memory alike.
"""

from __future__ import annotations

import errno
import itertools

from .provider import Path
from .types import FsError, Limits

NEVER_FORGOTTEN = 1 << 62


class Node:
    __slots__ = ("id", "parent", "name", "nlookup", "children", "root", "linked")

    def __init__(self, node_id: int, parent: Node | None, name: str, root: Path = ()) -> None:
        self.id = node_id
        self.parent = parent
        self.name = name
        self.nlookup = 0
        self.children = 0
        self.root = root  # the guest path of a top-level mount root (parent None)
        self.linked = False  # last seen as a non-directory with more than one name (see Router._attr_validity)


DETACHED = Node(0, None, "")  # the parent of an unlinked node: its path is gone


class NodeTable:
    def __init__(self, limits: Limits, roots: list[Path]) -> None:
        self.limits = limits
        self.nodes: dict[int, Node] = {}
        self.index: dict[tuple[int, str], Node] = {}
        self._ids = itertools.count(2)  # 0 and 1 are reserved by the wire
        self.root_nodes: list[Node] = []
        for parts in roots:
            node = Node(next(self._ids), None, "", parts)
            node.nlookup = NEVER_FORGOTTEN
            self.nodes[node.id] = node
            self.root_nodes.append(node)

    def _node(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise FsError(errno.ESTALE, f"unknown node {node_id}")
        return node

    def _parts(self, node: Node) -> Path:
        names = []
        while node.parent is not None:
            names.append(node.name)
            node = node.parent
        if node.nlookup != NEVER_FORGOTTEN:  # detached: unlinked or renamed over
            # ESTALE, not ENOENT: the guest kernel then walks the path again (LOOKUP_REVAL), so an open or
            # stat that raced a rename over its name finds the new file, as on a local filesystem.
            raise FsError(errno.ESTALE, "the node's name is gone (unlinked or renamed over)")
        return node.root + tuple(reversed(names))

    def find(self, parts: Path) -> Node | None:
        """The node the guest holds at guest path `parts`, if any."""
        for root in self.root_nodes:
            if parts[: len(root.root)] == root.root:
                node: Node | None = root
                for name in parts[len(root.root) :]:
                    node = self.index.get((node.id, name)) if node is not None else None
                return node
        return None

    def _remember(self, parent: Node, name: str) -> Node:
        if self.nodes.get(parent.id) is not parent:
            # Forgotten while the request that found `name` in it was in flight (a guest's FORGET is read
            # at once): a node under it would be an orphan, outside the table and any snapshot of it.
            raise FsError(errno.ESTALE, f"node {parent.id} was forgotten meanwhile")
        node = self.index.get((parent.id, name))
        if node is None:
            if len(self.nodes) >= self.limits.max_nodes:
                raise FsError(errno.ENFILE, f"the guest holds {len(self.nodes)} nodes, the limit")
            node = Node(next(self._ids), parent, name)
            self.nodes[node.id] = node
            self.index[(parent.id, name)] = node
            parent.children += 1
        node.nlookup += 1
        return node

    def _detach(self, parent: Node, name: str) -> None:
        node = self.index.pop((parent.id, name), None)
        if node is not None:
            node.parent = DETACHED
            parent.children -= 1
            self._drop_if_unused(parent)
            self._drop_if_unused(node)

    def _drop_if_unused(self, node: Node) -> None:
        while node.nlookup <= 0 and node.children <= 0 and node.id in self.nodes:
            del self.nodes[node.id]
            parent = node.parent
            if parent is None or parent is DETACHED:
                return
            if self.index.get((parent.id, node.name)) is node:
                del self.index[(parent.id, node.name)]
            parent.children -= 1
            node = parent

    def forget(self, items: tuple[tuple[int, int], ...]) -> None:
        for node_id, count in items:
            node = self.nodes.get(node_id)
            if node is None or node.nlookup == NEVER_FORGOTTEN:
                continue
            # Never below 0: a guest that gives back more than it holds (a hostile count of 2^64-1) must
            # not leave a node a later lookup cannot revive, nor a count a snapshot restore refuses.
            node.nlookup = max(0, node.nlookup - count)
            self._drop_if_unused(node)

    def _move(self, parent: Node, name: str, newparent: Node, newname: str) -> None:
        node = self.index.pop((parent.id, name), None)
        self._detach(newparent, newname)
        if node is None:
            return
        parent.children -= 1
        node.parent, node.name = newparent, newname
        self.index[(newparent.id, newname)] = node
        newparent.children += 1
        self._drop_if_unused(parent)
