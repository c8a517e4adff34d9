"""Fallback guest kernel: Debian's prebuilt cloud kernel plus a tiny initramfs.

Used when the tuned kernel has not been built. Debian's cloud kernel has the
virtio drivers, erofs, overlay and fuse as modules, so a small initramfs
(busybox-static, the needed modules with their signatures stripped, and a
shell /init) loads them, finds the runtime disk by its virtio-blk serial,
mounts it read-only and hands over to its /init, which then sees the same
world as under the tuned kernel (root = runtime disk, devtmpfs on /dev).

Debian kernels lack VIRTIO_MMIO_CMDLINE_DEVICES, so `-M microvm` must keep
ACPI on for the virtio-mmio devices to be found.

Cached under `kernels_dir()/fallback-<kernel release>-<hash12>/` where the hash
covers the init script and the module list.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import KernelError, SetupError
from ..api.paths import cache_dir, kernels_dir
from ..util import debian
from ..util.fs import file_lock, staging_dir
from ..wire.boot import RUNTIME_DISK_SERIAL

META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Kernel arguments the initramfs needs (the VM layer adds console, panic, ...).
FALLBACK_CMDLINE: tuple[str, ...] = ("rdinit=/init",)


# Modules to load, by name; their dependencies come from modules.dep, and
# modules built into the kernel are skipped.
WANTED_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "virtio_net",
    "erofs",
    "ext4",
    "overlay",
    "fuse",
)
# Without these the runtime disk cannot be reached at all.
REQUIRED_MODULES: tuple[str, ...] = ("virtio_mmio", "virtio_blk", "erofs")

# Bump when the initramfs layout changes in a way the inputs below do not show.
LAYOUT_VERSION = "1"

INIT_SCRIPT = r"""#!/bin/sh
# matchlock fallback initramfs /init (busybox): load modules, mount the
# runtime disk read-only, switch to its /init.
export PATH=/bin
fatal() {
    echo "FATAL: matchlock initramfs: $*"
    reboot -f
    poweroff -f
    exit 1
}
mount -t proc proc /proc || fatal "cannot mount /proc"
mount -t sysfs sysfs /sys || fatal "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fatal "cannot mount devtmpfs on /dev"
while read -r m; do
    insmod "/lib/modules/$m.ko" || fatal "insmod $m failed"
