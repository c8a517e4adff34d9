"""What an unprivileged command sees of /dev and /proc, as container runtimes do.

Applied by each command's namespace init in its private mount namespace (so
one syscall each, nothing shared changes), unless the sandbox is privileged;
only the read-only copy of /sys that it binds is made once, by init at boot:
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
# The read-only copy of /sys, made by init at /run/boot/sys on the runtime's /run before pivot_root,
# where it is after: under the runtime, which every workload's namespace detaches.
READ_ONLY_SYS = "/run/matchlock/rt/run/boot/sys"
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
# /sys is copied recursively, so the cgroup and bpf mounts under it stay visible (read-only too).
READ_ONLY_PROC = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")
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


def prepare_read_only_sys(staging: str) -> None:
    """A read-only copy of /sys with every mount under it, at `staging`: made once, at boot, after the last
    of them is mounted; each command's namespace init binds it over its /sys (`take_read_only_sys`)."""
    os.makedirs(staging, exist_ok=True)
    syscalls.mount("/sys", staging, None, syscalls.MS_BIND | syscalls.MS_REC)
    _remount_read_only([staging, *_mounts_under(staging)])


def take_read_only_sys() -> None:
    """Cover /sys with the read-only copy (call before /run/matchlock, which holds it, goes).

    A recursive bind, not a move: bind mounts keep the read-only flag of what they copy, and a new mount
    is listed last in the mount table, as the top one at its path should be."""
    syscalls.mount(READ_ONLY_SYS, "/sys", None, syscalls.MS_BIND | syscalls.MS_REC)


def restrict_kernel_files() -> None:
    """Make the kernel's knobs under /proc read-only and mask its leaky files (call after the fresh /proc is
    mounted, and after `take_read_only_sys`)."""
    bound = []
    for path in READ_ONLY_PROC:
        try:
            syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REC)
        except FileNotFoundError:
            continue  # not in this kernel's configuration
        bound.append(path)
    # A remount changes one mount only: the ones the recursive binds brought along need their own.
    _remount_read_only([*bound, *_mounts_under(*bound)])
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


def _remount_read_only(mount_points: list[str]) -> None:
    for mount_point in mount_points:
        syscalls.mount(mount_point, mount_point, None,
                       syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY | _RO_FLAGS)  # fmt: skip


def _mounts_under(*tops: str) -> list[str]:
    """Mount points below any of `tops` in this mount namespace, each once, parents first (one read)."""
    if not tops:
        return []
    prefixes = tuple(top + "/" for top in tops)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return list(dict.fromkeys(point for point in points if point.startswith(prefixes)))
