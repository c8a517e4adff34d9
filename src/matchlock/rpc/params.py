"""Typed access to request params, and `create` params into the sandbox config types.

Every type or value error becomes -32602 naming the field (`resources.cpus`, `network.secrets.K.hosts`).
Unknown keys are ignored, as upstream does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..api.config import Resources, SandboxConfig
from ..api.disks import DiskMount
from ..api.errors import UsageError
from ..api.image import ImageConfig
from ..api.network import (
    DEFAULT_MTU,
    HostMapping,
    InterceptionConfig,
    InterceptionRule,
    NetworkConfig,
    SecretConfig,
    validate_host_glob,
)
from ..api.vfs import MountConfig, VFSConfig, VFSHookRule, VFSInterceptionConfig, normalize_op
from ..image.reference import parse as parse_reference
from ..jsonrpc import INVALID_PARAMS, JSONObject
from ..state import snapshots as records

if TYPE_CHECKING:
    from ..sandbox.snapshots import Restore


class RpcError(Exception):
    """An error answer: `code` and `message` go on the wire as they are."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bad(field: str, problem: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"invalid params: {field} {problem}")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class Fields:
    """Reads typed values out of one JSON object; `prefix` names nested fields in errors."""

    def __init__(self, obj: JSONObject, prefix: str = "") -> None:
        self.obj = obj
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def string(self, key: str, *, required: bool = False, max_len: int = 1 << 20) -> str:
        value = self.obj.get(key)
        if value is None:
            if required:
                raise bad(self.name(key), "is required")
            return ""
        if not isinstance(value, str):
            raise bad(self.name(key), f"must be a string, got {_kind(value)}")
        if required and not value:
            raise bad(self.name(key), "is required")
        if len(value) > max_len:
            raise bad(self.name(key), f"is longer than {max_len} characters")
        return value

    def integer(
        self, key: str, *, default: int = 0, lo: int | None = None, hi: int | None = None, required: bool = False
    ) -> int:
        value = self.obj.get(key)
        if value is None:
            if required:
                raise bad(self.name(key), "is required")
            return default
        # JSON has one number type: 3.0 is accepted as 3, as Go's decoder does for integral floats.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(self.name(key), f"must be an integer, got {_kind(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise bad(self.name(key), f"must be between {lo} and {hi}, got {value}")
        return value

    def number(self, key: str) -> float:
        value = self.obj.get(key)
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad(self.name(key), f"must be a number, got {_kind(value)}")
        return float(value)

    def boolean(self, key: str, *, default: bool = False) -> bool:
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad(self.name(key), f"must be true or false, got {_kind(value)}")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise bad(self.name(key), f"must be an array of strings, got {_kind(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise bad(f"{self.name(key)}[{index}]", f"must be a string, got {_kind(item)}")
        return tuple(value)

    def string_map(self, key: str) -> dict[str, str]:
        value = self.obj.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad(self.name(key), f"must be an object of strings, got {_kind(value)}")
        for name, item in value.items():
            if not isinstance(item, str):
                raise bad(f"{self.name(key)}.{name}", f"must be a string, got {_kind(item)}")
        return dict(value)

    def objects(self, key: str) -> list[Fields]:
        value = self.obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise bad(self.name(key), f"must be an array of objects, got {_kind(value)}")
        out = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise bad(f"{self.name(key)}[{index}]", f"must be an object, got {_kind(item)}")
            out.append(Fields(item, f"{self.name(key)}[{index}]."))
        return out

    def child(self, key: str) -> Fields | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise bad(self.name(key), f"must be an object, got {_kind(value)}")
        return Fields(value, f"{self.name(key)}.")


# --- create ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreRequest:
    """`create` with `from_snapshot`: what must agree with the snapshot once it is loaded (`prepare_restore`)."""

    name: str
    image: str  # as given; "" takes the snapshot's
    resources: dict[str, float]  # the resources.cpus / memory_mb / disk_size_mb that were given (> 0)


@dataclass(frozen=True)
class CreateParams:
    config: SandboxConfig  # with `restore`: not validated yet, and its image may be "" (the snapshot has one)
    kernel_path: str  # from `kernel.ref` file:///abs/path: the kernel image to boot, "" for none
    kernel_image: str  # from `kernel.ref` as an OCI reference: the kernel artifact to pull, "" for none
    launch_entrypoint: bool
    restore: RestoreRequest | None = None


def parse_create(params: JSONObject) -> CreateParams:
    fields = Fields(params)
    if fields.has("id"):
        raise RpcError(INVALID_PARAMS, "id is internal-only and cannot be set")
    restore = _restore_request(fields)
    image = fields.string("image")
    if not image and restore is None:
        raise RpcError(INVALID_PARAMS, "image is required (e.g., alpine:latest)")
    config = SandboxConfig(
        image=image,
        privileged=fields.boolean("privileged"),
        resources=_resources(fields.child("resources")),
        network=_network(fields.child("network")),
        env=fields.string_map("env"),
        image_config=_image_config(fields.child("image_config")),
        extra_disks=tuple(_disk(disk) for disk in fields.objects("extra_disks")),
        vfs=_vfs(fields.child("vfs")),
    )
    if restore is None:  # a restore's config is validated once the snapshot's image and machine are in it
        try:
            config.validate()
        except UsageError as exc:
            raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
    kernel_path, kernel_image = _kernel(fields.child("kernel"))
    return CreateParams(config, kernel_path, kernel_image, fields.boolean("launch_entrypoint"), restore)


# What a restore cannot take, as `run --from-snapshot`: the machine and its mounts come from the
# snapshot, and volumes are shared state a clone cannot own.
_NOT_WITH_RESTORE = {
    "vfs": "a restore brings back the snapshot's own directory mounts",
    "extra_disks": "a restore brings back its own copies of the snapshot's disks",
}


def _restore_request(fields: Fields) -> RestoreRequest | None:
    name = fields.string("from_snapshot", max_len=64)
    if not name:
        return None
    try:
        records.validate_name(name)
    except UsageError as exc:
        raise bad("from_snapshot", f"is invalid: {exc}") from None
    for key, why in _NOT_WITH_RESTORE.items():
        if fields.obj.get(key):
            raise bad(key, f"cannot be combined with from_snapshot: {why}; drop {key}")
    kernel = fields.child("kernel")
    if kernel is not None and kernel.string("ref", max_len=4096):
        raise bad("kernel.ref", "cannot be combined with from_snapshot: the restore runs the snapshot's kernel")
    given: dict[str, float] = {}
    resources = fields.child("resources")
    if resources is not None:
        for key in ("cpus", "memory_mb", "disk_size_mb"):
            value = resources.number(key)
            if value > 0:
                given[key] = value
    return RestoreRequest(name, fields.string("image"), given)


def prepare_restore(restore: Restore, request: RestoreRequest, config: SandboxConfig) -> SandboxConfig:
    """`Restore.prepare` with what the request gave explicitly; a setting the snapshot cannot take is
    -32602 naming the field, with the fix in the RPC's terms."""
    try:
        return restore.prepare(config, image=request.image, resources=request.resources)
    except records.RestoreMismatch as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc.explain('rpc')}") from None


