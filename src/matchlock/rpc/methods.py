"""The request handlers of `matchlock rpc` (everything but create/cancel/close, which own the lifecycle).

Each handler takes the session and the request and returns the result object, or raises RpcError.
Output notifications are awaited before the handler returns, so they always precede the response.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..api.errors import MatchlockError, UsageError
from ..jsonrpc import EXEC_FAILED, FILE_FAILED, INVALID_PARAMS, VM_FAILED, JSONObject, Request
from ..sandbox.portforward import ForwardSpec, parse_addresses
from ..sandbox.process import ExecResult, GuestProcess
from ..sandbox.sandbox import ExecSpec
from ..wire import agent as msgs
from .params import Fields, RpcError, bad

if TYPE_CHECKING:
    from .server import Session

log = logging.getLogger("matchlock.rpc")

# A buffered `exec` holds its output in memory until it ends; past this it is cancelled.
EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024
# Unread stdin per exec before the reader waits for the guest to take it.
STDIN_BUFFER_LIMIT = 8 * 1024 * 1024
# After `cancel`, how long the guest gets to report the command's exit (its SIGKILL comes after 5 s).
CANCEL_WAIT_SECONDS = msgs.CANCEL_GRACE_SECONDS + 1.0
LOG_POLL_SECONDS = 0.1
LOG_CHUNK = 64 * 1024
MOD_TIME_ZERO = "0001-01-01T00:00:00Z"  # upstream always sends Go's zero time


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- input of exec_pipe / exec_tty ---------------------------------------------------------------


class ExecInput:
    """stdin data, EOF and resizes for one running exec, delivered in the order they arrived.

    Resizes apply until the exec ends, also after stdin's EOF (the SDK sends EOF first when it has no stdin).
    """

    def __init__(self, process: GuestProcess, tty: bool) -> None:
        self.process = process
        self.tty = tty
        self._items: collections.deque[bytes | None] = collections.deque()
        self._queued = 0
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.input_done = False  # EOF delivered, or the command stopped taking input
        self.closed = False  # the exec ended

    async def put(self, data: bytes | None) -> None:
        """Queue stdin (None is EOF). Waits while too much is unread: the guest is not taking its input."""
        while not self._room.is_set() and not self.input_done:
            await self._room.wait()
        if self.input_done:
            return
        self._items.append(data)
        self._queued += len(data or b"")
        if self._queued > STDIN_BUFFER_LIMIT:
            self._room.clear()
        self._changed.set()

    def resize(self, rows: int, cols: int) -> None:
        if self.tty and not self.closed:
            try:
                self.process.resize(rows, cols)
            except (ValueError, MatchlockError) as exc:
                log.warning("resize %sx%s ignored: %s", rows, cols, exc)

    def _end_input(self) -> None:
        self.input_done = True
        self._items.clear()
        self._room.set()
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._end_input()

    async def pump(self) -> None:
        """Feed queued input to the process until EOF; never raises (a command may exit before its input)."""
        try:
            while not self.input_done:
                if not self._items:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                item = self._items.popleft()
                if item is None:
                    self.process.close_stdin()
                    return
                self._queued -= len(item)
                if self._queued <= STDIN_BUFFER_LIMIT:
                    self._room.set()
                await self.process.write(item)
        except MatchlockError as exc:
            log.info("stdin not delivered: %s", exc)
        finally:
            self._end_input()


async def wait_outcome(process: GuestProcess) -> ExecResult | MatchlockError:
    try:
        return await process.wait()
    except MatchlockError as exc:
        return exc


async def run_process(process: GuestProcess, stdin: ExecInput | None) -> ExecResult:
    """Wait for a command, feeding its input. Cancelled: the command is cancelled in the guest first."""
    async with asyncio.TaskGroup() as group:
        waiter = group.create_task(wait_outcome(process))
        pump = group.create_task(stdin.pump()) if stdin is not None else None
        try:
            outcome = await asyncio.shield(waiter)
        except asyncio.CancelledError:
            process.cancel()  # SIGTERM now, SIGKILL after the guest's grace period
            await asyncio.wait({waiter}, timeout=CANCEL_WAIT_SECONDS)
            raise
        finally:
            if pump is not None:
                pump.cancel()
    if isinstance(outcome, MatchlockError):
        raise RpcError(EXEC_FAILED, str(outcome))
    return outcome


# --- exec family ---------------------------------------------------------------------------------


def _exec_spec(params: JSONObject) -> ExecSpec:
    fields = Fields(params)
    command = fields.string("command", required=True, max_len=msgs.MAX_COMMAND)
    working_dir = fields.string("working_dir", max_len=msgs.MAX_PATH)
    if working_dir and not working_dir.startswith("/"):
        raise bad("working_dir", f"must be an absolute path, got {working_dir!r}")
    return ExecSpec(command, working_dir=working_dir, user=fields.string("user", max_len=256))


def _start(session: Session, spec: ExecSpec, **kwargs) -> GuestProcess:
    sandbox = session.require_vm()
    try:
        return sandbox.start_exec(spec, **kwargs)
    except ValueError as exc:  # the guest request failed validation (user, sizes)
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None


def _finish(result: ExecResult) -> JSONObject:
    if result.error:
        raise RpcError(EXEC_FAILED, f"exec failed: {result.error}")
    return {"exit_code": result.exit_code, "duration_ms": result.duration_ms}


async def exec_buffered(session: Session, request: Request) -> JSONObject:
    spec = _exec_spec(request.params)
    out, err = bytearray(), bytearray()
    overflow: list[str] = []

    def collect(buffer: bytearray, name: str) -> Callable[[bytes], None]:
        def on_data(data: bytes) -> None:
            if overflow:
                return
            if len(buffer) + len(data) > EXEC_OUTPUT_LIMIT:
                overflow.append(name)
                process.cancel()
                return
            buffer.extend(data)

        return on_data

    process = _start(session, spec, on_stdout=collect(out, "stdout"), on_stderr=collect(err, "stderr"))
    result = await run_process(process, None)
    if overflow:
        raise RpcError(
            EXEC_FAILED,
            f"exec {overflow[0]} exceeded {EXEC_OUTPUT_LIMIT} bytes, so the command was cancelled; "
            "use exec_stream for large output",
        )
    return {**_finish(result), "stdout": b64(bytes(out)), "stderr": b64(bytes(err))}


def _notifier(session: Session, method: str, request_id: object) -> Callable[[bytes], Awaitable[None]]:
    def send(data: bytes) -> Awaitable[None]:
        return session.out.send(Request(method, {"id": request_id, "data": b64(data)}))

    return send


async def exec_stream(session: Session, request: Request) -> JSONObject:
    spec = _exec_spec(request.params)
    process = _start(
        session,
        spec,
        on_stdout=_notifier(session, "exec_stream.stdout", request.id),
        on_stderr=_notifier(session, "exec_stream.stderr", request.id),
    )
    return _finish(await run_process(process, None))


async def exec_pipe(session: Session, request: Request) -> JSONObject:
    return await _exec_interactive(session, request, "exec_pipe", None)


async def exec_tty(session: Session, request: Request) -> JSONObject:
    fields = Fields(request.params)
    # The SDK sends <= 0 as 24x80 already; upstream defaults absent sizes the same way.
    rows = fields.integer("rows", lo=0, hi=65535) or 24
    cols = fields.integer("cols", lo=0, hi=65535) or 80
    return await _exec_interactive(session, request, "exec_tty", msgs.TerminalSize(rows, cols))


async def _exec_interactive(
    session: Session, request: Request, method: str, tty: msgs.TerminalSize | None
) -> JSONObject:
    assert request.id is not None
    spec = _exec_spec(request.params)
    process = _start(
        session,
        spec,
        on_stdout=_notifier(session, f"{method}.stdout", request.id),
        on_stderr=None if tty is not None else _notifier(session, f"{method}.stderr", request.id),
        stdin=True,
        tty=tty,
    )
    stdin = ExecInput(process, tty is not None)
    session.inputs[request.id] = stdin
    try:
        await session.out.send(Request(f"{method}.ready", {"id": request.id}))
        result = await run_process(process, stdin)
    finally:
        stdin.close()
        session.inputs.pop(request.id, None)
    return _finish(result)


# --- files ---------------------------------------------------------------------------------------


def go_file_mode(st_mode: int) -> int:
    """POSIX st_mode as Go's os.FileMode (what upstream and the SDKs expect in list_files)."""
    mode = st_mode & 0o777
    kind = stat.S_IFMT(st_mode)
    mode |= {
        stat.S_IFDIR: 1 << 31,
        stat.S_IFLNK: 1 << 27,
        stat.S_IFBLK: 1 << 26,
        stat.S_IFCHR: (1 << 26) | (1 << 21),
        stat.S_IFIFO: 1 << 25,
        stat.S_IFSOCK: 1 << 24,
    }.get(kind, 0)
    if st_mode & stat.S_ISUID:
        mode |= 1 << 23
    if st_mode & stat.S_ISGID:
        mode |= 1 << 22
    if st_mode & stat.S_ISVTX:
        mode |= 1 << 20
    return mode


