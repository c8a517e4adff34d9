"""A sandbox's host files: builds the VFS providers from its config and serves them on the VFS port.

Everything that can fail on the host (a host path gone, an overlay's private directory) fails here,
before QEMU starts. The server starts with QEMU, before the guest's agent waits for its mounts. The boot
templates have no VFS port: a sandbox restored from one has it hot-plugged (`Machine.add_vfs_port`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from ..api.errors import UsageError
from ..api.events import FileEvent
from ..api.vfs import MountConfig, VFSConfig
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

    def _router(self) -> Router:
        mounts: list[Mount] = []
        try:
            for index, (guest, mount) in enumerate(sorted(self._config.mounts.items())):
                mounts.append(Mount(guest, self._provider(index, guest, mount, self._directory), mount.readonly))
        except BaseException:
            for m in mounts:
                m.provider.close()
            raise
        interceptor = Interceptor(self._config.interception, self._emit)
        return Router(mounts, interceptor, VfsServer.executor(), self.limits)

    def _provider(self, index: int, guest: str, mount: MountConfig, directory: Path) -> Provider:
        ino_base = (index + 1) << 56  # keeps inode numbers of different mounts apart
        try:
            if mount.type == "memory":
                return MemoryProvider(self.limits)
            if mount.type == "overlay":
                upper = directory / "vfs" / f"overlay-{index}"
                return OverlayProvider(mount.host_path, str(upper), ino_base=ino_base)
            return HostFSProvider(
                mount.host_path,
                readonly=mount.readonly,
                owner_uid=mount.owner_uid,
                owner_gid=mount.owner_gid,
                ino_base=ino_base,
            )
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
        self.server = VfsServer(sock, self.router)
        await self.server.start()

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.aclose()
        else:
            self.router.executor.shutdown(wait=False)
            self.router.close()
