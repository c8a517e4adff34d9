"""Extra disks: ext4 images (named volumes or raw files) mounted into the guest as virtio-blk devices.

`--disk @NAME:/guest/path[:ro][,uid=N,gid=N]` names a volume; `--disk /host/img.ext4:/guest/path[:ro]`
a raw image. The RPC's `extra_disks` entries parse into the same `DiskMount`. `@NAME` is kept as
given: resolving it to an image (and locking it) is the sandbox's job, at start.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from .errors import UsageError

# The runtime, the image's lower and the writable upper disk take three of the block devices. QEMU's
# microvm has 24 virtio-mmio transports shared with the serial port, the NIC and the RNG (upstream's
# Firecracker limit is also 24 block devices in all); each extra disk also costs an fsck at start and
# a cold boot. 8 leaves a wide margin under both limits and covers every use we know (caches, data dirs).
MAX_EXTRA_DISKS = 8
# Upstream's rule (overlay_limits.go): no spaces, commas or colons, which the kernel command line and
# our `--disk` syntax could not carry.
GUEST_MOUNT_PATTERN = re.compile(r"/[a-zA-Z0-9/_.-]+")
# Where a disk would hide or break the guest's own machinery.
RESERVED_MOUNTS = ("/proc", "/sys", "/dev", "/run/matchlock")
MAX_ID = 2**32 - 2  # 2^32-1 is (uid_t)-1, "no change" to chown


@dataclass(frozen=True)
class DiskMount:
    host_path: str  # an absolute image path, or "@NAME" for a named volume
    guest_mount: str
    readonly: bool = False
    owner_uid: int | None = None  # chown the filesystem root to this on first attach (still root-owned, empty)
    owner_gid: int | None = None

    @property
    def volume(self) -> str:
        """The named volume ("" for a raw image)."""
        return self.host_path[1:] if self.host_path.startswith("@") else ""

    def validate(self) -> None:
        label = f"disk {self.host_path}:{self.guest_mount}"
        if not self.host_path:
            raise UsageError(f"{label}: the host path is empty; fix: give /path/to/image.ext4 or @volume-name")
        if not self.volume and not os.path.isabs(self.host_path):
            raise UsageError(f"{label}: host path {self.host_path!r} is not absolute")
        validate_guest_mount(self.guest_mount)
        for name, value in (("uid", self.owner_uid), ("gid", self.owner_gid)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID
            ):
                raise UsageError(f"{label}: {name}={value!r} must be a whole number between 0 and {MAX_ID}")

    def to_json(self) -> dict:
        out: dict = {"host_path": self.host_path, "guest_mount": self.guest_mount, "readonly": self.readonly}
        if self.owner_uid is not None:
            out["owner_uid"] = self.owner_uid
        if self.owner_gid is not None:
            out["owner_gid"] = self.owner_gid
        return out


def validate_guest_mount(path: str) -> None:
    if path == "/":
        raise UsageError("invalid disk mount point '/': a disk cannot replace the root; fix: use e.g. /data")
    check_guest_path(path, "disk mount point", "/data")


def check_guest_path(path: str, what: str, example: str) -> None:
    """A guest path for a disk or a VFS mount: absolute, plain characters, normalized, not the guest's own."""
    if not GUEST_MOUNT_PATTERN.fullmatch(path):
        raise UsageError(
            f"invalid {what} {path!r}: it must be an absolute path of letters, digits and '/_.-' (e.g. {example})"
        )
    normal = "/" + posixpath.normpath(path).lstrip("/")
    if normal != path:
        raise UsageError(f"invalid {what} {path!r}: write it normalized, as {normal!r}")
    for reserved in RESERVED_MOUNTS:
        if path == reserved or path.startswith(reserved + "/"):
            raise UsageError(f"invalid {what} {path!r}: {reserved} is the guest's own; fix: use e.g. {example}")


def validate_disks(disks: tuple[DiskMount, ...]) -> None:
    if len(disks) > MAX_EXTRA_DISKS:
        raise UsageError(
            f"{len(disks)} extra disks requested; a sandbox takes at most {MAX_EXTRA_DISKS}: "
            "fix: put data on fewer volumes"
        )
    seen_mounts: set[str] = set()
    seen_images: set[str] = set()
    for disk in disks:
        disk.validate()
        if disk.guest_mount in seen_mounts:
            raise UsageError(f"two disks are mounted at {disk.guest_mount}; fix: give each disk its own mount point")
        seen_mounts.add(disk.guest_mount)
        image = disk.host_path if disk.volume else os.path.realpath(disk.host_path)
        if image in seen_images:
            raise UsageError(f"disk {disk.host_path} is given twice; fix: attach each image once")
        seen_images.add(image)


def parse_disk(spec: str) -> DiskMount:
    """One `--disk` value: `HOST:/guest[:ro|readonly|rw][,uid=N][,gid=N]`, HOST being a path or @NAME.

    A relative host path is made absolute and must exist (as upstream); a volume is checked at start.
    """
    head, *options = spec.split(",")
    parts = head.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UsageError(
            f"invalid --disk {spec!r}: use HOST_PATH:/guest/path[:ro] or @volume:/guest/path[:ro][,uid=N,gid=N]"
        )
    host, guest = parts[0], parts[1]
    readonly = False
    if len(parts) == 3:
        mode = parts[2]
        if mode not in ("ro", "readonly", "rw"):
            raise UsageError(f"invalid --disk {spec!r}: mode {mode!r} must be ro, readonly or rw")
        readonly = mode != "rw"
    ids: dict[str, int] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if key not in ("uid", "gid") or not sep:
            raise UsageError(f"invalid --disk {spec!r}: unknown option {option!r}; the options are uid=N and gid=N")
        if key in ids:
            raise UsageError(f"invalid --disk {spec!r}: {key} is given twice")
        if not value.strip().isdigit():
            raise UsageError(f"invalid --disk {spec!r}: {key}={value!r} must be a whole number")
        ids[key] = int(value)
    if not host.startswith("@"):
        host = os.path.abspath(host)
        if not os.path.isfile(host):
            raise UsageError(f"invalid --disk {spec!r}: {host} does not exist or is not a file; fix: create it first")
    disk = DiskMount(host, guest, readonly, ids.get("uid"), ids.get("gid"))
    disk.validate()
    return disk


def parse_disks(specs: tuple[str, ...] | list[str]) -> tuple[DiskMount, ...]:
    disks = tuple(parse_disk(spec) for spec in specs)
    validate_disks(disks)
    return disks
