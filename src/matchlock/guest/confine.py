"""What an unprivileged command sees of /dev and /proc, as container runtimes do.

Applied by each command's namespace init in its private mount namespace (so
one syscall each, nothing shared changes), unless the sandbox is privileged:
- /dev becomes a small tmpfs with the harmless character devices, the
  terminal devices and the shared-memory mounts: no disks (runtime, image,
  upper), no agent port, no console, no memory devices; device nodes that
  the image brings on the root filesystem stop working.
- The kernel's tunables and triggers under /proc, and /sys, become
  read-only, and the files that expose kernel memory or other tenants'
  state are masked (Docker's default lists).
The default user is root, so file modes alone protect none of this; what
keeps it in place is that the command has no CAP_SYS_ADMIN (dropped from its
bounding set) to unmount or remount anything.
"""

from __future__ import annotations

import os

from . import syscalls

# A mount point on the agent's private tmpfs (init creates it), where the
# new /dev is assembled before it is moved over /dev.
DEV_STAGING = "/run/matchlock/dev"
_S_IFCHR = 0o020000
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
# Shared with the agent: its pty slaves live in this devpts instance.
SHARED_MOUNTS = ("pts", "shm", "mqueue")
LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)
# /sys is bound recursively so the cgroup and bpf mounts under it stay visible.
READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs", "/sys")
MASKED_FILES = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/latency_stats",
                "/proc/timer_stats")  # fmt: skip
MASKED_DIRS = ("/proc/acpi", "/proc/scsi", "/proc/asound", "/sys/firmware")
_RO_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC


def build_dev() -> None:
    """Assemble the workload's /dev at DEV_STAGING and move it over /dev (call before /run/matchlock goes)."""
    syscalls.mount("tmpfs", DEV_STAGING, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NOEXEC, "mode=755,size=65536k")
    umask = os.umask(0)  # device nodes must be 0666 whatever the agent's umask
    try:
        for name, major, minor in DEVICES:
            os.mknod(f"{DEV_STAGING}/{name}", _S_IFCHR | 0o666, os.makedev(major, minor))
        for name in SHARED_MOUNTS:
            os.mkdir(f"{DEV_STAGING}/{name}", 0o755)
            syscalls.mount(f"/dev/{name}", f"{DEV_STAGING}/{name}", None, syscalls.MS_BIND)
    finally:
        os.umask(umask)
    for name, target in LINKS:
        os.symlink(target, f"{DEV_STAGING}/{name}")
    syscalls.mount(DEV_STAGING, "/dev", None, syscalls.MS_MOVE)
    # The image may ship device nodes of its own (a tar can hold any), so
    # none work on the root; creating new ones needs CAP_MKNOD, also dropped.
    syscalls.mount(None, "/", None, syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_NODEV)


def restrict_kernel_files() -> None:
    """Make the kernel's knobs read-only and mask its leaky files (call after the fresh /proc is mounted)."""
    for path in READ_ONLY:
        try:
            syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REC)
        except FileNotFoundError:
            continue  # not in this kernel's configuration
        syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | _RO_FLAGS)
    for path in MASKED_FILES:
        try:
            syscalls.mount("/dev/null", path, None, syscalls.MS_BIND)
        except FileNotFoundError:
            continue
    for path in MASKED_DIRS:
        try:
            syscalls.mount("tmpfs", path, "tmpfs", syscalls.MS_RDONLY | _RO_FLAGS)
        except FileNotFoundError:
            continue