def _path(params: JSONObject) -> str:
    return Fields(params).string("path", required=True, max_len=msgs.MAX_PATH)


async def _file_op(awaitable: Awaitable[object]) -> object:
    try:
        return await awaitable
    except ValueError as exc:  # the path or mode failed the wire validation
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
    except MatchlockError as exc:
        raise RpcError(FILE_FAILED, str(exc)) from None


async def write_file(session: Session, request: Request) -> JSONObject:
    fields = Fields(request.params)
    path = _path(request.params)
    try:
        content = base64.b64decode(fields.string("content", max_len=1 << 62), validate=True)
    except binascii.Error:
        raise RpcError(INVALID_PARAMS, "invalid base64 content") from None
    mode = fields.integer("mode", lo=0, hi=0o7777) or 0o644
    await _file_op(session.require_vm().write_file(path, content, mode))
    return {}


async def read_file(session: Session, request: Request) -> JSONObject:
    path = _path(request.params)
    content = await _file_op(session.require_vm().read_file(path))
    assert isinstance(content, bytes)
    return {"content": b64(content)}


async def list_files(session: Session, request: Request) -> JSONObject:
    path = _path(request.params)
    listing = await _file_op(session.require_vm().list_files(path))
    assert isinstance(listing, list)
    files = [
        {
            "name": info.name,
            "size": info.size,
            "mode": go_file_mode(info.mode),
            "mod_time": MOD_TIME_ZERO,
            "is_dir": info.is_dir,
        }
        for info in listing
    ]
    return {"files": files}  # always a list: the Python SDK fails on null


