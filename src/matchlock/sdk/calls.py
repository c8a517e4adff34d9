"""Every SDK call without I/O (shared by `Client` and `AsyncClient`): the request it sends and how its result
is read, as a `Call`; each client only writes it, awaits the answer and returns `call.parse(result)`.

The params are exactly what the published SDK 0.2.17 sends (sdk-wire.md §2-§3). Results are checked
here: a malformed answer raises `MatchlockError` naming the method and the field, where the published
SDK raised a bare KeyError or TypeError.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Generic, TypeVar

from .builder import Sandbox
from .errors import MatchlockError
from .streams import InputRoute, Notify, encode, output_writer
from .types import (
    AllowListUpdate,
    CreateOptions,
    ExecInteractiveResult,
    ExecPipeResult,
    ExecResult,
    ExecStreamResult,
    FileInfo,
    PortForward,
    PortForwardBinding,
)

R = TypeVar("R")

DEFAULT_FORWARD_ADDRESS = "127.0.0.1"
CLOSE_DEFAULT_SECONDS = 2.0
# The published SDK waited forever for these two; a hung server now surfaces as TimeoutError.
# Create covers a cold image pull plus boot under TCG, hence the generous bound.
CREATE_TIMEOUT = 900.0
PORT_FORWARD_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One request: its method and params (None: no `params` key), how its result is read, and the handler
    of the notifications that name it."""

    method: str
    params: dict[str, Any] | None
    parse: Callable[[Any], R]
    on_notification: Notify | None = None


def _ignore(_result: Any) -> None:
    return None


# --- create ------------------------------------------------------------------------------------


def validate_create(opts: CreateOptions) -> None:
    if not opts.image and not opts.from_snapshot:
        raise MatchlockError("image is required (e.g., alpine:latest)")
    if opts.network_mtu < 0:
        raise MatchlockError("network mtu must be > 0")
    if opts.no_network and (
        opts.allowed_hosts or opts.secrets or opts.force_interception or opts.network_interception is not None
    ):
        raise MatchlockError(
            "no network cannot be combined with allowed hosts, secrets, forced interception, "
            "or network interception rules"
        )


def create_params(
    opts: CreateOptions, vfs_interception: dict[str, Any] | None, network_interception: dict[str, Any] | None
) -> dict[str, Any]:
    """The `create` params; the interception parts come compiled from `hooks` (callbacks stripped)."""
    params: dict[str, Any] = {"image": opts.image} if opts.image else {}
    if opts.from_snapshot:
        params["from_snapshot"] = opts.from_snapshot
    if opts.kernel_ref:
        params["kernel"] = {"ref": opts.kernel_ref}
    if opts.privileged:
        params["privileged"] = True
    resources = {
        key: value
        for key, value in (
            ("cpus", opts.cpus),
            ("memory_mb", opts.memory_mb),
            ("disk_size_mb", opts.disk_size_mb),
            ("timeout_seconds", opts.timeout_seconds),
        )
        if value
    }
    if resources:
        params["resources"] = resources
    network = _network_params(opts, network_interception)
    if network is not None:
        params["network"] = network
    if opts.mounts or opts.workspace or vfs_interception is not None:
        vfs: dict[str, Any] = {}
        if opts.mounts:
            vfs["mounts"] = {guest: mount.to_dict() for guest, mount in opts.mounts.items()}
        if opts.workspace:
            vfs["workspace"] = opts.workspace
        if vfs_interception is not None:
            vfs["interception"] = vfs_interception
        params["vfs"] = vfs
    if opts.env:
        params["env"] = opts.env
    if opts.image_config is not None:
        params["image_config"] = opts.image_config.to_dict()
    if opts.launch_entrypoint:
        params["launch_entrypoint"] = True
    return params


def _network_params(opts: CreateOptions, interception: dict[str, Any] | None) -> dict[str, Any] | None:
    # An explicit setting, or the legacy way of asking for blocking (block_private_ips=True alone).
    explicit_private = opts.block_private_ips_set or opts.block_private_ips
    wanted = (
        opts.allowed_hosts
        or opts.add_hosts
        or opts.secrets
        or opts.dns_servers
        or opts.hostname
        or opts.network_mtu > 0
        or opts.no_network
        or explicit_private
        or opts.force_interception
        or interception is not None
    )
    if not wanted:
        return None
    if opts.no_network:
        shape: dict[str, Any] = {"no_network": True}
        if opts.dns_servers:
            shape["dns_servers"] = opts.dns_servers
        if opts.hostname:
            shape["hostname"] = opts.hostname
        return shape
    # The server replaces its network defaults wholesale, so blocking stays on unless turned off.
    network: dict[str, Any] = {
        "allowed_hosts": opts.allowed_hosts,
        "block_private_ips": opts.block_private_ips if explicit_private else True,
    }
    if opts.add_hosts:
        network["add_hosts"] = [{"host": entry.host, "ip": entry.ip} for entry in opts.add_hosts]
    if opts.force_interception or interception is not None:
        network["intercept"] = True
    if interception is not None:
        network["interception"] = interception
    if opts.secrets:
        network["secrets"] = {
            secret.name: {
                "value": secret.value,
                "hosts": secret.hosts,
                **({"placeholder": secret.placeholder} if secret.placeholder else {}),
            }
            for secret in opts.secrets
        }
    if opts.dns_servers:
        network["dns_servers"] = opts.dns_servers
    if opts.hostname:
        network["hostname"] = opts.hostname
    if opts.network_mtu > 0:
        network["mtu"] = opts.network_mtu
    return network


