"""What an unprivileged command sees of /dev and /proc, as container runtimes do.

Applied by each command's namespace init in its private mount namespace (so
one syscall each, nothing shared changes), unless the sandbox is privileged:
- /dev becomes a small tmpfs with the harmless character devices, the
  terminal devices and the shared-memory mounts: no disks (runtime, image,
  upper), no agent port, no console, no memory devices; device nodes that
  the image brings on the root filesystem stop working.
- The kernel's tunables and triggers under /proc, and /sys with every mount
  under it (cgroupfs: the CPU quota of --cpus is on the command's own
  cgroup), become read-only, and the files that expose kernel memory or
  other tenants' state are masked (Docker's default lists).
The default user is root, so file modes alone protect none of this; what
keeps it in place is that the command has no CAP_SYS_ADMIN (process.py
keeps only Docker's default capabilities) to unmount or remount anything.
The kernel log and kernel pointers are for CAP_SYSLOG only (set once at
boot by `restrict_kernel_log`), which commands lack as well.
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
# /sys is bound recursively so the cgroup and bpf mounts under it stay visible (read-only too).
READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs", "/sys")
MASKED_FILES = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/latency_stats",
                "/proc/timer_stats")  # fmt: skip
MASKED_DIRS = ("/proc/acpi", "/proc/scsi", "/proc/asound", "/sys/firmware")
_RO_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
KERNEL_LOG_SETTINGS = (("/proc/sys/kernel/dmesg_restrict", "1"), ("/proc/sys/kernel/kptr_restrict", "1"))


def restrict_kernel_log() -> None:
    """Let only CAP_SYSLOG read the kernel log (klogctl, dmesg) and see kernel pointers; once, at boot."""
    for path, value in KERNEL_LOG_SETTINGS:
        try:
            with open(path, "w") as f:
                f.write(value)
        except FileNotFoundError:
            continue  # a kernel without printk has no log to hide


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
        # A remount changes one mount only: the ones the recursive bind brought along need their own.
        for mount_point in (path, *_mounts_under(path)):
            syscalls.mount(mount_point, mount_point, None,
                           syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | _RO_FLAGS)  # fmt: skip
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


def _mounts_under(top: str) -> list[str]:
    """Mount points below `top` in this mount namespace, each once, parents first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return list(dict.fromkeys(point for point in points if point.startswith(top + "/")))