done < /lib/modules/order
serial=@RUNTIME_SERIAL@
for arg in $(cat /proc/cmdline); do
    case "$arg" in matchlock.runtime_serial=*) serial=${arg#*=} ;; esac
done
find_disk() {
    for f in /sys/block/vd*/serial; do
        [ -f "$f" ] || continue
        if [ "$(cat "$f")" = "$serial" ]; then
            d=${f%/serial}
            echo "${d##*/}"
            return 0
        fi
    done
    return 1
}
tries=0
until disk=$(find_disk); do
    tries=$((tries + 1))
    [ $tries -le 200 ] || fatal "no virtio-blk disk with serial '$serial' (disks: $(echo $(ls /sys/block)))"
    sleep 0.05
done
if [ ! -b "/dev/$disk" ]; then
    tries=0
    while [ ! -b "/dev/$disk" ] && [ $tries -lt 40 ]; do tries=$((tries + 1)); sleep 0.05; done
    if [ ! -b "/dev/$disk" ]; then
        IFS=: read -r major minor < "/sys/block/$disk/dev"
        mknod "/dev/$disk" b "$major" "$minor" || fatal "cannot create /dev/$disk"
    fi
fi
mount -t erofs -o ro "/dev/$disk" /newroot || fatal "cannot mount /dev/$disk (serial $serial) as erofs"
[ -x /newroot/init ] || fatal "the runtime disk /dev/$disk has no executable /init"
if [ -d /newroot/dev ]; then
    mount --move /dev /newroot/dev || fatal "cannot move /dev into the runtime root"
else
    umount /dev
fi
umount /sys
umount /proc
exec switch_root /newroot /init
fatal "switch_root to /dev/$disk failed"
""".replace("@RUNTIME_SERIAL@", RUNTIME_DISK_SERIAL)

Log = Callable[[str], None]

MODULE_SIGNATURE_MAGIC = b"~Module signature appended~\n"


@dataclass(frozen=True)
class FallbackKernel:
    vmlinuz: Path
    initrd: Path
    release: str  # Debian kernel release, e.g. 6.1.0-56-cloud-amd64


def input_hash() -> str:
    """Hash of everything (besides the kernel package) the initramfs is made from."""
    data = "\0".join([LAYOUT_VERSION, INIT_SCRIPT, *WANTED_MODULES, BUSYBOX_PACKAGE])
    return hashlib.sha256(data.encode()).hexdigest()


def _dir_name(release: str) -> str:
    return f"fallback-{release}-{input_hash()[:12]}"


def cached_fallback() -> FallbackKernel | None:
    """The newest cached fallback for the current inputs; globbing only (fast)."""
    suffix = "-" + input_hash()[:12]
    found = []
    for directory in kernels_dir().glob(f"fallback-*{suffix}"):
        vmlinuz, initrd = directory / "vmlinuz", directory / "initrd.cpio"
        if not (vmlinuz.is_file() and initrd.is_file()):
            continue
        release = directory.name[len("fallback-") : -len(suffix)]
        found.append((directory.stat().st_mtime, FallbackKernel(vmlinuz, initrd, release)))
    return max(found, key=lambda item: item[0])[1] if found else None


# --------------------------------------------------------------------------- pure helpers


def kernel_package() -> str:
    """The real package behind linux-image-cloud-amd64, e.g. linux-image-6.1.0-56-cloud-amd64."""
    try:
        proc = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True)
    except FileNotFoundError:
        raise SetupError("apt-cache is not installed; the fallback kernel needs a Debian host") from None
    package = parse_depends(proc.stdout)
    if proc.returncode != 0 or package is None:
        raise KernelError(
            f"apt-cache knows no kernel behind {META_PACKAGE}: {proc.stderr.strip()}\n"
            "  fix: run `apt-get update`, or build the tuned kernel with `matchlock kernel build`"
        )
    return package


def parse_depends(apt_cache_depends: str) -> str | None:
    for line in apt_cache_depends.splitlines():
        fields = line.strip().lstrip("|").split()
        if len(fields) == 2 and fields[0] == "Depends:" and fields[1].startswith("linux-image-"):
            return fields[1]
    return None


def module_name(path: str) -> str:
    """`kernel/drivers/char/hw_random/virtio-rng.ko.xz` -> `virtio_rng`."""
    name = path.rsplit("/", 1)[-1]
    name = name.split(".ko", 1)[0]
    return name.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {module name: (relative path, [dependency names])}."""
    result: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        result[module_name(path)] = (path.strip(), [module_name(d) for d in deps.split()])
    return result


def load_order(wanted: Iterable[str], deps: dict[str, tuple[str, list[str]]]) -> list[str]:
    """Wanted modules and their dependencies, each after everything it needs."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise KernelError(f"modules.dep has a dependency cycle through {name}")
        visiting.add(name)
        for dep in deps[name][1]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def strip_module_signature(data: bytes) -> bytes:
    """Remove the appended PKCS#7 signature (the kernel then skips the costly check)."""
    if not data.endswith(MODULE_SIGNATURE_MAGIC):
        return data
    # struct module_signature: algo, hash, id_type, signer_len, key_id_len, pad[3], be32 sig_len
    info_end = len(data) - len(MODULE_SIGNATURE_MAGIC)
    (sig_len,) = struct.unpack(">I", data[info_end - 4 : info_end])
    end = info_end - 12 - sig_len
    if end <= 0:
        raise KernelError("malformed module signature trailer")
    return data[:end]


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed (.ko, .ko.xz, .ko.gz, .ko.zst)."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        proc = subprocess.run(["zstd", "-dc", str(path)], capture_output=True)
        if proc.returncode != 0:
            raise SetupError(f"cannot decompress {path}\n  fix: apt-get install -y zstd")
        return proc.stdout
    raise KernelError(f"unknown module format: {path}")


class CpioWriter:
    """Minimal `newc` cpio archive writer (what the kernel unpacks as initramfs).

    Owner root, mtime 0, so the archive depends only on its contents.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 0
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name}")
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = CpioWriter()
        trailer._entry("TRAILER!!!", 0, nlink=1)
        return b"".join(self._parts + trailer._parts)


def build_initramfs(busybox: bytes, applets: Iterable[str], modules: list[tuple[str, bytes]]) -> bytes:
    """The initramfs: busybox + applet links, modules + load order, /init."""
    cpio = CpioWriter()
    for directory in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    for applet in sorted(set(applets)):
        if applet and applet != "busybox" and "/" not in applet:
            cpio.symlink(f"bin/{applet}", "busybox")
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("lib/modules/order", "".join(f"{name}\n" for name, _ in modules).encode())
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    return cpio.getvalue()


# --------------------------------------------------------------------------- build


def build_fallback(log: Log = print) -> FallbackKernel:
    """Download Debian's cloud kernel and build its initramfs (cached)."""
    package = kernel_package()
    release = package[len("linux-image-") :]
    final = kernels_dir() / _dir_name(release)
    if (final / "vmlinuz").is_file() and (final / "initrd.cpio").is_file():
        return FallbackKernel(final / "vmlinuz", final / "initrd.cpio", release)
    with file_lock(kernels_dir() / ".lock-fallback"):
        if (final / "vmlinuz").is_file() and (final / "initrd.cpio").is_file():
            return FallbackKernel(final / "vmlinuz", final / "initrd.cpio", release)
        log(f"preparing the fallback kernel: Debian {package} (run `matchlock kernel build` for a faster one)")
        debs = debian.download([package, BUSYBOX_PACKAGE])
        scratch_parent = cache_dir() / "kernel-build"
        scratch_parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fallback-", dir=scratch_parent) as scratch:
            root = Path(scratch) / "kernel"
            bbroot = Path(scratch) / "busybox"
            debian.extract(debs[package], root)
            debian.extract(debs[BUSYBOX_PACKAGE], bbroot)
            vmlinuz, modules, order = _collect_kernel(root, release, log)
            busybox_path = bbroot / "bin" / "busybox"
            if not busybox_path.is_file():
                raise KernelError(f"{BUSYBOX_PACKAGE} has no /bin/busybox")
            applets = _busybox_applets(busybox_path)
            initrd = build_initramfs(busybox_path.read_bytes(), applets, modules)
            with staging_dir(final) as stage:
                shutil.copy2(vmlinuz, stage / "vmlinuz")
                (stage / "initrd.cpio").write_bytes(initrd)
                (stage / "build.json").write_text(
                    json.dumps(
                        {
                            "release": release,
                            "package": package,
                            "package_version": debs[package].name.split("_")[1].replace("%3a", ":"),
                            "busybox": debs[BUSYBOX_PACKAGE].name,
                            "modules": order,
                            "input_sha256": input_hash(),
                            "initrd_bytes": len(initrd),
                        },
                        indent=2,
                    )
                    + "\n"
                )
        log(f"fallback kernel ready: {final}")
    return FallbackKernel(final / "vmlinuz", final / "initrd.cpio", release)


def _modules_root(root: Path, release: str) -> Path:
    for candidate in (root / "lib" / "modules" / release, root / "usr" / "lib" / "modules" / release):
        if candidate.is_dir():
            return candidate
    raise KernelError(f"the kernel package has no modules directory for {release}")


def _collect_kernel(root: Path, release: str, log: Log) -> tuple[Path, list[tuple[str, bytes]], list[str]]:
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise KernelError(f"the kernel package has no boot/vmlinuz-{release}")
    moddir = _modules_root(root, release)
    if not (moddir / "modules.dep").is_file():
        if shutil.which("depmod") is None:
            raise SetupError("depmod is needed to index the fallback kernel's modules\n  fix: apt-get install -y kmod")
        base = moddir.parent.parent.parent  # depmod -b BASE reads BASE/lib/modules/RELEASE
        proc = subprocess.run(["depmod", "-b", str(base), release], capture_output=True, text=True)
        if proc.returncode != 0 or not (moddir / "modules.dep").is_file():
            raise KernelError(f"depmod -b {base} {release} failed: {proc.stderr.strip()}")
    deps = parse_modules_dep((moddir / "modules.dep").read_text())
    builtin_path = moddir / "modules.builtin"
    builtin = {module_name(line) for line in builtin_path.read_text().split()} if builtin_path.is_file() else set()
    wanted = []
    for name in WANTED_MODULES:
        if name in deps:
            wanted.append(name)
        elif name in builtin:
            continue
        elif name in REQUIRED_MODULES:
            raise KernelError(f"{release} has no {name} (neither a module nor built in); it cannot boot matchlock")
        else:
            log(f"note: {release} has no {name}; continuing without it")
    order = load_order(wanted, deps)
    modules = [(name, strip_module_signature(read_module(moddir / deps[name][0]))) for name in order]
    return vmlinuz, modules, order


def _busybox_applets(busybox: Path) -> list[str]:
    proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True)
    applets = proc.stdout.split()
    needed = {
        "sh",
        "mount",
        "umount",
        "insmod",
        "cat",
        "sleep",
        "mknod",
        "switch_root",
        "reboot",
        "poweroff",
        "ls",
        "echo",
    }
    if proc.returncode != 0 or not needed <= set(applets):
        raise KernelError(
            f"{busybox} --list did not list the applets the initramfs needs ({', '.join(sorted(needed))})"
        )
    return applets