def parse_create(result: Any) -> str:
    if not isinstance(result, dict) or "id" not in result:
        raise MatchlockError("invalid create response: missing id")
    return str(result["id"])


def create(params: dict[str, Any]) -> Call[str]:
    """`params` come from `hooks.CreatePlan.params` (the options compiled, callbacks stripped)."""
    return Call("create", params, parse_create)


def launch_options(sandbox: Sandbox) -> CreateOptions:
    opts = copy.deepcopy(sandbox.options())
    opts.launch_entrypoint = True
    return opts


def close(timeout: float) -> tuple[Call[None], float]:
    """The `close` call and the seconds it gives the server (0 means the default)."""
    seconds = timeout if timeout and timeout > 0 else CLOSE_DEFAULT_SECONDS
    return Call("close", {"timeout_seconds": seconds}, _ignore), seconds


def pause() -> Call[None]:
    return Call("pause", {}, _ignore)


def resume() -> Call[None]:
    return Call("resume", {}, _ignore)


# --- snapshots and forks (matchlock's own) ---------------------------------------------------------


def parse_snapshot(result: Any) -> dict[str, Any]:
    _field(result, "snapshot", "name", str)
    return dict(result)


def snapshot_remove_params(names: tuple[str, ...]) -> dict[str, Any]:
    if not names or not all(isinstance(name, str) and name for name in names):
        raise MatchlockError(f"snapshot_remove needs snapshot names, e.g. snapshot_remove('snap1'); got {names!r}")
    return {"names": list(names)}


def parse_snapshot_list(result: Any) -> list[dict[str, Any]]:
    records = result.get("snapshots") if isinstance(result, dict) else None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("name"), str) for r in records
    ):
        raise MatchlockError(f"invalid snapshot_list response: snapshots must be a list of records, got {records!r}")
    return [dict(record) for record in records]


def parse_removed(result: Any) -> list[str]:
    removed = result.get("removed") if isinstance(result, dict) else None
    if not isinstance(removed, list) or not all(isinstance(name, str) for name in removed):
        raise MatchlockError(f"invalid snapshot_remove response: removed must be a list of names, got {removed!r}")
    return removed


MAX_FORKS = 16  # as the server's `fork` and `matchlock fork -n`


def fork_plan(parent: CreateOptions | None, count: int) -> tuple[str, CreateOptions]:
    """(temporary snapshot name, the clones' create options) for `fork(count)`.

    A clone is created from the snapshot with the parent's own create options (network policy, secrets,
    env), minus what belongs to the parent alone: its port forwards, its machine size (the snapshot's
    is kept), its entrypoint launch (a full snapshot's processes are running already) and its directory
    mounts and VFS rules (the restore brings back the snapshot's own; the clone's client adopts the
    SDK-side hooks, `_adopt_vfs_hooks`). Changes made at runtime (`allow_list_add`) are
    not carried over.
    """
    if parent is None:
        raise MatchlockError("fork needs a created sandbox: call create() first")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORKS:
        raise MatchlockError(f"invalid fork count {count!r}: fork makes 1 to {MAX_FORKS} clones at a time")
    name = f"sdk-fork-{secrets.token_hex(4)}"
    clone = dataclasses.replace(
        parent,  # shallow: hook callables stay the user's own objects; nothing here mutates the lists
        from_snapshot=name,
        cpus=0,
        memory_mb=0,
        disk_size_mb=0,
        port_forwards=[],
        port_forward_addresses=[],
        launch_entrypoint=False,
        mounts={},
        vfs_interception=None,
        workspace="",
    )
    return name, clone


def snapshot(name: str, mode: str) -> Call[dict[str, Any]]:
    return Call("snapshot", {"mode": mode} | ({"name": name} if name else {}), parse_snapshot)


def snapshot_list() -> Call[list[dict[str, Any]]]:
    return Call("snapshot_list", {}, parse_snapshot_list)


def snapshot_remove(names: tuple[str, ...]) -> Call[list[str]]:
    return Call("snapshot_remove", snapshot_remove_params(names), parse_removed)


