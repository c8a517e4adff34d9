"""SDK-local hooks: compiling the rules, the network-hook socket protocol, and their threaded runners.

Rules without a callback go to the server. Callback rules stay here (sdk-wire.md §5):
- VFS after-hooks (`hook`, `dangerous_hook`) run on `event` notifications; a safe hook runs on one
  worker, and events that arrive while it runs are dropped, as in the published SDK;
- VFS `action_hook` / `mutate_hook` run before the SDK's own file calls only;
- network hooks are answered over a Unix socket the proxy connects to, one JSON line each way.

The protocol parts are plain functions, shared by `Client` (threads, below) and `AsyncClient` (aio.py).
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import calls
from .errors import MatchlockError
from .types import (
    VFS_HOOK_ACTION_ALLOW,
    VFS_HOOK_ACTION_BLOCK,
    VFS_HOOK_PHASE_AFTER,
    VFS_HOOK_PHASE_BEFORE,
    CreateOptions,
    NetworkHookPhase,
    NetworkHookRequest,
    NetworkHookResult,
    NetworkInterceptionConfig,
    VFSActionRequest,
    VFSHookEvent,
    VFSHookRule,
    VFSInterceptionConfig,
    VFSMutateRequest,
)

MAX_HOOK_LINE = 4 << 20  # a hook request carries headers only; anything longer is not from our proxy


@dataclass
class LocalVFSHook:
    kind: str  # "hook" | "dangerous_hook" | "mutate_hook" | "action_hook"
    name: str
    ops: set[str]
    path: str
    callback: Callable[..., Any]

    def matches(self, op: str, path: str) -> bool:
        return (not self.ops or op in self.ops) and (not self.path or fnmatch.fnmatch(path, self.path))


@dataclass
class CompiledVFS:
    wire: dict[str, Any] | None = None
    local: list[LocalVFSHook] = field(default_factory=list)


def _check_callback_rule(rule: VFSHookRule, kind: str) -> None:
    if (rule.action or "").strip().lower() not in ("", VFS_HOOK_ACTION_ALLOW):
        raise MatchlockError(
            f"invalid vfs hook {rule.name!r}: {kind} cannot set action={rule.action!r} (use action='allow')"
        )
    phase = (rule.phase or "").lower()
    if kind in ("hook", "dangerous_hook"):
        if phase != VFS_HOOK_PHASE_AFTER:
            raise MatchlockError(f"invalid vfs hook {rule.name!r}: {kind} must use phase=after")
    elif phase and phase != VFS_HOOK_PHASE_BEFORE:
        raise MatchlockError(f"invalid vfs hook {rule.name!r}: {kind} must use phase=before")


def compile_vfs(cfg: VFSInterceptionConfig | None) -> CompiledVFS:
    if cfg is None:
        return CompiledVFS()
    wire_rules: list[dict[str, Any]] = []
    local: list[LocalVFSHook] = []
    for rule in cfg.rules:
        callbacks = [
            (kind, getattr(rule, kind))
            for kind in ("hook", "dangerous_hook", "mutate_hook", "action_hook")
            if getattr(rule, kind) is not None
        ]
        if len(callbacks) > 1:
            raise MatchlockError(f"invalid vfs hook {rule.name!r}: cannot set more than one callback hook")
        if not callbacks:
            if (rule.action or "").strip().lower() == "mutate_write":
                raise MatchlockError(f"invalid vfs hook {rule.name!r}: mutate_write requires mutate_hook callback")
            wire_rules.append(rule.to_dict())
            continue
        kind, callback = callbacks[0]
        _check_callback_rule(rule, kind)
        local.append(LocalVFSHook(kind, rule.name, {op.lower() for op in rule.ops if op}, rule.path, callback))
    emit = cfg.emit_events or any(hook.kind in ("hook", "dangerous_hook") for hook in local)
    wire: dict[str, Any] = {}
    if emit:
        wire["emit_events"] = True
    if wire_rules:
        wire["rules"] = wire_rules
    return CompiledVFS(wire or None, local)


@dataclass(frozen=True)
class CreatePlan:
    """What `create` sends and installs locally, from its options (the same for both clients)."""

    opts: CreateOptions
    vfs: CompiledVFS
    network: dict[str, Any] | None
    callbacks: dict[str, tuple[str, Callable[..., Any]]]

    def params(self, callback_socket: str | None) -> dict[str, Any]:
        """The `create` params; `callback_socket` is where the client's network hook server listens."""
        network = self.network
        if callback_socket is not None:
            network = {**(network or {}), "callback_socket": callback_socket}
        return calls.create_params(self.opts, self.vfs.wire, network)


def plan_create(opts: CreateOptions | None) -> CreatePlan:
    """Validate and compile `create`'s options before anything is started or sent."""
    opts = opts if opts is not None else CreateOptions()
    calls.validate_create(opts)
    return CreatePlan(opts, compile_vfs(opts.vfs_interception), *compile_network(opts.network_interception))


