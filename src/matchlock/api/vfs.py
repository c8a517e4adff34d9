"""VFS configuration: the workspace, host files mounted into the guest, interception rules.

The wire shape is upstream's `vfs` object (`workspace`, `mounts: {guest_path: {type, host_path,
readonly, owner_uid, owner_gid}}`, `interception: {emit_events, rules}`). One deliberate difference:
a mount may be anywhere in the guest (`/root/.ssh`), not only under the workspace (matchlock#82).
`-v HOST:GUEST[:opt]` parses into the same `MountConfig`.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

from . import disks
from .errors import UsageError

MOUNT_TYPES = ("memory", "host_fs", "overlay")
VFS_OPS = ("stat", "readdir", "open", "create", "mkdir", "chmod", "remove", "remove_all", "rename", "symlink",
           "readlink", "read", "write", "close", "sync", "truncate")  # fmt: skip
OP_ALIASES = {"read_dir": "readdir", "removeall": "remove_all"}
PHASES = ("before", "after")
ACTIONS = ("allow", "block")
MAX_MOUNTS = 64
MAX_RULES = 256
MAX_ID = 2**32 - 2  # 2^32-1 is (uid_t)-1


@dataclass(frozen=True)
class MemoryFile:
    """A memory mount that is one file holding `data` (`matchlock build`'s secret mounts): in-process only.

    It never reaches JSON (`MountConfig.to_json` leaves it out) nor a repr, so its bytes stay in memory."""

    data: bytes = field(repr=False)
    mode: int = 0o400
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class MountConfig:
    type: str
    host_path: str = ""
    readonly: bool = False
    owner_uid: int | None = None
    owner_gid: int | None = None
    file: MemoryFile | None = field(default=None, repr=False, compare=False)  # memory: one file, not a directory

    def validate(self, guest: str) -> None:
        label = f"vfs mount {guest}"
        if self.type not in MOUNT_TYPES:
            raise UsageError(f"{label}: type {self.type!r} is not one of {', '.join(MOUNT_TYPES)}")
        if self.type == "memory":
            if self.host_path:
                raise UsageError(f"{label}: a memory mount takes no host_path (got {self.host_path!r})")
        elif self.file is not None:
            raise UsageError(f"{label}: only a memory mount can be one in-memory file")
        else:
            if not self.host_path:
                raise UsageError(f"{label}: type {self.type} needs host_path; fix: give the host directory")
            if not os.path.isabs(self.host_path):
                raise UsageError(f"{label}: host_path {self.host_path!r} is not absolute")
            if not os.path.exists(self.host_path):
                raise UsageError(f"{label}: host_path {self.host_path} does not exist; fix: create it first")
            if self.type == "overlay" and not os.path.isdir(self.host_path):
                raise UsageError(f"{label}: overlay host_path {self.host_path} is not a directory; fix: use host_fs")
            if not (os.path.isdir(self.host_path) or os.path.isfile(self.host_path)):
                raise UsageError(
                    f"{label}: host_path {self.host_path} is neither a directory nor a regular file (a device, "
                    "FIFO or socket is never served); fix: mount the directory that holds it"
                )
        if (self.owner_uid is not None or self.owner_gid is not None) and self.type != "host_fs":
            raise UsageError(f"{label}: owner_uid/owner_gid are only supported for host_fs mounts")
        for name, value in (("owner_uid", self.owner_uid), ("owner_gid", self.owner_gid)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID
            ):
                raise UsageError(f"{label}: {name}={value!r} must be a whole number between 0 and {MAX_ID}")

    def to_json(self) -> dict:
        out: dict = {"type": self.type}
        if self.host_path:
            out["host_path"] = self.host_path
        if self.readonly:
            out["readonly"] = True
        if self.owner_uid is not None:
            out["owner_uid"] = self.owner_uid
        if self.owner_gid is not None:
            out["owner_gid"] = self.owner_gid
        return out


@dataclass(frozen=True)
class VFSHookRule:
    name: str = ""
    phase: str = "before"
    ops: tuple[str, ...] = ()
    path: str = ""
    action: str = "allow"
    timeout_ms: int = 0

    def validate(self) -> None:
        label = f"vfs interception rule {self.name or '(unnamed)'}"
        if self.phase not in PHASES:
            raise UsageError(f"{label}: phase {self.phase!r} must be before or after")
        if self.action not in ACTIONS:
            raise UsageError(f"{label}: action {self.action!r} must be allow or block")
        for op in self.ops:
            if op not in VFS_OPS:
                raise UsageError(f"{label}: op {op!r} is not one of {', '.join(VFS_OPS)}")
        if self.path and not self.path.startswith("/"):
            raise UsageError(f"{label}: path {self.path!r} must be an absolute guest path glob (e.g. /workspace/*)")


def normalize_op(op: str) -> str:
    op = op.strip().lower()
    return OP_ALIASES.get(op, op)


@dataclass(frozen=True)
class VFSInterceptionConfig:
    emit_events: bool = False
    rules: tuple[VFSHookRule, ...] = ()


@dataclass(frozen=True)
class VFSConfig:
    workspace: str = ""
    mounts: dict[str, MountConfig] = field(default_factory=dict)
    interception: VFSInterceptionConfig | None = None

    @property
    def active(self) -> bool:
        return bool(self.mounts)

    def validate(self) -> None:
        if self.workspace:
            check_guest_path(self.workspace, "vfs workspace")
            if not self.mounts:
                raise UsageError(
                    f"vfs workspace {self.workspace} has no mounts; fix: add a mount (-v HOST:GUEST) or drop it"
                )
        if self.interception is not None and not self.mounts:
            raise UsageError("vfs interception needs at least one mount; fix: add a mount or drop the rules")
        if len(self.mounts) > MAX_MOUNTS:
            raise UsageError(f"{len(self.mounts)} vfs mounts; a sandbox takes at most {MAX_MOUNTS}")
        for guest, mount in self.mounts.items():
            check_guest_path(guest, "vfs mount point")
            mount.validate(guest)
        if self.workspace and not any(under(guest, self.workspace) for guest in self.mounts):
            # Nothing would make it: commands then ran in / without a word.
            raise UsageError(
                f"vfs workspace {self.workspace} holds no mount (they are at {', '.join(sorted(self.mounts))}); "
                f"fix: mount something at or under it (-v HOST:{self.workspace}/NAME) or drop the workspace"
            )
        if self.interception is not None:
            if len(self.interception.rules) > MAX_RULES:
                raise UsageError(f"{len(self.interception.rules)} vfs interception rules; at most {MAX_RULES}")
            for rule in self.interception.rules:
                rule.validate()

    def to_json(self) -> dict:
        out: dict = {"mounts": {guest: mount.to_json() for guest, mount in self.mounts.items()}}
        if self.workspace:
            out["workspace"] = self.workspace
        if self.interception is not None:
            out["interception"] = {
                "emit_events": self.interception.emit_events,
                "rules": [
                    {"name": r.name, "phase": r.phase, "ops": list(r.ops), "path": r.path, "action": r.action}
                    for r in self.interception.rules
                ],
            }
        return out


def check_guest_path(path: str, what: str) -> None:
    if path == "/":
        raise UsageError(f"invalid {what} '/': it cannot replace the guest's root; fix: use e.g. /workspace")
    disks.check_guest_path(path, what, "/workspace")


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_disk_shadowing(vfs: VFSConfig, disk_mounts: tuple[str, ...]) -> None:
    """A disk mounted where the VFS mounts over it would be hidden: refuse it (as upstream, for any mount)."""
    if not vfs.mounts:
        return
    for disk in disk_mounts:
        if vfs.workspace and under(disk, vfs.workspace):
            raise UsageError(
                f"disk mount {disk} lies inside the VFS workspace {vfs.workspace}, which would shadow it; "
                "fix: mount the disk outside the workspace"
            )
        for guest in vfs.mounts:
            if under(disk, guest):
                raise UsageError(
                    f"disk mount {disk} lies inside the VFS mount {guest}, which would shadow it; "
                    "fix: mount the disk elsewhere"
                )


def parse_volume_spec(spec: str, workspace: str) -> tuple[str, MountConfig]:
    """One `-v HOST:GUEST[:opt]`: opt is overlay (default), host_fs, ro/readonly, with `,uid=N,gid=N` for host_fs.

    The host path is made absolute and must exist. A relative guest path is joined to the workspace.
    """
    head, *options = spec.split(",")
    parts = head.split(":")
    usage = "use HOST:GUEST[:overlay|host_fs|ro][,uid=N,gid=N]"
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UsageError(f"invalid -v {spec!r}: {usage}")
    host = os.path.abspath(parts[0])
    if not os.path.exists(host):
        raise UsageError(f"invalid -v {spec!r}: host path {host} does not exist; fix: create it first")
    if parts[0].endswith("/") and not os.path.isdir(host):
        raise UsageError(f"invalid -v {spec!r}: host path {parts[0]} is not a directory; fix: drop the trailing '/'")
    guest = parts[1]
    if not guest.startswith("/"):
        if not workspace:
            raise UsageError(
                f"invalid -v {spec!r}: relative guest path {guest!r} needs --workspace; fix: give an absolute "
                "guest path or --workspace"
            )
        guest = posixpath.join(workspace, guest)
    guest = "/" + posixpath.normpath(guest).lstrip("/")
    option = parts[2] if len(parts) == 3 else "overlay"
    kinds = {"overlay": ("overlay", False), "host_fs": ("host_fs", False), "ro": ("host_fs", True),
             "readonly": ("host_fs", True)}  # fmt: skip
    if option not in kinds:
        raise UsageError(f"invalid -v {spec!r}: unknown option {option!r}; the options are overlay, host_fs and ro")
    kind, readonly = kinds[option]
    ids: dict[str, int] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if key not in ("uid", "gid") or not sep or not value.isdigit():
            raise UsageError(f"invalid -v {spec!r}: option {item!r} must be uid=N or gid=N")
        if key in ids:
            raise UsageError(f"invalid -v {spec!r}: {key}= is given twice; fix: give it once")
        ids[key] = int(value)
    if ids and kind != "host_fs":
        raise UsageError(
            f"invalid -v {spec!r}: uid=/gid= apply only to host_fs and ro mounts, not {option}; "
            f"fix: {parts[0]}:{parts[1]}:host_fs,{','.join(options)}"
        )
    mount = MountConfig(kind, host, readonly, ids.get("uid"), ids.get("gid"))
    try:
        mount.validate(guest)
    except UsageError as exc:
        raise UsageError(f"invalid -v {spec!r}: {exc}") from None
    return guest, mount


def build_vfs(workspace: str, volumes: tuple[str, ...] | list[str]) -> VFSConfig:
    """`--workspace` and `-v` flags into a VFSConfig (validated)."""
    if workspace and not volumes:
        raise UsageError(f"--workspace {workspace} needs at least one -v HOST:GUEST mount")
    mounts: dict[str, MountConfig] = {}
    for spec in volumes:
        guest, mount = parse_volume_spec(spec, workspace)
        if guest in mounts:
            raise UsageError(f"invalid -v {spec!r}: {guest} is mounted twice; fix: give each mount its own path")
        mounts[guest] = mount
    config = VFSConfig(workspace=workspace, mounts=mounts)
    config.validate()
    return config


def split_volume_flags(values: tuple[str, ...] | list[str]) -> list[str]:
    """`-v` values are comma-splittable (as upstream's string slice); an option item (`uid=N`, or any
    `key=value` with no ':', which cannot be a spec) stays with its spec, so an error names both."""
    specs: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if specs and "=" in item and ":" not in item:
                specs[-1] += "," + item
            else:
                specs.append(item)
    return specs
