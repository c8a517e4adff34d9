"""PID 1 of the guest: assemble the root filesystem, then serve the agent.

Boot order:
1. The kernel mounts the runtime disk (read-only) as / and runs /init (us).
2. `prepare`: everything that depends on neither the sandbox's disks nor
   its settings: /proc, /sys, /dev, /dev/pts, /dev/shm, /dev/mqueue,
   cgroup2 and bpffs mounted, PID 1's cgroup, links up, the disks found,
   the runtime also at /run/matchlock/rt, and the agent created. A boot
   template is saved after this (`wait_for_wake`), so restored sandboxes
   start from here. Under emulation each of these steps costs milliseconds
   to tens of them, the first time code runs after a restore most of all.
   A rooted template (TEMPLATE_ROOTED_FLAG, one per image) also assembles
   the root (step 3) and prepares it (`agent.prepare_root`) before the save.
3. Send HELLO, so the host's settings travel while the root is assembled:
   mount the image's read-only lower disk and the writable ext4 upper disk,
   join them with overlayfs and pivot_root into the result. The runtime disk
   ends up at /run/matchlock/rt; each workload's mount namespace detaches
   /run/matchlock, so workloads never see it (/run/matchlock/dev is where
   a workload's own /dev is assembled: see confine.py). /dev, /proc and
   /sys move into the new root with their submounts; /tmp is mounted.
4. The agent applies the host's settings (clock, hostname, hosts, DNS,
   CPU quota) from the handshake and then reports ready. When the
   handshake says the host serves mounts, the agent first calls
   `start_vfs`: the FUSE daemon starts on the VFS port and the mounts are
   up before the guest is ready, so no command ever runs without them. The
   host adds that port at boot, or hot-plugs it after restoring a boot
   template (which has none), so the port is looked up only then.

Any failure prints `FATAL: ...` on the console (the host shows the tail of
the console log) and exits, which panics the kernel and ends QEMU.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from ..wire.boot import (
    AGENT_PORT_NAME,
    DEFAULT_PATH,
    LOWER_DISK_SERIAL,
    TEMPLATE_FLAG,
    TEMPLATE_READY,
    TEMPLATE_ROOTED_FLAG,
    UPPER_DISK_SERIAL,
    VFS_PORT_NAME,
    WAKE_SIZE,
)
from . import agent, confine, syscalls, timing
from .agent import Agent
from .confine import DEV_STAGING

RUNTIME_MOUNT = "/run/matchlock/rt"
STAGING = "/run/boot"
NEWROOT = STAGING + "/root"
SYS_COPY = STAGING + "/sys"  # at confine.READ_ONLY_SYS after pivot_root
NOSUID_NODEV_NOEXEC = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
# A hot-plugged port gets its name from the host a few control messages after it appears; under
# emulation that takes milliseconds, so this bound is only for a host that never added it.
VFS_PORT_TIMEOUT = 10.0
_disks: dict[str, str] = {}  # serial -> device, found by prepare()


def log(message: str) -> None:
    os.write(2, f"matchlock-init: {message}\n".encode())


def _mount_quiet(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    """Mount, tolerating a filesystem that is already there (EBUSY)."""
    os.makedirs(target, exist_ok=True)
    try:
        syscalls.mount(source, target, fstype, flags, data)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise


def _device_with(base: str, attribute: str, value: str) -> str | None:
    """/dev/<entry> for the sysfs entry under `base` whose `attribute` file holds `value`."""
    for entry in sorted(os.listdir(base)):
        try:
            with open(f"{base}/{entry}/{attribute}") as f:
                if f.read().strip() == value:
                    return "/dev/" + entry
        except OSError:
            continue
    return None


def find_disk(serial: str) -> str:
    # By serial, not by name: device order is an accident of the command line.
    device = _device_with("/sys/block", "serial", serial)
    if device is None:
        raise RuntimeError(f"no virtio disk with serial {serial!r}")
    return device


def find_port(name: str) -> str:
    # No udev in the guest, so no /dev/virtio-ports/<name> links: look in sysfs.
    device = _device_with("/sys/class/virtio-ports", "name", name)
    if device is None:
        raise RuntimeError(f"no virtio-serial port named {name!r}")
    return device


def start_vfs() -> str:
    """Start the FUSE daemon on the VFS port and wait until its mounts are up; returns the port's device.

    Called by the agent when the host's HELLO says it serves mounts. The caller hides the device from
    workloads, as it does its own port.
    """
    deadline = time.monotonic() + VFS_PORT_TIMEOUT
    while (port := _device_with("/sys/class/virtio-ports", "name", VFS_PORT_NAME)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the host serves mounts but no port named {VFS_PORT_NAME!r} appeared")
        time.sleep(0.002)
    from . import fuse_daemon  # only sandboxes with mounts load it

    agent.release_from_cgroup(fuse_daemon.start(port))
    return port


def mount_early() -> None:
    _mount_quiet("devtmpfs", "/dev", "devtmpfs", syscalls.MS_NOSUID, "mode=0755")
    _mount_quiet("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC)
    _mount_quiet("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC)


def wait_for_wake(fd: int) -> None:
    """The snapshot point of a template VM (kernel booted, Python and the agent loaded).

    The host saves the machine while it waits here; every sandbox restored
    from the snapshot continues from this read, with its own disks attached.
    The wake message is fresh host entropy: clones must not share the
    template's random state.
    """
    os.write(fd, TEMPLATE_READY)
    seed = b""
    while len(seed) < WAKE_SIZE:
        chunk = os.read(fd, WAKE_SIZE - len(seed))
        if not chunk:
            raise RuntimeError("the host went away before waking the template")
        seed += chunk
    syscalls.reseed_random(seed)


def prepare() -> None:
    """Everything that needs neither the sandbox's disks nor its settings, done before the template's snapshot.

    A template saves the result, so a restored sandbox pays none of it. /dev, /proc and /sys
    with everything mounted under them are later moved, not mounted again, into the new root.
    """
    syscalls.mount("tmpfs", "/run", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755")
    for path in (STAGING + "/lower", STAGING + "/upperfs", NEWROOT, RUNTIME_MOUNT):
        os.makedirs(path)
    # The runtime under the path it will have after pivot_root, so the import machinery is
    # pointed there now and needs no fixing after the wake.
    syscalls.mount("/", RUNTIME_MOUNT, None, syscalls.MS_BIND)
    sys.path[:] = [RUNTIME_MOUNT + p if p.startswith("/") else p for p in sys.path]
    # Packages imported already keep their own search path; fix it too, so their submodules can
    # still be imported lazily (fuse_daemon, only when there are mounts).
    for module in list(sys.modules.values()):
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, list):
            package_path[:] = [RUNTIME_MOUNT + p if p.startswith("/") else p for p in package_path]
    sys.path_importer_cache.clear()

    dev_flags = syscalls.MS_NOSUID | syscalls.MS_NOEXEC
    _mount_quiet("devpts", "/dev/pts", "devpts", dev_flags, "newinstance,ptmxmode=0666,mode=0620,gid=5")
    _mount_quiet("shm", "/dev/shm", "tmpfs", dev_flags | syscalls.MS_NODEV, "mode=1777")
    _mount_quiet("mqueue", "/dev/mqueue", "mqueue", NOSUID_NODEV_NOEXEC)
    _mount_quiet("cgroup2", "/sys/fs/cgroup", "cgroup2", NOSUID_NODEV_NOEXEC)
    confine.restrict_kernel_log()
    try:
        _mount_quiet("bpf", "/sys/fs/bpf", "bpf", NOSUID_NODEV_NOEXEC)
    except OSError:
        pass  # older fallback kernels may lack bpffs; nothing depends on it
    confine.prepare_read_only_sys(SYS_COPY)  # after the last mount under /sys
    # devtmpfs has one instance, so these are in the /dev every later mount of it shows.
    for link, target in (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                         ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2")):  # fmt: skip
        if not os.path.lexists(link):
            os.symlink(target, link)
    if os.path.lexists("/dev/ptmx") and not os.path.islink("/dev/ptmx"):
        os.unlink("/dev/ptmx")
    if not os.path.lexists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
    agent.prepare_cgroups()
    agent.prepare_network()
    # Reading a serial is a request to the device. A template is keyed by its disks' serials in
    # order, so the disks of every sandbox restored from it are where they were here.
    _disks.update((serial, find_disk(serial)) for serial in (LOWER_DISK_SERIAL, UPPER_DISK_SERIAL))


def assemble_root() -> None:
    lower, upper = STAGING + "/lower", STAGING + "/upperfs"
    syscalls.mount(_disks[LOWER_DISK_SERIAL], lower, "erofs", syscalls.MS_RDONLY)
    syscalls.mount(_disks[UPPER_DISK_SERIAL], upper, "ext4", 0)
    for path in (upper + "/upper", upper + "/work"):
        try:  # one call, not makedirs' walk: each costs milliseconds under emulation
            os.mkdir(path)
        except FileExistsError:
            pass
    syscalls.mount(
        "overlay", NEWROOT, "overlay", 0,
        f"lowerdir={lower},upperdir={upper}/upper,workdir={upper}/work",
    )  # fmt: skip

    # The image's /run becomes a tmpfs holding /run/matchlock, itself a tmpfs
    # so workloads can detach it (and with it the runtime) in one call.
    _mount_quiet("tmpfs", NEWROOT + "/run", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755")
    _mount_quiet("tmpfs", NEWROOT + "/run/matchlock", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0700")
    os.makedirs(NEWROOT + RUNTIME_MOUNT)
    os.makedirs(NEWROOT + DEV_STAGING)
    syscalls.pivot_root(NEWROOT, NEWROOT + RUNTIME_MOUNT)
    os.chdir("/")


def mount_system() -> None:
    # The runtime's own, prepared before the wake, each with what is mounted below it.
    for path in ("/dev", "/proc", "/sys"):
        os.makedirs(path, exist_ok=True)
        syscalls.mount(RUNTIME_MOUNT + path, path, None, syscalls.MS_MOVE)
    _mount_quiet("tmpfs", "/tmp", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777")


def main() -> None:
    started = timing.uptime()
    os.environ.clear()
    os.environ.update({"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "linux"})
    try:
        mount_early()
        prepare()
        port = find_port(AGENT_PORT_NAME)
        fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
        guest = Agent(fd, hidden_devices=(port,), start_vfs=start_vfs)
        with open("/proc/cmdline") as f:
            args = f.read().split()
        rooted = False
        if TEMPLATE_FLAG in args:
            # Loaded into the template's memory: under emulation the import alone takes ~2 s,
            # which every sandbox with mounts would pay after its restore.
            from . import fuse_daemon  # noqa: F401

            if TEMPLATE_ROOTED_FLAG in args:
                # A template of one image: its clones wake with this root (~0.2 s under emulation)
                # and a copy of this upper disk, so the disk must hold all the guest wrote to it.
                assemble_root()
                mount_system()
                agent.prepare_root()
                os.sync()
                rooted = True
            wait_for_wake(fd)
            started = timing.uptime()
            timing.stamp("woken")
        guest.boot_started = started
        os.set_blocking(fd, False)
        # HELLO first: the host's answer (the settings) travels while the root is assembled.
        guest.say_hello()
        timing.stamp("HELLO sent")
        if not rooted:
            assemble_root()
            timing.stamp("root assembled")
            mount_system()
            timing.stamp("system mounted")
    except Exception as exc:  # noqa: BLE001 - PID 1 must report, never traceback silently
        log(f"FATAL: {type(exc).__name__}: {exc}")
        sys.exit(1)
    guest.run()