def compile_network(
    cfg: NetworkInterceptionConfig | None,
) -> tuple[dict[str, Any] | None, dict[str, tuple[str, Callable[..., Any]]]]:
    """(wire interception, callback_id -> (phase, hook)). Callback ids count every rule."""
    if cfg is None:
        return None, {}
    rules: list[dict[str, Any]] = []
    callbacks: dict[str, tuple[str, Callable[..., Any]]] = {}
    for index, rule in enumerate(cfg.rules, start=1):
        wire = rule.to_dict()
        if rule.hook is not None:
            if (rule.action or "").strip().lower() not in ("", "allow"):
                raise MatchlockError(
                    f"invalid network hook {rule.name!r}: callback hooks cannot set action={rule.action!r}"
                )
            wire["callback_id"] = f"network_hook_{index}"
            callbacks[wire["callback_id"]] = ((rule.phase or "").strip().lower(), rule.hook)
        rules.append(wire)
    return ({"rules": rules} if rules else None), callbacks


class LocalVFSHooks:
    """The compiled VFS callbacks of the current sandbox (replaced on create, cleared on close)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[LocalVFSHook] = []

    def set(self, hooks: list[LocalVFSHook]) -> None:
        with self._lock:
            self._hooks = list(hooks)

    def current(self) -> list[LocalVFSHook]:
        with self._lock:
            return list(self._hooks)

    def of_kind(self, *kinds: str) -> list[LocalVFSHook]:
        with self._lock:
            return [hook for hook in self._hooks if hook.kind in kinds]

    def check_action(self, op: str, path: str, size: int, mode: int) -> None:
        """Run the action hooks before one of the SDK's file calls; `block` raises."""
        hooks = [hook for hook in self.of_kind("action_hook") if hook.matches(op, path)]
        if not hooks:
            return
        request = VFSActionRequest(op=op, path=path, size=size, mode=mode, uid=os.geteuid(), gid=os.getegid())
        for hook in hooks:
            decision = str(hook.callback(request)).strip().lower()
            if decision in ("", VFS_HOOK_ACTION_ALLOW):
                continue
            if decision == VFS_HOOK_ACTION_BLOCK:
                raise MatchlockError(f"vfs action hook blocked operation: op={op} path={path} hook={hook.name!r}")
            raise MatchlockError(
                f"invalid action_hook return value for {hook.name!r}: expected 'allow'|'block', got {decision!r}"
            )

    def mutate_write(self, path: str, content: bytes, mode: int) -> bytes:
        for hook in self.of_kind("mutate_hook"):
            if not hook.matches("write", path):
                continue
            request = VFSMutateRequest(path=path, size=len(content), mode=mode, uid=os.geteuid(), gid=os.getegid())
            mutated = hook.callback(request)
            if mutated is None:
                continue
            if isinstance(mutated, str):
                mutated = mutated.encode("utf-8")
            if not isinstance(mutated, bytes):
                raise MatchlockError(
                    f"invalid mutate_hook return type for {hook.name!r}: expected bytes|str|None, "
                    f"got {type(mutated).__name__}"
                )
            content = mutated
        return content

    def after_hooks_for(self, event: VFSHookEvent) -> tuple[list[LocalVFSHook], list[LocalVFSHook]]:
        """(safe, dangerous) after-hooks matching the event."""
        matched = [hook for hook in self.of_kind("hook", "dangerous_hook") if hook.matches(event.op, event.path)]
        return [h for h in matched if h.kind == "hook"], [h for h in matched if h.kind == "dangerous_hook"]


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float | str):
        with contextlib.suppress(ValueError, OverflowError):
            return int(value)
    return 0


def parse_file_event(params: Any) -> VFSHookEvent | None:
    """The file event of an `event` notification, or None (not a file event, or an empty op)."""
    file_event = params.get("file") if isinstance(params, dict) else None
    if not isinstance(file_event, dict):
        return None
    op = str(file_event.get("op") or "").lower()
    if not op:
        return None
    ints = {key: _as_int(file_event.get(key)) for key in ("size", "mode", "uid", "gid")}
    return VFSHookEvent(op=op, path=str(file_event.get("path") or ""), **ints)


# --- network hook protocol -------------------------------------------------------------------------


def _string_map(value: Any) -> dict[str, str] | None:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None


def _string_list_map(value: Any) -> dict[str, list[str]] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in value.items()}


