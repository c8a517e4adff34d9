"""A sandbox's host files: builds the VFS providers from its config and serves them on the VFS port.

A writable `overlay` mount that no interception rule or event can concern, and that neither holds nor sits
inside another mount, is a guest-local overlay: the host serves its directory read-only and the guest
overlays it with its own kernel overlayfs, its writes on the sandbox's upper disk (guest/fuse_overlay.py),
at the guest disk's speed. Any other overlay is the host-side `OverlayProvider`, so rules and events
see every op and nested mounts route as before.

Everything that can fail on the host (a host path gone, an overlay's private directory) fails here,
before QEMU starts. The server starts with QEMU, before the guest's agent waits for its mounts. The boot
templates have no VFS port: a sandbox restored from one has it hot-plugged (`Machine.add_vfs_port`).

For a snapshot (sandbox/snapshots.py) the channel is parked and the router saved; a clone builds its
router from the snapshot's VFS config and restores that state into it before its server starts.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from pathlib import Path

from ..api.errors import SetupError, UsageError, VMError
from ..api.events import FileEvent
from ..api.globs import path_matches
from ..api.vfs import MountConfig, VFSConfig, under
from ..vfs.hostfs import HostFSProvider
from ..vfs.intercept import Interceptor
from ..vfs.memory import MemoryProvider
from ..vfs.overlay import OverlayProvider
from ..vfs.provider import Provider
from ..vfs.router import Mount, Router
from ..vfs.server import VfsServer
from ..vfs.types import FsError, Limits


class SandboxVFS:
    def __init__(self, config: VFSConfig, directory: Path, emit: Callable[[FileEvent], None]) -> None:
        self.limits = Limits()
        self._config, self._directory, self._emit = config, directory, emit
        self.router = self._router()
        self.server: VfsServer | None = None
        self.restored = False  # the router holds a full snapshot's node table: the guest is its clone
        self._saved: tuple[Path, bool] | None = None  # the snapshot restored from (directory, with_nodes)

    def _router(self) -> Router:
        mounts: list[Mount] = []
        try:
            for index, (guest, mount) in enumerate(sorted(self._config.mounts.items())):
                local = guest_local_overlay(self._config, guest)
                provider = self._provider(index, guest, mount, self._directory, local)
                mounts.append(Mount(guest, provider, mount.readonly or local, guest_overlay=local))
        except BaseException:
            for m in mounts:
                m.provider.close()
            raise
        interceptor = Interceptor(self._config.interception, self._emit)
        return Router(mounts, interceptor, VfsServer.executor(), self.limits)

    def _provider(self, index: int, guest: str, mount: MountConfig, directory: Path, local: bool) -> Provider:
        ino_base = (index + 1) << 56  # keeps inode numbers of different mounts apart
        try:
            if mount.type == "memory" and mount.file is not None:
                seed = mount.file
                return MemoryProvider.single_file(seed.data, seed.mode, seed.uid, seed.gid, self.limits)
            if mount.type == "memory":
                return MemoryProvider(self.limits)
            if mount.type == "overlay" and not local:
                upper = directory / "vfs" / f"overlay-{index}"
                return OverlayProvider(mount.host_path, str(upper), ino_base=ino_base)
            provider = HostFSProvider(
                mount.host_path,
                readonly=mount.readonly or local,  # a guest-local overlay's lower: the guest never writes it
                owner_uid=mount.owner_uid,
                owner_gid=mount.owner_gid,
                ino_base=ino_base,
            )
            if local and provider.dir.single:  # swapped for a file since validation: overlayfs needs a directory
                provider.close()
                raise FsError(errno.ENOTDIR, f"overlay lower {mount.host_path} is not a directory")
            return provider
        except (FsError, OSError) as exc:
            raise UsageError(
                f"vfs mount {guest}: cannot open {mount.host_path or 'memory'}: {exc.args[-1]}; fix: check the path"
            ) from None

    async def start(self, sock: socket.socket) -> None:
        if self.server is not None:
            # A boot that failed after it was served (a template restore, before the cold boot): its guest
            # may have changed what the providers hold (an overlay's copy), so the next one gets a fresh set.
            await self.server.aclose()
            self.router = self._router()
            if self._saved is not None:  # a filesystem restore's content, into the fresh set too
                self.restore(*self._saved)
        self.server = VfsServer(sock, self.router, restored=self.restored)
        await self.server.start()

    # --- snapshots (sandbox/snapshots.py) ---------------------------------------------------------------

    async def park(self, timeout: float) -> None:
        """Quiesce the channel: nothing in flight, the router's state final, until `wake`."""
        if self.server is None:
            raise VMError("the sandbox's VFS server is not serving, so it cannot be snapshotted")
        await self.server.park(timeout)

    def wake(self) -> None:
        assert self.server is not None
        self.server.wake()

    def save(self, directory: Path, *, with_nodes: bool) -> None:
        """The private mounts' content (and `with_nodes`, the node table and open handles) under `directory`."""
        from ..vfs import snapshot

        snapshot.save(self.router, directory, with_nodes=with_nodes)

    def restore(self, directory: Path, with_nodes: bool) -> None:
        """Fill the freshly built router from a snapshot's `save`, before the server starts."""
        from ..vfs import snapshot

        try:
            snapshot.restore(self.router, directory, with_nodes=with_nodes)
        except snapshot.VfsStateError as exc:
            raise SetupError(str(exc)) from None
        self.restored, self._saved = with_nodes, (directory, with_nodes)

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.aclose()
        else:
            self.router.executor.shutdown(wait=False)
            self.router.close()


def guest_local_overlay(config: VFSConfig, guest: str) -> bool:
    """Whether the mount at `guest` is an overlay the guest can keep to itself (see the module doc)."""
    mount = config.mounts[guest]
    if mount.type != "overlay" or mount.readonly:  # a read-only overlay stays read-only: the host's, as before
        return False
    if any(other != guest and (under(other, guest) or under(guest, other)) for other in config.mounts):
        return False
    icpt = config.interception
    if icpt is None:
        return True
    return not icpt.emit_events and not any(_may_match_under(rule.path, guest) for rule in icpt.rules)


def _may_match_under(glob: str, mount: str) -> bool:
    """Whether a rule's path glob could match the mount point or a path below it (true when unsure)."""
    if not glob or "[" in glob or "\\" in glob:
        return True  # every path, or a class/escape that could stand for a '/': assume it may
    pattern, parts = glob.strip("/").split("/"), mount.strip("/").split("/")
    if len(pattern) < len(parts):
        return False  # it names only paths above the mount
    return all(path_matches(p, name) for p, name in zip(pattern, parts))