# --- exec ----------------------------------------------------------------------------------------


def exec_params(command: str, working_dir: str = "", user: str = "") -> dict[str, Any]:
    params: dict[str, Any] = {"command": command}
    if working_dir:
        params["working_dir"] = working_dir
    if user:
        params["user"] = user
    return params


def tty_params(command: str, working_dir: str, user: str, rows: int, cols: int) -> dict[str, Any]:
    size = {"rows": rows if rows > 0 else 24, "cols": cols if cols > 0 else 80}
    return {"command": command, **size, **exec_params(command, working_dir, user)}


def _field(result: Any, method: str, name: str, kind: type) -> Any:
    if not isinstance(result, dict):
        raise MatchlockError(f"invalid {method} response: expected an object, got {type(result).__name__}")
    value = result.get(name)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MatchlockError(f"invalid {method} response: {name} must be an integer, got {value!r}")
    if kind in (str, bool) and not isinstance(value, kind):
        raise MatchlockError(f"invalid {method} response: {name} must be a {kind.__name__}, got {value!r}")
    return value


def _b64_field(result: Any, method: str, name: str) -> bytes:
    try:
        return base64.b64decode(_field(result, method, name, str), validate=True)
    except binascii.Error as exc:
        raise MatchlockError(f"invalid {method} response: {name} is not base64 ({exc})") from exc


def parse_exec(result: Any) -> ExecResult:
    return ExecResult(
        exit_code=_field(result, "exec", "exit_code", int),
        stdout=_b64_field(result, "exec", "stdout").decode("utf-8", errors="replace"),
        stderr=_b64_field(result, "exec", "stderr").decode("utf-8", errors="replace"),
        duration_ms=_field(result, "exec", "duration_ms", int),
    )


def parse_status(result: Any, method: str) -> tuple[int, int]:
    """(exit_code, duration_ms) of exec_stream / exec_pipe / exec_tty."""
    return _field(result, method, "exit_code", int), _field(result, method, "duration_ms", int)


def exec_command(command: str, working_dir: str) -> Call[ExecResult]:
    return Call("exec", exec_params(command, working_dir), parse_exec)


def exec_stream(
    command: str, working_dir: str, stdout: IO[str] | None, stderr: IO[str] | None
) -> Call[ExecStreamResult]:
    on_output = output_writer({"exec_stream.stdout": stdout, "exec_stream.stderr": stderr})
    return Call(
        "exec_stream",
        exec_params(command, working_dir),
        lambda result: ExecStreamResult(*parse_status(result, "exec_stream")),
        on_output,
    )


def exec_pipe(
    command: str,
    working_dir: str,
    user: str,
    stdout: IO[str] | None,
    stderr: IO[str] | None,
    ready: Callable[[], object],
) -> tuple[Call[ExecPipeResult], InputRoute]:
    """The call and the route its input takes once the server says ready (which calls `ready`)."""
    route = InputRoute("exec_pipe", {"exec_pipe.stdout": stdout, "exec_pipe.stderr": stderr}, ready)
    call = Call(
        "exec_pipe",
        exec_params(command, working_dir, user),
        lambda result: ExecPipeResult(*parse_status(result, "exec_pipe")),
        route.on_notification,
    )
    return call, route


def exec_tty(
    command: str,
    working_dir: str,
    user: str,
    rows: int,
    cols: int,
    stdout: IO[str] | None,
    ready: Callable[[], object],
) -> tuple[Call[ExecInteractiveResult], InputRoute]:
    route = InputRoute("exec_tty", {"exec_tty.stdout": stdout}, ready)
    call = Call(
        "exec_tty",
        tty_params(command, working_dir, user, rows, cols),
        lambda result: ExecInteractiveResult(*parse_status(result, "exec_tty")),
        route.on_notification,
    )
    return call, route


# --- files and log ---------------------------------------------------------------------------------


def write_file(path: str, content: bytes, mode: int) -> Call[None]:
    return Call("write_file", {"path": path, "content": encode(content), "mode": mode}, _ignore)


def read_file(path: str) -> Call[bytes]:
    return Call("read_file", {"path": path}, lambda result: _b64_field(result, "read_file", "content"))


def list_files(path: str) -> Call[list[FileInfo]]:
    return Call("list_files", {"path": path}, parse_list_files)


def parse_list_files(result: Any) -> list[FileInfo]:
    files = result.get("files", []) if isinstance(result, dict) else None
    if not isinstance(files, list):
        raise MatchlockError(f"invalid list_files response: files must be a list, got {files!r}")
    listing = []
    for entry in files:
        listing.append(
            FileInfo(
                name=_field(entry, "list_files", "name", str),
                size=_field(entry, "list_files", "size", int),
                mode=_field(entry, "list_files", "mode", int),
                is_dir=_field(entry, "list_files", "is_dir", bool),
            )
        )
    return listing


