"""The provider interface: path-based, synchronous (the server runs it in a thread pool).

A path is a tuple of validated names relative to the provider's root; `()` is the root. The router
turns node ids into these paths, so a provider never sees a guest-controlled '/' or '..'. Every
method raises FsError(errno) on failure. The base class refuses every mutation with EROFS, so a
read-only provider only implements the reads.
"""

from __future__ import annotations

import errno

from .types import Attr, Caller, DirEntry, FsError, Handle, SetAttr, StatFs

Path = tuple[str, ...]


class Provider:
    readonly = True
    cache_seconds = 1.0  # how long the guest kernel may cache entries and attributes
    quick_getattr = False  # getattr never waits on a lock or a copy: the router may call it on its event loop
    kind = "provider"

    @property
    def negative_seconds(self) -> float:
        """How long the guest may cache "no such name": as long as the rest unless a provider says less."""
        return self.cache_seconds

    def getattr(self, path: Path) -> Attr:
        raise NotImplementedError

    def listdir(self, path: Path, limit: int) -> list[DirEntry]:
        raise NotImplementedError

    def open(self, path: Path, flags: int) -> Handle:
        raise NotImplementedError

    def readlink(self, path: Path) -> str:
        raise FsError(errno.EINVAL)

    def statfs(self) -> StatFs:
        return StatFs()

    def close(self) -> None:
        return None

    # --- mutations: EROFS unless a provider implements them ---------------------------------------

    def setattr(self, path: Path, changes: SetAttr, handle: Handle | None) -> Attr:
        raise FsError(errno.EROFS)

    def create(self, path: Path, flags: int, mode: int, caller: Caller) -> tuple[Handle, Attr]:
        raise FsError(errno.EROFS)

    def mkdir(self, path: Path, mode: int, caller: Caller) -> Attr:
        raise FsError(errno.EROFS)

    def mknod(self, path: Path, mode: int, rdev: int, caller: Caller) -> Attr:
        raise FsError(errno.EROFS)

    def symlink(self, path: Path, target: str, caller: Caller) -> Attr:
        raise FsError(errno.EROFS)

    def link(self, source: Path, path: Path) -> Attr:
        raise FsError(errno.EROFS)

    def unlink(self, path: Path) -> None:
        raise FsError(errno.EROFS)

    def rmdir(self, path: Path) -> None:
        raise FsError(errno.EROFS)

    def rename(self, source: Path, target: Path, flags: int) -> None:
        raise FsError(errno.EROFS)
