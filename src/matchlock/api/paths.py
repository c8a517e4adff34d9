"""Where matchlock keeps caches and state.

`MATCHLOCK_CACHE_DIR` and `MATCHLOCK_STATE_DIR` override the defaults
(`~/.cache/matchlock` and `~/.matchlock`); tests use them to isolate state
while sharing the expensive caches.

Each user has their own, in their own home, and both are private (0700):
they hold sandboxes' disks, sockets, logs and volumes, and one user must
not read or reach another's. Root keeps the same paths in root's home.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import NamedTuple

from .errors import UsageError


def home() -> Path:
    """`$HOME`, except for root started with another user's HOME (`sudo -E`): then root's own home.

    Root must not leave root-owned state in a user's home, where the user could then not use it."""
    path = Path.home()
    if os.geteuid() != 0:
        return path
    try:
        if path.stat().st_uid == 0:
            return path
    except OSError:
        return path
    return Path(pwd.getpwuid(0).pw_dir)


def _directory(variable: str, default: Path) -> Path:
    """`$variable` when set, else `default`, as a private directory; a bad one is said in one line.

    A missing directory is created 0700. An existing default one of ours that others may
    enter (made by an older version) is tightened; an override is the user's choice and kept."""
    override = os.environ.get(variable)
    path = Path(override) if override else default
    try:
        info = path.stat()
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:  # a concurrent command made it
            pass
        except PermissionError:
            raise UsageError(f"cannot create {path} ({variable}): permission denied; fix: {_fix(variable)}") from None
        return path
    except PermissionError:
        raise UsageError(f"cannot use {path} ({variable}): permission denied; fix: {_fix(variable)}") from None
    if not stat.S_ISDIR(info.st_mode):
        hint = f"point {variable} at a directory, or unset it" if override else f"move {path} out of the way"
        raise UsageError(f"{path} is not a directory ({variable}); fix: {hint}")
    if not override and info.st_uid == os.geteuid() and info.st_mode & 0o077:
        os.chmod(path, 0o700)
    elif not os.access(path, os.R_OK | os.W_OK | os.X_OK):  # another user's: say so, not "no such sandbox"
        raise UsageError(f"cannot use {path} ({variable}): permission denied; fix: {_fix(variable)}")
    return path


def _fix(variable: str) -> str:
    return f"point {variable} at a directory of your own, or unset it (each user has their own state)"


def cache_dir() -> Path:
    return _directory("MATCHLOCK_CACHE_DIR", home() / ".cache" / "matchlock")


def state_dir() -> Path:
    return _directory("MATCHLOCK_STATE_DIR", home() / ".matchlock")


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def images_dir() -> Path:
    return cache_dir() / "images"


def runtime_dir() -> Path:
    return cache_dir() / "runtime"


def debs_dir() -> Path:
    """Downloaded Debian packages, shared by the runtime, kernel and image builders."""
    return cache_dir() / "debs"


def vms_dir() -> Path:
    return state_dir() / "vms"


class SandboxPaths(NamedTuple):
    """The layout of one sandbox's directory; the only place that names the files in it.

    The owner creates them, `exec`, `port-forward` and `allow-list` reach the
    relay socket, `log` reads the console log, and reconcile finds what a
    crashed owner left behind from the paths recorded in the lifecycle. A
    `NamedTuple`, not a dataclass: `matchlock exec` imports it on every call.
    """

    root: Path

    @classmethod
    def of(cls, vm_id: str) -> SandboxPaths:
        """The directory of `vm_id` under the default state directory (`StateStore.vm_dir` for another root)."""
        return cls(vms_dir() / vm_id)

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def console_log(self) -> Path:
        """The guest console, QEMU's notes and the output of detached commands."""
        return self.logs_dir / "vm.log"

    @property
    def exec_socket(self) -> Path:
        """The exec relay, served by the sandbox's owner."""
        return self.root / "exec.sock"

    @property
    def upper_disk(self) -> Path:
        """The writable layer over the image (ext4, discarded with the sandbox)."""
        return self.root / "upper.ext4"

    def restored_boot_file(self, name: str) -> Path:
        """A full restore's own hard link to its snapshot's `kernel` or `initrd`, which QEMU reads only at
        start: a snapshot of the sandbox links it again after the snapshot it came from is removed."""
        return self.root / f"restored-{name}"


def match_vm_id(ref: str, ids) -> str | None:
    """The one ID in `ids` that is `ref` or starts with it (with or without `vm-`); None if none does.

    Raises UsageError when the prefix is ambiguous, naming the candidates.
    """
    ids = list(ids)
    if ref in ids:
        return ref
    if not ref:
        return None
    prefixes = (ref,) if ref.startswith("vm-") else (ref, "vm-" + ref)
    matches = sorted({vm_id for vm_id in ids if vm_id.startswith(prefixes)})
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise UsageError(f"VM ID prefix {ref!r} is ambiguous: it matches {shown}; give more characters")
    return matches[0] if matches else None


def find_vm_dir(ref: str) -> SandboxPaths | None:
    """The directory of the sandbox `ref` names (an ID or a unique prefix), from a listing: no database."""
    if not ref or "/" in ref or ref in (".", ".."):
        return None  # not an ID: never a path out of the state directory
    exact = SandboxPaths.of(ref)
    if exact.root.is_dir():
        return exact
    try:
        names = os.listdir(vms_dir())
    except OSError:
        return None
    vm_id = match_vm_id(ref, names)
    return SandboxPaths.of(vm_id) if vm_id else None