def _disk(disk: Fields) -> DiskMount:
    """An `extra_disks` entry; `host_path` is an absolute image path or `@volume`, checked at start."""
    uid, gid = disk.obj.get("owner_uid"), disk.obj.get("owner_gid")
    return DiskMount(
        host_path=disk.string("host_path", required=True, max_len=4096),
        guest_mount=disk.string("guest_mount", required=True, max_len=4096),
        readonly=disk.boolean("readonly"),
        owner_uid=None if uid is None else disk.integer("owner_uid", lo=0, hi=2**32 - 2),
        owner_gid=None if gid is None else disk.integer("owner_gid", lo=0, hi=2**32 - 2),
    )


def _kernel(kernel: Fields | None) -> tuple[str, str]:
    """`kernel.ref` as (file path, OCI reference), at most one of them set; both "" for the default kernel."""
    ref = kernel.string("ref", max_len=4096) if kernel is not None else ""
    if not ref:
        return "", ""
    if ref.startswith(("file://", "/")):
        path = ref.removeprefix("file://")
        if not path.startswith("/"):
            raise bad("kernel.ref", f"{ref!r} is not an absolute path: use file:///absolute/path/to/vmlinux")
        return path, ""
    try:
        parse_reference(ref)
    except UsageError as exc:
        raise bad(
            "kernel.ref",
            f"is neither file:///absolute/path nor an OCI reference such as "
            f"ghcr.io/jingkaihe/matchlock/kernel:6.1.137 ({exc})",
        ) from None
    return "", ref


def _resources(obj: Fields | None) -> Resources:
    defaults = Resources()
    if obj is None:
        return defaults
    # As upstream's Merge: a field overrides the default only when it is > 0.
    cpus = obj.number("cpus")
    values: dict[str, Any] = {
        "cpus": cpus if cpus > 0 else defaults.cpus,
        "memory_mb": obj.integer("memory_mb") or defaults.memory_mb,
        "disk_size_mb": obj.integer("disk_size_mb") or defaults.disk_size_mb,
        "timeout_seconds": obj.integer("timeout_seconds") or defaults.timeout_seconds,
    }
    for key, value in values.items():
        if value < 0:
            raise bad(obj.name(key), f"must not be negative, got {value}")
    resources = Resources(**values)
    try:
        resources.validate()
    except UsageError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: resources: {exc}") from None
    return resources


def _image_config(obj: Fields | None) -> ImageConfig:
    if obj is None:
        return ImageConfig()
    return ImageConfig(
        user=obj.string("user"),
        working_dir=obj.string("working_dir"),
        entrypoint=obj.strings("entrypoint") if obj.has("entrypoint") else None,
        cmd=obj.strings("cmd") if obj.has("cmd") else None,
        env=obj.string_map("env"),
    )


