"""The exec relay's protocol (sans-IO): framing, typed requests and typed replies.

Other processes (`matchlock exec`, `allow-list`, `port-forward`) reach a
sandbox through a Unix socket served by the process that owns it. Frames
are `[type u8][length u32 BE][payload]`. One operation per connection; the
first frame chooses it and is parsed into an action (`ExecAction`,
`AllowListAction`, `PortForwardAction`) before anything runs; later client
frames are `Stdin` or `Resize`. The message types and payloads are those of
the published matchlock relay (JSON payloads, byte fields base64), so the
same clients work. A request that breaks the protocol gets an `EXEC_RESULT`
frame carrying `error` and the connection is closed; the sandbox is not
affected.

Both ends are untrusted by each other: every field is checked here, with a
`RelayProtocolError` naming it, so neither the server nor the clients parse
JSON by hand. This module is on the `matchlock exec` hot path: stdlib only,
nothing heavy, and its records are `NamedTuple`s (ten dataclasses cost that
command 15-20 ms of import time).
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

from ..api.errors import MatchlockError

HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 1 << 20

EXEC = 1
EXEC_RESULT = 2
EXEC_INTERACTIVE = 3
STDOUT = 4
STDERR = 5
STDIN = 6
EXIT = 7
EXEC_PIPE = 8
PORT_FORWARD = 9
ALLOW_LIST_ADD = 10
ALLOW_LIST_DELETE = 11
ALLOW_LIST_RESULT = 12
RESIZE = 13
CONTROL = 14  # pause, resume, snapshot: matchlock's own, not in the published relay
CONTROL_RESULT = 15

REQUEST_TYPES = frozenset({EXEC, EXEC_INTERACTIVE, EXEC_PIPE, PORT_FORWARD, ALLOW_LIST_ADD, ALLOW_LIST_DELETE, CONTROL})
CLIENT_STREAM_TYPES = frozenset({STDIN, RESIZE})
SERVER_TYPES = frozenset({EXEC_RESULT, STDOUT, STDERR, EXIT, ALLOW_LIST_RESULT, CONTROL_RESULT})
EXEC_MODES = frozenset({EXEC, EXEC_PIPE, EXEC_INTERACTIVE})


class RelayProtocolError(MatchlockError):
    """A frame or payload that breaks the relay protocol (from either side)."""


def encode(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"relay payload of {len(payload)} bytes is too large")
    return HEADER.pack(kind, len(payload)) + payload


class Decoder:
    """Incremental frame decoder; `allowed` is the set of frame types the peer may send."""

    def __init__(self, allowed: frozenset[int]) -> None:
        self._buffer = bytearray()
        self._allowed = allowed

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            if kind not in self._allowed:
                raise RelayProtocolError(f"unexpected relay frame type {kind}")
            if length > MAX_PAYLOAD:
                raise RelayProtocolError(f"relay frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((kind, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)


def _json_object(payload: bytes, what: str) -> dict:
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RelayProtocolError(f"malformed {what}: {exc}") from None
    if not isinstance(value, dict):
        raise RelayProtocolError(f"the {what} must be a JSON object")
    return value


def _str_list(value: object, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RelayProtocolError(f"{field!r} must be a list of strings")
    return tuple(value)


def _terminal_dimension(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


# --- requests (client -> server) ----------------------------------------------------


class ExecAction(NamedTuple):
    """Run `command`: buffered (`EXEC`), piped (`EXEC_PIPE`) or in a terminal (`EXEC_INTERACTIVE`)."""

    command: str
    working_dir: str = ""
    user: str = ""
    mode: int = EXEC_PIPE
    rows: int = 24  # the terminal size, for EXEC_INTERACTIVE only
    cols: int = 80

    @property
    def interactive(self) -> bool:
        return self.mode == EXEC_INTERACTIVE

    def encode(self) -> bytes:
        request: dict[str, object] = {"command": self.command, "working_dir": self.working_dir, "user": self.user}
        if self.interactive:
            request.update(rows=self.rows, cols=self.cols)
        return encode(self.mode, json.dumps(request).encode())

    @classmethod
    def parse(cls, mode: int, payload: bytes) -> ExecAction:
        request = _json_object(payload, "exec request")
        command = request.get("command")
        if not isinstance(command, str) or not command:
            raise RelayProtocolError("'command' is required")
        working_dir, user = request.get("working_dir") or "", request.get("user") or ""
        if not isinstance(working_dir, str) or not isinstance(user, str):
            raise RelayProtocolError("'working_dir' and 'user' must be strings")
        if working_dir and not working_dir.startswith("/"):
            raise RelayProtocolError(f"working_dir {working_dir!r} must be an absolute path")
        if mode != EXEC_INTERACTIVE:
            return cls(command, working_dir, user, mode)
        rows, cols = request.get("rows") or 24, request.get("cols") or 80
        if not (_terminal_dimension(rows) and _terminal_dimension(cols)):
            raise RelayProtocolError(f"invalid terminal size {rows!r}x{cols!r}")
        return cls(command, working_dir, user, mode, rows, cols)


class AllowListAction(NamedTuple):
    """Add hosts to, or remove them from, the sandbox's allow-list."""

    hosts: tuple[str, ...]
    add: bool

    def encode(self) -> bytes:
        return encode(
            ALLOW_LIST_ADD if self.add else ALLOW_LIST_DELETE, json.dumps({"hosts": list(self.hosts)}).encode()
        )

    @classmethod
    def parse(cls, kind: int, payload: bytes) -> AllowListAction:
        hosts = _json_object(payload, "allow-list request").get("hosts")
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise RelayProtocolError("'hosts' must be a non-empty list of strings")
        return cls(tuple(hosts), add=kind == ALLOW_LIST_ADD)


