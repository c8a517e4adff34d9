"""Request params and result parsing for every SDK call (sans-IO, shared by `Client` and `AsyncClient`).

The params are exactly what the published SDK 0.2.17 sends (sdk-wire.md §2-§3). Results are checked
here: a malformed answer raises `MatchlockError` naming the method and the field, where the published
SDK raised a bare KeyError or TypeError.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import secrets
from collections.abc import Callable, Mapping
from typing import IO, Any

from .errors import MatchlockError
from .types import (
    AllowListUpdate,
    CreateOptions,
    ExecResult,
    FileInfo,
    PortForward,
    PortForwardBinding,
    VolumeInfo,
)

# A handler for the notifications of one call: (method, params).
Notify = Callable[[str, dict[str, Any]], None]

DEFAULT_FORWARD_ADDRESS = "127.0.0.1"
CLOSE_DEFAULT_SECONDS = 2.0
# The published SDK waited forever for these two; a hung server now surfaces as TimeoutError.
# Create covers a cold image pull plus boot under TCG, hence the generous bound.
CREATE_TIMEOUT = 900.0
PORT_FORWARD_TIMEOUT = 60.0


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


# --- snapshots and forks (matchlock's own) ---------------------------------------------------------


def snapshot_params(name: str, mode: str) -> dict[str, Any]:
    return {"mode": mode} | ({"name": name} if name else {})


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
    is kept) and its entrypoint launch (a full snapshot's processes are running already). Changes made
    at runtime (`allow_list_add`) are not carried over.
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
    )
    return name, clone


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


def decode_chunk(params: dict[str, Any]) -> bytes | None:
    """The `data` of an output notification, or None when it is not valid base64."""
    data = params.get("data", "")
    if not isinstance(data, str):
        return None
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        return None


def write_text(writer: IO[str] | None, data: bytes | None) -> None:
    """Output chunks go to text writers decoded as UTF-8 (a split character becomes U+FFFD)."""
    if writer is None or data is None:
        return
    writer.write(data.decode("utf-8", errors="replace"))
    flush = getattr(writer, "flush", None)
    if callable(flush):
        flush()


def as_bytes(chunk: Any) -> bytes:
    return chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)


def output_writer(writers: Mapping[str, IO[str] | None]) -> Notify:
    """A notification handler that writes each output chunk to the writer named by its method."""

    def on_output(method: str, params: dict[str, Any]) -> None:
        if method in writers:
            write_text(writers[method], decode_chunk(params))

    return on_output


def deliver(handler: Notify | None, method: str, params: dict[str, Any]) -> Exception | None:
    """Run a call's notification handler; what a failing user writer raised is returned, to fail its call."""
    if handler is None:
        return None
    try:
        handler(method, params)
    except Exception as exc:  # noqa: BLE001 - a user writer failed: report it from its call
        return exc
    return None


def input_notifications(
    method: str, writers: Mapping[str, IO[str] | None], ready: Callable[[], object], target: list[int]
) -> Notify:
    """exec_pipe / exec_tty: `<method>.ready` names the process input goes to (the first id wins) and calls
    `ready`, which releases the input pumps; output chunks go to `writers`."""
    write = output_writer(writers)

    def on_notification(name: str, notification: dict[str, Any]) -> None:
        if name == f"{method}.ready":
            if isinstance(notification.get("id"), int) and not target:
                target.append(notification["id"])
            ready()
        else:
            write(name, notification)

    return on_notification


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- files and log ---------------------------------------------------------------------------------


def write_file_params(path: str, content: bytes, mode: int) -> dict[str, Any]:
    return {"path": path, "content": encode(content), "mode": mode}


def parse_read_file(result: Any) -> bytes:
    return _b64_field(result, "read_file", "content")


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


def close_seconds(timeout: float) -> float:
    return timeout if timeout and timeout > 0 else CLOSE_DEFAULT_SECONDS


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


# --- volumes (CLI subprocesses) --------------------------------------------------------------------


def volume_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise MatchlockError("volume name is required")
    return name


def volume_create_argv(binary: str, name: str, size_mb: int) -> list[str]:
    name = volume_name(name)
    if size_mb <= 0:
        raise MatchlockError("volume size must be > 0")
    return [binary, "volume", "create", name, "--size", str(size_mb), "--json"]


def _json_output(stdout: str, what: str) -> Any:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise MatchlockError(f"failed to parse volume {what} output: {exc}") from exc


def parse_volume_create(stdout: str, name: str, size_mb: int) -> VolumeInfo:
    payload = _json_output(stdout, "create")
    if not isinstance(payload, dict):
        raise MatchlockError(f"failed to parse volume create output: expected object, got {payload!r}")
    path = str(payload.get("path", "")).strip()
    if not path:
        raise MatchlockError("failed to parse volume create output: missing Path")
    return VolumeInfo(
        name=str(payload.get("name", "")).strip() or name.strip(),
        size=str(payload.get("size", "")).strip() or f"{float(size_mb):.1f} MB",
        path=path,
    )


def parse_volume_list(stdout: str) -> list[VolumeInfo]:
    payload = _json_output(stdout, "list")
    if not isinstance(payload, list):
        raise MatchlockError("failed to parse volume list output: expected array")
    volumes = []
    for entry in payload:
        if not isinstance(entry, dict):
            raise MatchlockError(f"failed to parse volume list output line: {entry!r}")
        name, size, path = (str(entry.get(key, "")).strip() for key in ("name", "size", "path"))
        if not name or not path:
            raise MatchlockError(f"failed to parse volume list output line: {entry!r}")
        volumes.append(VolumeInfo(name=name, size=size, path=path))
    return volumes