def _network(obj: Fields | None) -> NetworkConfig:
    if obj is None:
        return NetworkConfig()
    add_hosts = []
    for item in obj.objects("add_hosts"):
        try:
            add_hosts.append(
                HostMapping.validated(item.string("host", required=True), item.string("ip", required=True))
            )
        except UsageError as exc:
            raise RpcError(INVALID_PARAMS, f"invalid params: {item.prefix.rstrip('.')}: {exc}") from None
    secrets: dict[str, SecretConfig] = {}
    secret_objs = obj.child("secrets")
    for name in secret_objs.obj if secret_objs is not None else {}:
        assert secret_objs is not None
        secret = secret_objs.child(name)
        if secret is None:
            raise bad(secret_objs.name(name), "must be an object with value and hosts")
        hosts = secret.strings("hosts")
        for host in hosts:
            _host_glob(host, secret.name("hosts"))
        value = secret.string("value", required=True)
        secrets[name] = SecretConfig(value=value, hosts=hosts, placeholder=secret.string("placeholder"))
    allowed = obj.strings("allowed_hosts")
    for host in allowed:
        _host_glob(host, obj.name("allowed_hosts"))
    interception = _interception(obj.child("interception"))
    return NetworkConfig(
        hostname=obj.string("hostname"),
        dns_servers=obj.strings("dns_servers"),
        add_hosts=tuple(add_hosts),
        no_network=obj.boolean("no_network"),
        allowed_hosts=tuple(dict.fromkeys(allowed)),
        # Upstream replaces the whole network object, so an absent key would mean false there; every SDK
        # sends it, and here absent keeps the safe default.
        block_private_ips=obj.boolean("block_private_ips", default=True),
        intercept=obj.boolean("intercept"),
        secrets=secrets,
        mtu=obj.integer("mtu") or DEFAULT_MTU,
        interception=interception,
    )


def _host_glob(host: str, field: str) -> None:
    try:
        validate_host_glob(host, field)
    except UsageError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None


def _interception(obj: Fields | None) -> InterceptionConfig | None:
    if obj is None:
        return None
    socket_path = obj.string("callback_socket")
    if socket_path and not socket_path.startswith("/"):
        raise bad(obj.name("callback_socket"), f"must be an absolute path, got {socket_path!r}")
    rules = []
    for rule in obj.objects("rules"):
        try:
            parsed = InterceptionRule.from_json(rule.obj)
        except UsageError as exc:
            raise RpcError(INVALID_PARAMS, f"invalid params: {rule.prefix.rstrip('.')}: {exc}") from None
        if parsed.callback_id and not socket_path:
            raise bad(rule.name("callback_id"), f"{parsed.callback_id!r} needs network.interception.callback_socket")
        rules.append(parsed)
    return InterceptionConfig(rules=tuple(rules), callback_socket=socket_path)


def _vfs(obj: Fields | None) -> VFSConfig:
    """`vfs`: `{workspace, mounts: {guest: MOUNT}, interception: {emit_events, rules}}`; validated with the config."""
    if obj is None:
        return VFSConfig()
    mounts: dict[str, MountConfig] = {}
    mount_objs = obj.child("mounts")
    for guest in mount_objs.obj if mount_objs is not None else {}:
        assert mount_objs is not None
        mount = mount_objs.child(guest)
        if mount is None:
            raise bad(mount_objs.name(guest), "must be an object with a type")
        for nested in ("upper", "lower"):
            if mount.has(nested):
                raise bad(mount.name(nested), "is not supported: use type overlay with host_path")
        uid, gid = mount.obj.get("owner_uid"), mount.obj.get("owner_gid")
        mounts[guest] = MountConfig(
            type=mount.string("type", required=True, max_len=32),
            host_path=mount.string("host_path", max_len=4096),
            readonly=mount.boolean("readonly"),
            owner_uid=None if uid is None else mount.integer("owner_uid", lo=0, hi=2**32 - 2),
            owner_gid=None if gid is None else mount.integer("owner_gid", lo=0, hi=2**32 - 2),
        )
    interception = None
    icpt = obj.child("interception")
    if icpt is not None:
        rules = []
        for rule in icpt.objects("rules"):
            action = rule.string("action", max_len=64) or "allow"
            if action not in ("allow", "block"):
                continue  # as upstream: rules with other actions (SDK callbacks) are not the server's
            rules.append(
                VFSHookRule(
                    name=rule.string("name", max_len=256),
                    phase=rule.string("phase", max_len=16) or "before",
                    ops=tuple(normalize_op(op) for op in rule.strings("ops")),
                    path=rule.string("path", max_len=4096),
                    action=action,
                    timeout_ms=rule.integer("timeout_ms", lo=0, hi=3_600_000),
                )
            )
        interception = VFSInterceptionConfig(emit_events=icpt.boolean("emit_events"), rules=tuple(rules))
    return VFSConfig(workspace=obj.string("workspace", max_len=4096), mounts=mounts, interception=interception)