def resolve_network_call(
    line: bytes, callbacks: dict[str, tuple[str, Callable[..., Any]]]
) -> tuple[Callable[..., Any], NetworkHookRequest] | dict[str, str]:
    """The hook to call and its argument, or the error answer for the proxy."""
    try:
        payload = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return {"error": f"invalid network hook request: {exc}"}
    if not isinstance(payload, dict):
        return {"error": "network hook callback request must be an object"}
    raw_phase = str(payload.get("phase") or "").strip().lower()
    phase: NetworkHookPhase = "before" if raw_phase == "before" else "after" if raw_phase == "after" else ""
    entry = callbacks.get(str(payload.get("callback_id") or "").strip())
    if entry is None:
        return {"error": "network hook callback not found"}
    rule_phase, hook = entry
    if rule_phase and rule_phase != phase:
        return {"error": "network hook phase mismatch"}
    request = NetworkHookRequest(
        phase=phase,
        host=str(payload.get("host") or ""),
        method=str(payload.get("method") or ""),
        path=str(payload.get("path") or ""),
        query=_string_map(payload.get("query")),
        request_headers=_string_list_map(payload.get("request_headers")),
        status_code=_as_int(payload.get("status_code")),
        response_headers=_string_list_map(payload.get("response_headers")),
        is_sse=bool(payload.get("is_sse")),
    )
    return hook, request


def network_result_to_wire(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if not isinstance(result, NetworkHookResult):
        raise MatchlockError(
            f"invalid network hook result: expected NetworkHookResult or None, got {type(result).__name__}"
        )
    wire: dict[str, Any] = {}
    action = str(result.action or "").strip()
    if action:
        wire["action"] = action
    if result.request is not None:
        request: dict[str, Any] = {}
        if result.request.headers is not None:
            request["headers"] = _string_list_map(result.request.headers)
        if result.request.query is not None:
            request["query"] = _string_map(result.request.query)
        if result.request.path:
            request["path"] = result.request.path
        if request:
            wire["request"] = request
    if result.response is not None:
        response: dict[str, Any] = {}
        if result.response.headers is not None:
            response["headers"] = _string_list_map(result.response.headers)
        if result.response.body_replacements:
            response["body_replacements"] = [item.to_dict() for item in result.response.body_replacements]
        body = result.response.set_body
        if body is not None:
            if isinstance(body, str):
                body = body.encode("utf-8")
            if not isinstance(body, bytes):
                raise MatchlockError(
                    f"invalid network hook response set_body type: expected bytes|str|None, got {type(body).__name__}"
                )
            response["set_body_base64"] = base64.b64encode(body).decode("ascii")
        if response:
            wire["response"] = response
    return wire


def answer_line(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def new_socket_dir() -> tuple[str, str]:
    """(temp dir, socket path) for a hook server; the dir is private to this user."""
    directory = tempfile.mkdtemp(prefix="matchlock-network-hook-")
    return directory, os.path.join(directory, "hook.sock")


# --- threaded runners (the sync Client) --------------------------------------------------------------


class NetworkHookServer:
    """Answers the proxy's callback connections on a Unix socket, one thread per connection."""

    def __init__(self, callbacks: dict[str, tuple[str, Callable[..., Any]]]) -> None:
        self._callbacks = dict(callbacks)
        self._dir, self.socket_path = new_socket_dir()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.socket_path)
            self._listener.listen()
        except OSError:
            self.stop()
            raise
        threading.Thread(target=self._accept_loop, name="matchlock-network-hooks", daemon=True).start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            # shutdown wakes the accept() blocked in the other thread; close alone does not on Linux.
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = _read_line(conn)
            except (OSError, MatchlockError) as exc:
                answer: dict[str, Any] = {"error": str(exc)}
            else:
                if not line:
                    return
                resolved = resolve_network_call(line, self._callbacks)
                if isinstance(resolved, dict):
                    answer = resolved
                else:
                    hook, request = resolved
                    try:
                        answer = network_result_to_wire(hook(request))
                    except Exception as exc:  # noqa: BLE001 - a failing user hook fails open in the proxy
                        answer = {"error": f"network hook raised {type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(answer_line(answer))


def _read_line(conn: socket.socket) -> bytes:
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_HOOK_LINE:
            raise MatchlockError(f"network hook request longer than {MAX_HOOK_LINE} bytes")
    return bytes(buffer.split(b"\n", 1)[0])


class ThreadedAfterHooks:
    """Runs VFS after-hooks for the sync client: safe ones one event at a time, dangerous ones each alone."""

    def __init__(self, hooks: LocalVFSHooks, client: Any) -> None:
        self._hooks = hooks
        self._client = client
        self._busy = threading.Lock()

    def on_event(self, event: VFSHookEvent) -> None:
        safe, dangerous = self._hooks.after_hooks_for(event)
        for hook in dangerous:
            threading.Thread(target=_call_quietly, args=(hook.callback, self._client, event), daemon=True).start()
        if safe and self._busy.acquire(blocking=False):
            threading.Thread(target=self._run_safe, args=(safe, event), daemon=True).start()

    def _run_safe(self, hooks: list[LocalVFSHook], event: VFSHookEvent) -> None:
        try:
            for hook in hooks:
                _call_quietly(hook.callback, event)
        finally:
            self._busy.release()


def _call_quietly(callback: Callable[..., Any], *args: Any) -> None:
    # After-hooks are observers: their failure must not disturb the client or later events.
    with contextlib.suppress(Exception):
        callback(*args)
