"""Guest-local overlay mounts: the host's read-only FUSE mount as the lower of the guest's own overlayfs.

For a HELLO mount marked `guest_overlay`, the daemon mounts the FUSE filesystem at a hidden path
(`hidden_lower`) under /run/matchlock, a 0700 tmpfs every workload's mount namespace detaches. Once
the kernel has INIT-ed it, `cover` mounts overlayfs at the guest path with its upper and work
directories on the sandbox's upper ext4 disk, beside (not inside) the root overlay's `upper` (so a
filesystem snapshot's restore, which boots on a copy of that disk, finds them), then detaches the
hidden lower: overlayfs keeps private clones of its layers, so no path reaches the raw lower or the
upper directory afterwards. Writes never leave the guest; reads of unchanged files
still go to the host. The host is never asked to write: its mount is read-only.

Options: `redirect_dir=on` so renaming a directory from the lower works (the host-side overlay
allows it; without it overlayfs answers EXDEV); `index=off` and `xino=off`, as our kernel builds
them by default, said out loud so a kernel built with other defaults behaves the same. The FUSE
lower answers LISTXATTR empty and GETXATTR ENOSYS (so EOPNOTSUPP): overlayfs reads that as "no
overlay xattrs" and copies up no xattrs.
"""

from __future__ import annotations

import contextlib
import os
import stat

from ..wire import vfs
from . import syscalls

HIDDEN = "/run/matchlock/vfs-lower"
# Where init's staging mount of the upper ext4 disk is after pivot_root (init.RUNTIME_MOUNT +
# init.STAGING + "/upperfs"); checked to be a mount point before use.
UPPER_DISK = "/run/matchlock/rt/run/boot/upperfs"
LAYERS = "vfs-overlays"  # on the upper disk, beside the root overlay's upper/ and work/
OPTIONS = "redirect_dir=on,index=off,xino=off"


def hidden_lower(info: vfs.Mount) -> vfs.Mount:
    """The record to mount over FUSE: `info` itself, or for a guest overlay the same mount at a hidden path."""
    if not info.guest_overlay:
        return info
    os.makedirs(HIDDEN, mode=0o700, exist_ok=True)
    return vfs.Mount(f"{HIDDEN}/{info.root}", info.root, True, info.negative_valid_ns, True)


def cover(info: vfs.Mount, lower: vfs.Mount) -> None:
    """For a guest overlay: mount overlayfs over the (INIT-ed) hidden lower at `info.path` (a directory the
    daemon made), then hide the lower."""
    if not info.guest_overlay:
        return
    try:
        _mount_overlay(info, lower)
    except BaseException:
        # Detached on failure too, so no raw lower stays mounted behind the error; the error is what counts.
        with contextlib.suppress(OSError):
            _hide(lower)
        raise
    _hide(lower)


def _hide(lower: vfs.Mount) -> None:
    syscalls.umount(lower.path, syscalls.MNT_DETACH)
    os.rmdir(lower.path)


def _mount_overlay(info: vfs.Mount, lower: vfs.Mount) -> None:
    if not os.path.ismount(UPPER_DISK):
        raise RuntimeError(
            f"mount {info.path}: the sandbox's upper disk is not mounted at {UPPER_DISK}, so a guest-local "
            "overlay has nowhere to keep its writes; fix: use a host-side overlay (add an interception rule) "
            "or -v HOST:GUEST:host_fs"
        )
    layers = f"{UPPER_DISK}/{LAYERS}/{info.root}"
    # Imported here: shutil (with zlib, bz2, lzma) is dear under emulation and every daemon imports this module.
    import shutil

    upper, work = f"{layers}/upper", f"{layers}/work"
    # Only a filesystem snapshot's restore boots on a disk that held this mount's layers (a copy of its
    # source's upper disk): the overlay comes back with its writes, as a host-side overlay does.
    if not (_is_dir(upper) and _is_dir(work)):
        shutil.rmtree(layers, ignore_errors=True)
        os.makedirs(work, mode=0o700)
        os.mkdir(upper)
        # The overlay's root directory is the upper's: give it the lower root's owner, mode and times.
        root = os.stat(lower.path)
        os.chown(upper, root.st_uid, root.st_gid)
        os.chmod(upper, stat.S_IMODE(root.st_mode))
        os.utime(upper, ns=(root.st_atime_ns, root.st_mtime_ns))
    data = f"lowerdir={lower.path},upperdir={upper},workdir={work},{OPTIONS}"
    try:
        syscalls.mount("overlay", info.path, "overlay", syscalls.MS_NOSUID | syscalls.MS_NODEV, data)
    except OSError as exc:
        raise RuntimeError(
            f"mount {info.path}: overlayfs over the host's directory failed ({exc}); "
            "fix: use -v HOST:GUEST:host_fs, or see the guest console (dmesg) for the kernel's reason"
        ) from None


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