class PortForwardAction(NamedTuple):
    """Make this connection a tunnel to the guest's 127.0.0.1:`remote_port` (STDIN up, STDOUT down)."""

    remote_port: int

    def encode(self) -> bytes:
        return encode(PORT_FORWARD, json.dumps({"remote_port": self.remote_port}).encode())

    @classmethod
    def parse(cls, payload: bytes) -> PortForwardAction:
        try:
            port = _json_object(payload, "port-forward request").get("remote_port")
        except RelayProtocolError:
            port = None
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise RelayProtocolError("'remote_port' must be a port number (1-65535)")
        return cls(port)


class ControlAction(NamedTuple):
    """Pause or resume the VM, or snapshot it (`name` may be empty: the owner picks one)."""

    action: str
    name: str = ""
    mode: str = ""

    def encode(self) -> bytes:
        return encode(CONTROL, json.dumps({"action": self.action, "name": self.name, "mode": self.mode}).encode())

    @classmethod
    def parse(cls, payload: bytes) -> ControlAction:
        request = _json_object(payload, "control request")
        action, name, mode = request.get("action"), request.get("name") or "", request.get("mode") or ""
        if action not in CONTROL_ACTIONS:
            raise RelayProtocolError(f"unknown control action {action!r}: use {', '.join(CONTROL_ACTIONS)}")
        if not isinstance(name, str) or not isinstance(mode, str) or len(name) > 256 or len(mode) > 32:
            raise RelayProtocolError("'name' and 'mode' must be short strings")
        return cls(action, name, mode)


CONTROL_ACTIONS = ("pause", "resume", "snapshot")

Action = ExecAction | AllowListAction | PortForwardAction | ControlAction


def parse_action(kind: int, payload: bytes) -> Action:
    """The first frame of a connection, as the operation it asks for."""
    if kind == CONTROL:
        return ControlAction.parse(payload)
    if kind in EXEC_MODES:
        return ExecAction.parse(kind, payload)
    if kind in (ALLOW_LIST_ADD, ALLOW_LIST_DELETE):
        return AllowListAction.parse(kind, payload)
    if kind == PORT_FORWARD:
        return PortForwardAction.parse(payload)
    raise RelayProtocolError(f"relay frame type {kind} cannot start an operation")


class Stdin(NamedTuple):
    """Input for the command or tunnel; empty means end of input."""

    data: bytes

    def encode(self) -> bytes:
        return encode(STDIN, self.data)


class Resize(NamedTuple):
    rows: int
    cols: int

    def encode(self) -> bytes:
        return encode(RESIZE, struct.pack(">HH", self.rows, self.cols))


def parse_client_frame(kind: int, payload: bytes) -> Stdin | Resize:
    """A frame after the first one."""
    if kind == STDIN:
        return Stdin(payload)
    if kind == RESIZE:
        if len(payload) != 4:
            raise RelayProtocolError(f"resize frame must carry 4 bytes, not {len(payload)}")
        rows, cols = struct.unpack(">HH", payload)
        if not rows or not cols:
            raise RelayProtocolError(f"invalid terminal size {rows}x{cols}")
        return Resize(rows, cols)
    raise RelayProtocolError(f"unexpected relay frame type {kind} after the request")


# --- replies (server -> client) -----------------------------------------------------


class Output(NamedTuple):
    """Command output (`STDOUT`/`STDERR`), or tunnel bytes; an empty STDOUT in a tunnel is EOF."""

    channel: int
    data: bytes


class Exited(NamedTuple):
    """A streamed command (or a tunnel) ended with this status."""

    code: int

    def encode(self) -> bytes:
        return encode(EXIT, struct.pack(">I", self.code & 0xFFFFFFFF))


