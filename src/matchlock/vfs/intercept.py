"""Interception of VFS operations: wire rules (allow/block by op and path glob) and file events.

A `block` rule in phase `before` answers EPERM and the op never reaches the provider; `allow` rules
and `after` rules change nothing on the host (the SDKs run their after-hooks from the events).
Path globs match as upstream's `filepath.Match`: `*` and `?` never cross a '/'. Events go to a
callback that must not block (the RPC server queues them, bounded, and drops when full).

Rules are by name, so a rename or a hard link must not give a file (or a directory's contents) a name
that other block rules govern: a link of a write-blocked file to a free name would let it be written
there, and a rename over a blocked name would replace that file. Such a rename or link answers EXDEV,
as across mounts, so `mv` copies through the checked ops instead and `ln` says it cannot (`differ`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..api.events import FileEvent
from ..api.globs import path_matches
from ..api.vfs import VFS_OPS, VFSHookRule, VFSInterceptionConfig


class _Rule:
    def __init__(self, rule: VFSHookRule) -> None:
        self.ops = frozenset(rule.ops)
        self.path = rule.path
        self.block = rule.action == "block" and rule.phase == "before"

    def matches(self, op: str, path: str) -> bool:
        return (not self.ops or op in self.ops) and (not self.path or path_matches(self.path, path))

    def reaches_under(self, path: str) -> bool:
        """The rule's path could match something below `path` (a directory's contents)."""
        if not self.path:
            return True
        pattern, parts = self.path.strip("/").split("/"), path.strip("/").split("/")
        return len(pattern) > len(parts) and all(path_matches(p, c) for p, c in zip(pattern, parts, strict=False))


class Interceptor:
    """Decides blocks and emits events; `enabled` is false when the sandbox asked for neither."""

    def __init__(self, config: VFSInterceptionConfig | None, emit: Callable[[FileEvent], None] | None = None) -> None:
        self.enabled = config is not None
        rules = [_Rule(r) for r in config.rules] if config is not None else []
        self.blocks = [r for r in rules if r.block]
        self.emit = emit
        self.events = 0

    def blocked(self, op: str, path: str) -> bool:
        return any(rule.matches(op, path) for rule in self.blocks)

    def differ(self, a: str, b: str) -> bool:
        """Block rules would treat the file at `a`, or anything below it, otherwise at `b`."""
        if not self.blocks:
            return False
        if any(self.blocked(op, a) != self.blocked(op, b) for op in VFS_OPS):
            return True
        return any(rule.reaches_under(a) != rule.reaches_under(b) for rule in self.blocks)

    def event(self, op: str, path: str, size: int = 0, mode: int = 0, uid: int = 0, gid: int = 0) -> None:
        if not self.enabled or self.emit is None:
            return
        self.events += 1
        self.emit(FileEvent(op=op, path=path, size=size, mode=mode, uid=uid, gid=gid))
