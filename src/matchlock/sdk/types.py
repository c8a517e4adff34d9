"""Public data types of the Python SDK.

Names, field order and defaults follow the published SDK 0.2.17 exactly, since user code builds these
dataclasses positionally and by keyword. Each `to_dict` emits a key only when it is set, which is the
wire shape `matchlock rpc` expects (sdk-wire.md §3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

VFS_HOOK_PHASE_BEFORE = "before"
VFS_HOOK_PHASE_AFTER = "after"
VFS_HOOK_ACTION_ALLOW = "allow"
VFS_HOOK_ACTION_BLOCK = "block"
NETWORK_HOOK_PHASE_BEFORE = "before"
NETWORK_HOOK_PHASE_AFTER = "after"
NETWORK_HOOK_ACTION_ALLOW = "allow"
NETWORK_HOOK_ACTION_BLOCK = "block"
NETWORK_HOOK_ACTION_MUTATE = "mutate"

VFS_HOOK_OP_STAT = "stat"
VFS_HOOK_OP_READDIR = "readdir"
VFS_HOOK_OP_OPEN = "open"
VFS_HOOK_OP_CREATE = "create"
VFS_HOOK_OP_MKDIR = "mkdir"
VFS_HOOK_OP_CHMOD = "chmod"
VFS_HOOK_OP_REMOVE = "remove"
VFS_HOOK_OP_REMOVE_ALL = "remove_all"
VFS_HOOK_OP_RENAME = "rename"
VFS_HOOK_OP_SYMLINK = "symlink"
VFS_HOOK_OP_READLINK = "readlink"
VFS_HOOK_OP_READ = "read"
VFS_HOOK_OP_WRITE = "write"
VFS_HOOK_OP_CLOSE = "close"
VFS_HOOK_OP_SYNC = "sync"
VFS_HOOK_OP_TRUNCATE = "truncate"

VFSHookPhase: TypeAlias = Literal["", "before", "after"]
VFSHookOp: TypeAlias = Literal[
    "stat",
    "readdir",
    "open",
    "create",
    "mkdir",
    "chmod",
    "remove",
    "remove_all",
    "rename",
    "symlink",
    "readlink",
    "read",
    "write",
    "close",
    "sync",
    "truncate",
]
VFSHookAction: TypeAlias = Literal["allow", "block"]
NetworkHookPhase: TypeAlias = Literal["", "before", "after"]
NetworkHookAction: TypeAlias = Literal["allow", "block", "mutate"]

_MAX_ID = 0xFFFF_FFFF


def _set_only(pairs: dict[str, Any]) -> dict[str, Any]:
    """Drop the keys whose value is falsy: the wire omits unset fields."""
    return {key: value for key, value in pairs.items() if value}


@dataclass
class Config:
    """How the client starts the server: `[sudo] <binary_path> rpc`."""

    binary_path: str = "matchlock"
    use_sudo: bool = False


@dataclass
class MountConfig:
    """One VFS mount: type `memory`, `host_fs` or `overlay`."""

    type: str = "memory"
    host_path: str = ""
    readonly: bool = False
    owner_uid: int | None = None
    """Owner reported for every file of a host_fs mount, in [0, 4294967295]."""
    owner_gid: int | None = None

    def __post_init__(self) -> None:
        for name in ("owner_uid", "owner_gid"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= _MAX_ID:
                raise ValueError(f"{name} must be in [0, {_MAX_ID}], got {value}")

    def to_dict(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "type": self.type,
            **_set_only({"host_path": self.host_path, "readonly": self.readonly}),
        }
        if self.owner_uid is not None:
            wire["owner_uid"] = self.owner_uid
        if self.owner_gid is not None:
            wire["owner_gid"] = self.owner_gid
        return wire


@dataclass
class VFSHookRule:
    """A VFS rule. Without a callback it goes to the server; with one it runs in the SDK."""

    name: str = ""
    phase: VFSHookPhase = ""
    ops: list[VFSHookOp] = field(default_factory=list)
    path: str = ""
    """Glob over guest absolute paths, e.g. `/workspace/*` (empty matches all)."""
    action: VFSHookAction = "allow"
    timeout_ms: int = 0
    hook: Callable[[VFSHookEvent], Any] | None = None
    """After-hook: `hook(event)`, run on a worker; events that arrive while it runs are dropped."""
    dangerous_hook: Callable[[Any, VFSHookEvent], Any] | None = None
    """After-hook that may call back into the client: `dangerous_hook(client, event)`."""
    mutate_hook: Callable[[VFSMutateRequest], bytes | str | None] | None = None
    """Rewrites the content of the SDK's own `write_file` before it is sent."""
    action_hook: Callable[[VFSActionRequest], VFSHookAction] | None = None
    """Allows or blocks the SDK's own `write_file`, `read_file` and `list_files`."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            **_set_only({"name": self.name, "phase": self.phase, "ops": self.ops, "path": self.path}),
            **({"timeout_ms": self.timeout_ms} if self.timeout_ms > 0 else {}),
        }


@dataclass
class VFSInterceptionConfig:
    emit_events: bool = False
    rules: list[VFSHookRule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        wire: dict[str, Any] = {}
        if self.emit_events:
            wire["emit_events"] = True
        if self.rules:
            wire["rules"] = [rule.to_dict() for rule in self.rules]
        return wire


@dataclass
class NetworkBodyTransform:
    """A literal find/replace over a response body."""

    find: str
    replace: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"find": self.find, **_set_only({"replace": self.replace})}


@dataclass
class NetworkHookRequest:
    """What a network callback hook is called with."""

    phase: NetworkHookPhase = ""
    host: str = ""
    method: str = ""
    path: str = ""
    query: dict[str, str] | None = None
    request_headers: dict[str, list[str]] | None = None
    status_code: int = 0
    response_headers: dict[str, list[str]] | None = None
    is_sse: bool = False


@dataclass
class NetworkHookRequestMutation:
    """Replacement request parts; a map that is set replaces the whole map."""

    headers: dict[str, list[str]] | None = None
    query: dict[str, str] | None = None
    path: str = ""


@dataclass
class NetworkHookResponseMutation:
    headers: dict[str, list[str]] | None = None
    body_replacements: list[NetworkBodyTransform] = field(default_factory=list)
    set_body: bytes | str | None = None


@dataclass
class NetworkHookResult:
    """What a network callback hook returns (None means: no opinion)."""

    action: NetworkHookAction = "allow"
    request: NetworkHookRequestMutation | None = None
    response: NetworkHookResponseMutation | None = None


@dataclass
class NetworkHookRule:
    """A network interception rule; `hook` makes the proxy ask this process over a Unix socket."""

    name: str = ""
    phase: NetworkHookPhase = ""
    hosts: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    path: str = ""
    action: NetworkHookAction = "allow"
    set_headers: dict[str, str] = field(default_factory=dict)
    delete_headers: list[str] = field(default_factory=list)
    set_query: dict[str, str] = field(default_factory=dict)
    delete_query: list[str] = field(default_factory=list)
    rewrite_path: str = ""
    set_response_headers: dict[str, str] = field(default_factory=dict)
    delete_response_headers: list[str] = field(default_factory=list)
    body_replacements: list[NetworkBodyTransform] = field(default_factory=list)
    timeout_ms: int = 0
    hook: Callable[[NetworkHookRequest], NetworkHookResult | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"action": self.action}
        wire.update(
            _set_only(
                {
                    "name": self.name,
                    "phase": self.phase,
                    "hosts": self.hosts,
                    "methods": self.methods,
                    "path": self.path,
                    "set_headers": self.set_headers,
                    "delete_headers": self.delete_headers,
                    "set_query": self.set_query,
                    "delete_query": self.delete_query,
                    "rewrite_path": self.rewrite_path,
                    "set_response_headers": self.set_response_headers,
                    "delete_response_headers": self.delete_response_headers,
                    "body_replacements": [item.to_dict() for item in self.body_replacements],
                }
            )
        )
        if self.timeout_ms > 0:
            wire["timeout_ms"] = self.timeout_ms
        return wire


@dataclass
class NetworkInterceptionConfig:
    rules: list[NetworkHookRule] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [rule.to_dict() for rule in self.rules]} if self.rules else {}


@dataclass
class VFSMutateRequest:
    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class VFSActionRequest:
    op: str
    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class VFSHookEvent:
    op: str
    path: str
    size: int
    mode: int
    uid: int
    gid: int


@dataclass
class Secret:
    """A secret: the guest sees a placeholder, the proxy puts `value` in requests to `hosts`."""

    name: str
    value: str
    hosts: list[str] = field(default_factory=list)
    placeholder: str = field(default="", kw_only=True)


@dataclass
class ImageConfig:
    """Overrides of the image's OCI config (user, working dir, entrypoint, cmd, env)."""

    user: str = ""
    working_dir: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _set_only(
            {
                "user": self.user,
                "working_dir": self.working_dir,
                "entrypoint": self.entrypoint,
                "cmd": self.cmd,
                "env": self.env,
            }
        )