def parse_log(result: Any) -> str:
    return _b64_field(result, "log", "content").decode("utf-8", errors="replace")


def log() -> Call[str]:
    return Call("log", None, parse_log)


def log_stream(stdout: IO[str] | None) -> Call[None]:
    return Call("log_stream", None, _ignore, output_writer({"log_stream.data": stdout}))


# --- port forwarding -------------------------------------------------------------------------------


def _port(raw: str, role: str) -> int:
    text = raw.strip()
    if not text:
        raise MatchlockError(f"invalid port-forward spec: empty {role} port")
    try:
        port = int(text, 10)
    except ValueError as exc:
        raise MatchlockError(f"invalid port value {text!r}") from exc
    if not 1 <= port <= 65535:
        raise MatchlockError(f"invalid port value {port}: must be in range 1-65535")
    return port


def parse_forward_spec(spec: str) -> PortForward:
    """`[LOCAL:]REMOTE`; a bare port forwards to the same port."""
    text = str(spec).strip()
    if not text:
        raise MatchlockError("invalid port-forward spec: empty spec")
    parts = text.split(":")
    if len(parts) == 1:
        port = _port(parts[0], "remote")
        return PortForward(local_port=port, remote_port=port)
    if len(parts) == 2:
        return PortForward(local_port=_port(parts[0], "local"), remote_port=_port(parts[1], "remote"))
    raise MatchlockError(f"invalid port-forward spec: {text!r} (expected [LOCAL_PORT:]REMOTE_PORT)")


def port_forward_params(addresses: list[str] | None, forwards: list[PortForward]) -> dict[str, Any]:
    return {
        "forwards": [{"local_port": int(f.local_port), "remote_port": int(f.remote_port)} for f in forwards],
        "addresses": list(addresses) if addresses else [DEFAULT_FORWARD_ADDRESS],
    }


def parse_bindings(result: Any) -> list[PortForwardBinding]:
    if not isinstance(result, dict):
        raise MatchlockError("invalid port_forward response: expected object")
    raw = result.get("bindings")
    if not isinstance(raw, list):
        raise MatchlockError("invalid port_forward response: bindings must be a list")
    bindings = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise MatchlockError("invalid port_forward response: binding entry must be an object")
        address = str(entry.get("address", "")).strip()
        if not address:
            raise MatchlockError("invalid port_forward response: binding address is required")
        ports = []
        for name in ("local_port", "remote_port"):
            value = entry.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise MatchlockError(f"invalid port_forward response: {name} must be in range 1-65535, got {value!r}")
            ports.append(value)
        bindings.append(PortForwardBinding(address=address, local_port=ports[0], remote_port=ports[1]))
    return bindings


def port_forward(addresses: list[str] | None, forwards: list[PortForward]) -> Call[list[PortForwardBinding]] | None:
    """None when there is nothing to forward: no request is sent then."""
    if not forwards:
        return None
    return Call("port_forward", port_forward_params(addresses, forwards), parse_bindings)


# --- runtime allow-list (new; the Go SDK's shape) ----------------------------------------------------


def allow_list_params(hosts: tuple[str, ...]) -> dict[str, Any]:
    """Hosts may be comma-separated; they are trimmed and de-duplicated in order."""
    wanted: list[str] = []
    for item in hosts:
        for host in str(item).split(","):
            host = host.strip()
            if host and host not in wanted:
                wanted.append(host)
    if not wanted:
        raise MatchlockError("allow-list update needs at least one host, e.g. allow_list_add('api.example.com')")
    return {"hosts": wanted}


def parse_allow_list(result: Any, method: str, changed_key: str) -> AllowListUpdate:
    if not isinstance(result, dict):
        raise MatchlockError(f"invalid {method} response: expected object")
    lists = []
    for key in (changed_key, "allowed_hosts"):
        value = result.get(key) or []  # upstream sends null for an empty list
        if not isinstance(value, list) or not all(isinstance(host, str) for host in value):
            raise MatchlockError(f"invalid {method} response: {key} must be a list of strings, got {value!r}")
        lists.append(list(value))
    return AllowListUpdate(changed=lists[0], allowed_hosts=lists[1])


def allow_list_add(hosts: tuple[str, ...]) -> Call[AllowListUpdate]:
    return Call(
        "allow_list_add", allow_list_params(hosts), lambda result: parse_allow_list(result, "allow_list_add", "added")
    )


def allow_list_delete(hosts: tuple[str, ...]) -> Call[AllowListUpdate]:
    return Call(
        "allow_list_delete",
        allow_list_params(hosts),
        lambda result: parse_allow_list(result, "allow_list_delete", "removed"),
    )