class ExecReply(NamedTuple):
    """The result of a buffered exec, or an error that ends any operation (`error` set)."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    error: str = ""

    def encode(self) -> bytes:
        import base64  # here: `matchlock exec` never sees a buffered result, so it need not load this

        reply: dict[str, object] = {
            "exit_code": self.exit_code,
            "stdout": base64.b64encode(self.stdout).decode(),
            "stderr": base64.b64encode(self.stderr).decode(),
        }
        if self.error:
            reply["error"] = self.error
        return encode(EXEC_RESULT, json.dumps(reply).encode())

    @classmethod
    def parse(cls, payload: bytes) -> ExecReply:
        reply = _json_object(payload, "exec result")
        code, error = reply.get("exit_code", 1), reply.get("error") or ""
        if isinstance(code, bool) or not isinstance(code, int) or not isinstance(error, str):
            raise RelayProtocolError("the exec result needs an integer 'exit_code' and a string 'error'")
        if "stdout" not in reply and "stderr" not in reply:
            return cls(code, error=error)  # a refusal: `matchlock exec` only ever reads these
        import base64
        import binascii

        try:
            out, err = (base64.b64decode(reply.get(name) or "", validate=True) for name in ("stdout", "stderr"))
        except (binascii.Error, TypeError, ValueError):
            raise RelayProtocolError("'stdout' and 'stderr' of the exec result must be base64") from None
        return cls(code, out, err, error)


def encode_failure(message: str) -> bytes:
    """The frame the server sends when it refuses or aborts an operation (parsed as an `ExecReply`)."""
    return encode(EXEC_RESULT, json.dumps({"exit_code": 1, "error": message}).encode())


class AllowListReply(NamedTuple):
    """The hosts added (or removed) and the allow-list after the change; or why it failed."""

    changed: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    added: bool = True
    error: str = ""

    def encode(self) -> bytes:
        if self.error:
            reply: dict[str, object] = {"error": self.error}
        else:
            reply = {
                "added" if self.added else "removed": list(self.changed),
                "allowed_hosts": list(self.allowed_hosts),
            }
        return encode(ALLOW_LIST_RESULT, json.dumps(reply).encode())

    @classmethod
    def parse(cls, payload: bytes) -> AllowListReply:
        reply = _json_object(payload, "allow-list result")
        error = reply.get("error") or ""
        if not isinstance(error, str):
            raise RelayProtocolError("'error' of the allow-list result must be a string")
        if error:
            return cls(error=error)
        added = "removed" not in reply
        changed = _str_list(reply.get("added" if added else "removed") or [], "added" if added else "removed")
        return cls(changed, _str_list(reply.get("allowed_hosts") or [], "allowed_hosts"), added)


class ControlReply(NamedTuple):
    """What a control action did (`result`: a JSON object), or why it failed; `usage` says the failure was
    a bad request (a snapshot name that is taken, say: the CLI exits 2 for it, as for a bad flag)."""

    result: dict | None = None
    error: str = ""
    usage: bool = False

    def encode(self) -> bytes:
        body = {"error": self.error, **({"usage": True} if self.usage else {})} if self.error else {}
        body = body or {"result": self.result or {}}
        return encode(CONTROL_RESULT, json.dumps(body).encode())

    @classmethod
    def parse(cls, payload: bytes) -> ControlReply:
        reply = _json_object(payload, "control result")
        error, result, usage = reply.get("error") or "", reply.get("result") or {}, reply.get("usage", False)
        if not isinstance(error, str) or not isinstance(result, dict) or not isinstance(usage, bool):
            raise RelayProtocolError("the control result needs a string 'error' or an object 'result'")
        return cls(None if error else result, error, usage and bool(error))


Reply = Output | Exited | ExecReply | AllowListReply | ControlReply


def parse_reply(kind: int, payload: bytes) -> Reply:
    if kind in (STDOUT, STDERR):
        return Output(kind, payload)
    if kind == EXIT:
        if len(payload) != 4:
            raise RelayProtocolError(f"exit frame must carry 4 bytes, not {len(payload)}")
        return Exited(struct.unpack(">I", payload)[0])
    if kind == EXEC_RESULT:
        return ExecReply.parse(payload)
    if kind == ALLOW_LIST_RESULT:
        return AllowListReply.parse(payload)
    if kind == CONTROL_RESULT:
        return ControlReply.parse(payload)
    raise RelayProtocolError(f"unexpected relay frame type {kind} from the sandbox")


class ReplyReader:
    """A client's side of a connection: bytes from the relay in, typed replies out."""

    def __init__(self) -> None:
        self._frames = Decoder(SERVER_TYPES)

    def feed(self, data: bytes) -> list[Reply]:
        return [parse_reply(kind, payload) for kind, payload in self._frames.feed(data)]