# --- log -----------------------------------------------------------------------------------------


def _read_from(path, offset: int, limit: int | None) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        return b""


async def log_all(session: Session, request: Request) -> JSONObject:
    path = session.require_vm().console_log
    try:
        content = await asyncio.to_thread(_read_from, path, 0, None)
    except OSError as exc:
        raise RpcError(FILE_FAILED, f"cannot read {path}: {exc.strerror}") from None
    return {"content": b64(content)}


async def log_stream(session: Session, request: Request) -> JSONObject:
    """Existing content first, then what is appended; ends only by `cancel` (or close), as upstream."""
    path = session.require_vm().console_log
    offset = 0
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < offset:
            offset = 0  # truncated or replaced: start over
        if size > offset:
            data = _read_from(path, offset, LOG_CHUNK)
            offset += len(data)
            await session.out.send(Request("log_stream.data", {"id": request.id, "data": b64(data)}))
            continue
        await asyncio.sleep(LOG_POLL_SECONDS)


# --- port forwarding and the allow-list ----------------------------------------------------------


async def port_forward(session: Session, request: Request) -> JSONObject:
    fields = Fields(request.params)
    entries = fields.objects("forwards")
    if not entries:
        raise RpcError(INVALID_PARAMS, "forwards is required")
    specs = [
        ForwardSpec(
            entry.integer("local_port", lo=1, hi=65535, required=True),
            entry.integer("remote_port", lo=1, hi=65535, required=True),
        )
        for entry in entries
    ]
    try:
        addresses = parse_addresses(fields.strings("addresses") or ["127.0.0.1"])
    except UsageError as exc:
        raise bad("addresses", f"is invalid: {exc}") from None
    sandbox = session.require_vm()
    async with session.forward_lock:
        if session.forwarder is not None:  # a new set replaces the old one, as upstream
            forwarder, session.forwarder = session.forwarder, None
            await forwarder.aclose()
        try:
            session.forwarder = await sandbox.port_forward(specs, addresses)
        except UsageError as exc:
            raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
        except MatchlockError as exc:
            raise RpcError(VM_FAILED, str(exc)) from None
        bindings = session.forwarder.bindings
    return {
        "bindings": [{"address": b.address, "local_port": b.local_port, "remote_port": b.remote_port} for b in bindings]
    }


def _hosts(params: JSONObject) -> list[str]:
    hosts = [h.strip() for value in Fields(params).strings("hosts") for h in value.split(",") if h.strip()]
    if not hosts:
        raise RpcError(INVALID_PARAMS, "hosts is required")
    return list(dict.fromkeys(hosts))


def _policy(session: Session):
    network = session.require_vm().network
    if network is None or not network.policy.intercepting:
        raise RpcError(
            VM_FAILED,
            "allow-list updates need network interception: create the sandbox with network.intercept=true "
            "or a non-empty network.allowed_hosts",
        )
    return network.policy


async def allow_list_add(session: Session, request: Request) -> JSONObject:
    hosts = _hosts(request.params)
    policy = _policy(session)
    try:
        added = policy.add_hosts(hosts)
    except UsageError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
    return {"added": added, "allowed_hosts": policy.allowed_hosts}


async def allow_list_delete(session: Session, request: Request) -> JSONObject:
    hosts = _hosts(request.params)
    policy = _policy(session)
    removed = policy.remove_hosts(hosts)
    return {"removed": removed, "allowed_hosts": policy.allowed_hosts}