@dataclass
class PortForward:
    local_port: int
    remote_port: int


@dataclass
class PortForwardBinding:
    """A host listener the server opened for a forward."""

    address: str
    local_port: int
    remote_port: int


@dataclass
class HostIPMapping:
    """A static `/etc/hosts` entry in the guest."""

    host: str
    ip: str


@dataclass
class CreateOptions:
    """Everything `create` sends; zero values mean the server's defaults."""

    image: str = ""
    kernel_ref: str = ""
    privileged: bool = False
    cpus: float = 0
    memory_mb: int = 0
    disk_size_mb: int = 0
    timeout_seconds: int = 0
    allowed_hosts: list[str] = field(default_factory=list)
    add_hosts: list[HostIPMapping] = field(default_factory=list)
    block_private_ips: bool = False
    block_private_ips_set: bool = False
    no_network: bool = False
    force_interception: bool = False
    network_interception: NetworkInterceptionConfig | None = None
    mounts: dict[str, MountConfig] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    vfs_interception: VFSInterceptionConfig | None = None
    secrets: list[Secret] = field(default_factory=list)
    workspace: str = ""
    dns_servers: list[str] = field(default_factory=list)
    hostname: str = ""
    network_mtu: int = 0
    port_forwards: list[PortForward] = field(default_factory=list)
    port_forward_addresses: list[str] = field(default_factory=list)
    image_config: ImageConfig | None = None
    launch_entrypoint: bool = False
    from_snapshot: str = ""
    """Restore this snapshot instead of booting `image` (matchlock's own; not in the published SDK)."""


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: int


@dataclass
class ExecStreamResult:
    """Exit status of a streamed exec; the output went to the writers."""

    exit_code: int
    duration_ms: int


@dataclass
class ExecPipeResult:
    exit_code: int
    duration_ms: int


@dataclass
class ExecInteractiveResult:
    exit_code: int
    duration_ms: int


@dataclass
class FileInfo:
    name: str
    size: int
    mode: int
    is_dir: bool


@dataclass
class VolumeInfo:
    name: str
    size: str
    """Human-readable, e.g. `16.0 MB`."""
    path: str


@dataclass
class AllowListUpdate:
    """Result of `allow_list_add` / `allow_list_delete` (not in the published SDK).

    `changed` holds the hosts actually added or removed; `allowed_hosts` is the whole list afterwards
    (empty means every host is allowed).
    """

    changed: list[str]
    allowed_hosts: list[str]