async def pause(session: Session, request: Request) -> JSONObject:
    from ..sandbox import snapshots  # only sessions that pause pay for it

    await snapshots.pause(session.require_vm())
    return {"paused": True}


async def resume(session: Session, request: Request) -> JSONObject:
    from ..sandbox import snapshots

    await snapshots.resume(session.require_vm())
    return {"paused": False}


async def snapshot(session: Session, request: Request) -> JSONObject:
    """`{name?, mode?}` -> the snapshot record (`matchlock run --from-snapshot NAME` restores it)."""
    from ..sandbox import snapshots
    from ..state import snapshots as records

    fields = Fields(request.params)
    name, mode = fields.string("name", max_len=64), fields.string("mode", max_len=32) or "full"
    try:
        records.validate_mode(mode)
        if name:
            records.validate_name(name)
    except UsageError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from None
    sandbox = session.require_vm()
    store = sandbox.tracker.store
    if store is None:
        raise RpcError(VM_FAILED, "this session keeps no state: snapshots need a state directory")
    return (await snapshots.create(sandbox, store, name, mode)).to_json()


async def snapshot_list(session: Session, request: Request) -> JSONObject:
    """`{}` -> `{snapshots: [record]}`: the complete ones, as `matchlock snapshot ls --json`; needs no VM."""
    from ..state import snapshots as records

    return {"snapshots": [record.to_json() for record in records.ready(session.state())]}


async def snapshot_remove(session: Session, request: Request) -> JSONObject:
    """`{names: [str]}` -> `{removed: [str]}`. Every name is checked before any is removed; needs no VM."""
    from ..state import snapshots as records

    names = list(dict.fromkeys(Fields(request.params).strings("names")))
    if not names:
        raise RpcError(INVALID_PARAMS, "names is required: the snapshots to remove (see snapshot_list)")
    store = session.state()
    for name in names:
        try:
            records.require(store, records.validate_name(name))
        except UsageError as exc:
            raise bad("names", f"is invalid: {exc}") from None
        except MatchlockError as exc:  # not found, or still being made
            raise RpcError(INVALID_PARAMS, f"invalid params: names: {exc}") from None
    for name in names:
        await _remove_when_free(store, name)
    return {"removed": names}


async def _remove_when_free(store, name: str) -> None:
    """`records.remove`, waiting for a restore of it without blocking the loop (other requests go on)."""
    from ..state import snapshots as records

    deadline = asyncio.get_running_loop().time() + records.REMOVE_WAIT_SECONDS
    while True:
        try:
            records.remove(store, name, wait=0)
            return
        except records.SnapshotInUse:
            if asyncio.get_running_loop().time() >= deadline:
                raise
        await asyncio.sleep(records.REMOVE_POLL_SECONDS)


async def fork(session: Session, request: Request) -> JSONObject:
    """`{count?}` -> `{ids}`: what `matchlock fork ID -n COUNT` does, with this session's secrets."""
    from .fork import MAX_FORKS, fork_detached

    count = Fields(request.params).integer("count", default=1, lo=1, hi=MAX_FORKS)
    return {"ids": await fork_detached(session.require_vm(), count, session.tasks)}


Handler = Callable[["Session", Request], Awaitable[JSONObject]]

# method -> (handler, error code for failures that are not RpcError)
METHODS: dict[str, tuple[Handler, int]] = {
    "exec": (exec_buffered, EXEC_FAILED),
    "exec_stream": (exec_stream, EXEC_FAILED),
    "exec_pipe": (exec_pipe, EXEC_FAILED),
    "exec_tty": (exec_tty, EXEC_FAILED),
    "write_file": (write_file, FILE_FAILED),
    "read_file": (read_file, FILE_FAILED),
    "list_files": (list_files, FILE_FAILED),
    "log": (log_all, FILE_FAILED),
    "log_stream": (log_stream, FILE_FAILED),
    "port_forward": (port_forward, VM_FAILED),
    "allow_list_add": (allow_list_add, VM_FAILED),
    "allow_list_delete": (allow_list_delete, VM_FAILED),
    "pause": (pause, VM_FAILED),
    "resume": (resume, VM_FAILED),
    "snapshot": (snapshot, VM_FAILED),
    "snapshot_list": (snapshot_list, VM_FAILED),
    "snapshot_remove": (snapshot_remove, VM_FAILED),
    "fork": (fork, VM_FAILED),
}

# Methods that work before (and without) a VM.
NO_VM_METHODS = {"create", "snapshot_list", "snapshot_remove"}

# Client -> server input for a running exec: routed by params.id, never answered.
INPUT_METHODS = {
    "exec_pipe.stdin",
    "exec_pipe.stdin_eof",
    "exec_tty.stdin",
    "exec_tty.stdin_eof",
    "exec_tty.resize",
}
