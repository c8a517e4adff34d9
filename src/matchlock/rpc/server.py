"""`matchlock rpc`: one session of newline-delimited JSON-RPC on stdin/stdout, owning at most one VM.

Lines are split and parsed by the sans-IO core (`matchlock.jsonrpc`). Input messages, `cancel` and
`close` are handled inline in transport order; every other request runs as its own task in the
session's TaskGroup, so many are in flight at once. The session ends on `close`, on stdin EOF, when
stdout breaks, or on SIGTERM/SIGINT/SIGHUP: requests in flight are cancelled (-32003), the VM is
closed and its row is kept as `stopped` (so `matchlock rm ID` works), `close` is answered, and the
process exits. A second `create` is refused while a VM exists: nothing is closed behind the
client's back, and nothing leaks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import shlex
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..api.config import SandboxConfig
from ..api.errors import MatchlockError, NotFoundError, UsageError
from ..api.events import Event
from ..api.image import compose_command
from ..jsonrpc import (
    CANCELLED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    VM_FAILED,
    ErrorResponse,
    Invalid,
    JSONObject,
    LineSplitter,
    OverlongLine,
    Request,
    RequestId,
    Response,
    parse_line,
)
from ..sandbox.exec_relay import ExecRelay
from ..sandbox.portforward import PortForwarder
from ..sandbox.process import ExecResult, GuestProcess
from ..sandbox.sandbox import ExecSpec, Sandbox
from ..state.store import StateStore
from .methods import INPUT_METHODS, METHODS, NO_VM_METHODS, ExecInput, Handler, wait_outcome
from .params import CreateParams, Fields, RpcError, bad, parse_create, prepare_restore
from .transport import StdinReader, StdoutWriter

if TYPE_CHECKING:
    from ..sandbox.snapshots import Restore

log = logging.getLogger("matchlock.rpc")

MAX_IN_FLIGHT = 256
EVENT_QUEUE = 100  # as upstream: events beyond this many unsent are dropped
ENTRYPOINT_CHECK_SECONDS = 0.5  # an entrypoint failing this fast after it started fails the create (upstream)
SHUTDOWN_REQUEST_WAIT = 1.0  # how long cancelled requests get to answer before the VM goes
FLUSH_SECONDS = 5.0


class Session:
    def __init__(self, out: StdoutWriter) -> None:
        self.out = out
        self.loop = asyncio.get_running_loop()
        self.sandbox: Sandbox | None = None
        self.creating = False
        self.store: StateStore | None = None
        self.requests: dict[RequestId, asyncio.Task[None]] = {}
        self.inputs: dict[RequestId, ExecInput] = {}
        self.forwarder: PortForwarder | None = None
        self.forward_lock = asyncio.Lock()
        self.relay: ExecRelay | None = None
        self.entrypoint: GuestProcess | None = None
        self.events: asyncio.Queue[JSONObject] = asyncio.Queue(EVENT_QUEUE)
        self.events_dropped = 0
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self.close_request: Request | None = None
        self._tasks: asyncio.TaskGroup | None = None

    def state(self) -> StateStore:
        """The state store, opened on first use (snapshots are listed before any VM exists)."""
        if self.store is None:
            self.store = StateStore()
        return self.store

    def require_vm(self) -> Sandbox:
        if self.sandbox is None:
            raise RpcError(VM_FAILED, "VM not created")
        return self.sandbox

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            log.info("session ending: %s", reason)
            self.stop.set()

    @property
    def tasks(self) -> asyncio.TaskGroup:
        assert self._tasks is not None, "the session is not running"
        return self._tasks

    # --- main loop ---------------------------------------------------------------------------------

    async def run(self, reader: StdinReader) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                reading = tasks.create_task(self._read_loop(reader))
                sending = tasks.create_task(self._send_events())
                watching = tasks.create_task(self._watch_stdout())
                await self.stop.wait()
                reading.cancel()
                await self._shutdown()
                for task in (sending, watching, *self.requests.values()):
                    task.cancel()
        finally:
            # Normally a no-op: reached with a VM only if the loop above was interrupted.
            await self._close_vm(graceful=0.0, remove=False)
            if self.store is not None:
                self.store.close()

    async def _read_loop(self, reader: StdinReader) -> None:
        splitter = LineSplitter()
        while not self.stop.is_set():
            chunk = await reader.read()
            for item in splitter.feed(chunk) if chunk else splitter.feed_eof():
                try:
                    await self._handle_line(item)
                except Exception:  # noqa: BLE001 - one bad line must never end the session
                    log.exception("handling a request line failed")
                if self.stop.is_set():
                    return  # nothing after `close` is read, as upstream
            if not chunk:
                self.request_stop("stdin reached EOF")

    async def _watch_stdout(self) -> None:
        await self.out.broken.wait()
        self.request_stop("stdout is broken")

    async def _handle_line(self, item: bytes | OverlongLine) -> None:
        if isinstance(item, OverlongLine):
            log.warning("dropped a line over %d bytes (id %s)", item.limit, item.id)
            self.out.send_nowait(item.to_error())
            return
        message = parse_line(item)
        if message is None:
            return
        if isinstance(message, Invalid):
            self.out.send_nowait(message.to_error())
        elif isinstance(message, Request):
            await self._dispatch(message)
        # A Response or ErrorResponse from the client answers nothing here: ignored.

    async def _dispatch(self, request: Request) -> None:
        method = request.method
        if method in INPUT_METHODS:
            await self._input(request)
            return
        if method == "cancel":
            self._cancel(request)
            return
        if method == "close":
            self.close_request = request
            self.request_stop("close requested")
            return
        handler: Handler
        if method == "create":
            handler, code = _create, VM_FAILED
        elif method in METHODS:
            handler, code = METHODS[method]
        else:
            self._reply_error(request.id, METHOD_NOT_FOUND, f"Method not found: {method}")
            return
        if request.id is None:
            self._reply_error(None, INVALID_REQUEST, f"Invalid Request: {method} needs an id")
        elif request.id in self.requests:
            self._reply_error(request.id, INVALID_REQUEST, f"id {request.id!r} is already used by a request in flight")
        elif len(self.requests) >= MAX_IN_FLIGHT:
            self._reply_error(request.id, INVALID_REQUEST, f"too many requests in flight (limit {MAX_IN_FLIGHT})")
        elif method not in NO_VM_METHODS and self.sandbox is None:
            self._reply_error(request.id, VM_FAILED, "VM not created")
        else:
            task = self.tasks.create_task(self._run_request(request, handler, code))
            self.requests[request.id] = task
            task.add_done_callback(functools.partial(self._finished, request.id))

    def _finished(self, request_id: RequestId, task: asyncio.Task[None]) -> None:
        if self.requests.get(request_id) is task:
            del self.requests[request_id]
        if task.cancelled():
            # Cancelled before its first step ran (so before its own handler could answer): answer here.
            self._reply_error(request_id, CANCELLED, f"request {request_id} was cancelled")

    def _reply_error(self, request_id: RequestId | None, code: int, message: str) -> None:
        self.out.send_nowait(ErrorResponse(request_id, code, message))

    async def _run_request(self, request: Request, handler: Handler, code: int) -> None:
        """Run one handler and answer it. Never raises: a failure here must not end the session."""
        assert request.id is not None
        reply: Response | ErrorResponse
        try:
            reply = Response(request.id, await handler(self, request))
        except RpcError as exc:
            reply = ErrorResponse(request.id, exc.code, exc.message)
        except asyncio.CancelledError:
            reply = ErrorResponse(request.id, CANCELLED, f"request {request.id} was cancelled")
        except UsageError as exc:
            reply = ErrorResponse(request.id, INVALID_PARAMS, f"invalid params: {exc}")
        except MatchlockError as exc:
            reply = ErrorResponse(request.id, code, str(exc))
        except Exception as exc:  # noqa: BLE001 - answered as an internal error; the session goes on
            log.exception("%s failed", request.method)
            reply = ErrorResponse(request.id, INTERNAL_ERROR, f"internal error in {request.method}: {exc!r}")
        try:
            # Waits while the client is not reading: answered requests then stay in flight, and past the
            # in-flight limit new ones are refused, so unread answers cannot grow without bound.
            await self.out.send(reply)
        except (TypeError, ValueError) as exc:
            log.exception("cannot encode the answer to %s", request.method)
            self.out.send_nowait(ErrorResponse(request.id, INTERNAL_ERROR, f"unencodable result: {exc}"))

    # --- inline messages ---------------------------------------------------------------------------

    async def _input(self, request: Request) -> None:
        """stdin, EOF and resize for a running exec_pipe/exec_tty; never answered (as upstream)."""
        target = request.target_id
        stdin = self.inputs.get(target) if target is not None else None
        if stdin is None:
            log.debug("%s for %r, which is not a running exec_pipe/exec_tty", request.method, target)
            return
        fields = Fields(request.params)
        try:
            if request.method.endswith(".resize"):
                stdin.resize(fields.integer("rows", lo=1, hi=65535), fields.integer("cols", lo=1, hi=65535))
            elif request.method.endswith(".stdin_eof"):
                await stdin.put(None)
            else:
                data = base64.b64decode(fields.string("data", max_len=1 << 62), validate=True)
                if data:
                    await stdin.put(data)
        except (RpcError, binascii.Error) as exc:
            log.warning("%s for %r ignored: %s", request.method, target, exc)

    def _cancel(self, request: Request) -> None:
        target = request.target_id
        if target is None:
            if request.id is not None:
                self._reply_error(request.id, INVALID_PARAMS, "invalid params: id must be the id of a request")
            return
        task = self.requests.get(target)
        cancelled = task is not None and not task.done()
        if task is not None and cancelled:
            task.cancel()
        if request.id is not None:
            self.out.send_nowait(Response(request.id, {"cancelled": cancelled}))

    # --- events ------------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Sandbox event listener; may be called from any thread."""
        payload = event.to_json()
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self.loop.call_soon_threadsafe(self._queue_event, payload)

    def _queue_event(self, payload: JSONObject) -> None:
        try:
            self.events.put_nowait(payload)
        except asyncio.QueueFull:
            self.events_dropped += 1

    async def _send_events(self) -> None:
        while True:
            payload = await self.events.get()
            await self.out.send(Request("event", payload))

    # --- shutdown ----------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        in_flight = list(self.requests.values())
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.wait(in_flight, timeout=SHUTDOWN_REQUEST_WAIT)
        graceful, answer = 0.0, None
        if self.close_request is not None:
            graceful, answer = _close_params(self.close_request)
        error = await self._close_vm(graceful=graceful, remove=False)
        if self.close_request is not None and self.close_request.id is not None:
            if answer is None and error:
                answer = ErrorResponse(self.close_request.id, VM_FAILED, error)
            self.out.send_nowait(answer or Response(self.close_request.id, {}))
        await self.out.flush(FLUSH_SECONDS)

    async def _close_vm(self, *, graceful: float, remove: bool) -> str:
        """Stop forwards, relay and entrypoint, then the VM. Returns an error message, or ""."""
        error = ""
        if self.forwarder is not None:
            forwarder, self.forwarder = self.forwarder, None
            await _quietly(forwarder.aclose(), "stopping the port forwards")
        if self.relay is not None:
            relay, self.relay = self.relay, None
            await _quietly(relay.aclose(), "stopping the exec relay")
        if self.entrypoint is not None:
            entrypoint, self.entrypoint = self.entrypoint, None
            with contextlib.suppress(MatchlockError):
                entrypoint.cancel()
        if self.sandbox is not None:
            sandbox, self.sandbox = self.sandbox, None
            try:
                await sandbox.aclose(graceful_timeout=graceful, remove=remove)
            except Exception as exc:  # noqa: BLE001 - reported in the close answer; the session still ends
                log.error("closing %s failed: %s", sandbox.id, exc)
                error = f"closing {sandbox.id} failed: {exc}"
        return error


async def _quietly(closing: Awaitable[None], what: str) -> None:
    """One step of the shutdown: a failure is logged, and the VM is still closed after it."""
    try:
        await closing
    except Exception:  # noqa: BLE001
        log.exception("%s failed", what)


def _close_params(request: Request) -> tuple[float, ErrorResponse | None]:
    """The guest's share of `timeout_seconds`. The SDK waits timeout+1 s for the answer, so half goes to
    the guest's own shutdown and the rest is left for stopping QEMU. A bad value still closes."""
    value = request.params.get("timeout_seconds", 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
        message = f"invalid params: timeout_seconds must be a number of seconds (0-3600), got {value!r}"
        return 0.0, ErrorResponse(request.id, INVALID_PARAMS, message) if request.id is not None else None
    return float(value) / 2, None


# --- create --------------------------------------------------------------------------------------


async def _kernel(parsed: CreateParams) -> Path | None:
    """The kernel `kernel.ref` names: a file that must exist (-32602), or an OCI artifact to pull (-32000)."""
    if parsed.kernel_path:
        path = Path(parsed.kernel_path)
        if not path.is_file():
            raise bad("kernel.ref", f"file://{path}: no such file; give the absolute path of a kernel image (vmlinux)")
        return path
    if parsed.kernel_image:
        from ..image.kernel_artifact import pull_kernel  # only sessions that ask for one pay for it

        try:
            return await asyncio.to_thread(pull_kernel, parsed.kernel_image)
        except MatchlockError as exc:
            raise RpcError(VM_FAILED, f"pulling kernel.ref {parsed.kernel_image} failed: {exc}") from None
    return None


async def _create(session: Session, request: Request) -> JSONObject:
    if session.sandbox is not None:
        raise RpcError(
            VM_FAILED,
            f"this session already has VM {session.sandbox.id}: `matchlock rpc` runs one VM; "
            "close this client and start another one for a second VM",
        )
    if session.creating:
        raise RpcError(VM_FAILED, "a create is already in progress in this session")
    parsed = parse_create(request.params)
    session.creating = True
    try:
        from ..image.pull import resolve_or_pull  # only sessions that create pay for the image code

        config, restore = _restore(session.state(), parsed)  # a missing secret fails here, before anything starts
        kernel = await _kernel(parsed)
        await asyncio.to_thread(resolve_or_pull, config.image)
        try:
            # Until QEMU has the snapshot's files open, `snapshot rm` of it is refused (they are not half-read).
            with restore.reading() if restore is not None else contextlib.nullcontext():
                sandbox = await Sandbox.create(config, store=session.state(), kernel_path=kernel, restore=restore)
        except (MatchlockError, RpcError):
            raise
        except Exception as exc:  # noqa: BLE001 - any boot failure is a VM failure (-32000), as upstream
            raise RpcError(VM_FAILED, f"creating the sandbox failed: {type(exc).__name__}: {exc}") from exc
        session.sandbox = sandbox
    finally:
        session.creating = False
    sandbox.event_listeners.append(session.on_event)
    try:
        relay = ExecRelay(sandbox, sandbox.paths.exec_socket, session.tasks)
        sandbox.tracker.resources(exec_socket=str(relay.path))
        await relay.start()  # `matchlock exec ID`, `allow-list` and `port-forward` work on this VM too
        session.relay = relay
        if parsed.launch_entrypoint:
            await _launch_entrypoint(session, sandbox)
    except BaseException:
        # As upstream: a VM whose start failed is closed and its state removed.
        await session._close_vm(graceful=0.0, remove=True)
        raise
    return {"id": sandbox.id}


def _restore(store: StateStore, parsed: CreateParams) -> tuple[SandboxConfig, Restore | None]:
    """`create`'s config, and with `from_snapshot` the snapshot it restores (its image and machine in the config)."""
    if parsed.restore is None:
        return parsed.config, None
    from ..sandbox.snapshots import Restore  # only sessions that restore pay for it

    try:
        restore = Restore.load(store, parsed.restore.name)
    except NotFoundError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: from_snapshot: {exc}, or the snapshot_list method") from None
    if restore.full and parsed.launch_entrypoint:
        # Its entrypoint runs on in the restored memory: launching it again made a second copy.
        raise RpcError(
            INVALID_PARAMS,
            f"invalid params: launch_entrypoint: snapshot {restore.name!r} is a full one, whose entrypoint is "
            "still running in its memory; fix: create without launch_entrypoint (the SDK's create, not "
            "launch), or restore a filesystem snapshot, which boots cold",
        )
    return prepare_restore(restore, parsed.restore, parsed.config), restore


async def _launch_entrypoint(session: Session, sandbox: Sandbox) -> None:
    argv = compose_command(sandbox.image_config, ())
    if not argv:
        return
    log_file = open(sandbox.console_log, "ab", buffering=0)  # noqa: SIM115 - closed by the entrypoint task

    def append(data: bytes) -> None:
        log_file.write(data)

    try:
        process = sandbox.start_exec(ExecSpec(shlex.join(argv)), on_stdout=append, on_stderr=append)
    except BaseException:
        log_file.close()
        raise
    session.entrypoint = process
    try:
        # The window counts from when the command runs: starting it alone can take longer under emulation.
        await process.started()
    except MatchlockError as exc:
        log_file.close()
        raise RpcError(VM_FAILED, f"start image entrypoint: {exc}") from None
    except BaseException:
        log_file.close()
        raise
    task = session.tasks.create_task(_run_entrypoint(process, log_file))
    done, _ = await asyncio.wait({task}, timeout=ENTRYPOINT_CHECK_SECONDS)
    if task not in done:
        return  # still running: it keeps running until close
    outcome = task.result()
    if isinstance(outcome, MatchlockError):
        raise RpcError(VM_FAILED, f"start image entrypoint: {outcome}")
    if outcome.error or outcome.exit_code != 0:
        detail = f" ({outcome.error})" if outcome.error else ""
        raise RpcError(VM_FAILED, f"start image entrypoint: exit code {outcome.exit_code}{detail}")


async def _run_entrypoint(process: GuestProcess, log_file: IO[bytes]) -> ExecResult | MatchlockError:
    try:
        outcome = await wait_outcome(process)
        with contextlib.suppress(OSError):
            if isinstance(outcome, MatchlockError):
                log_file.write(f"[matchlock] entrypoint failed: {outcome}\n".encode())
            else:
                log_file.write(f"[matchlock] entrypoint exited with code {outcome.exit_code}\n".encode())
        return outcome
    finally:
        log_file.close()


# --- process entry -------------------------------------------------------------------------------


async def serve(in_fd: int, out_fd: int) -> None:
    """Serve one session on these descriptors until it ends."""
    loop = asyncio.get_running_loop()
    reader, writer = StdinReader(in_fd, loop), StdoutWriter(out_fd, loop)
    reader.start()
    writer.start()
    session = Session(writer)
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in signals:
        loop.add_signal_handler(signum, session.request_stop, f"signal {signum.name}")
    try:
        await session.run(reader)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await writer.flush(FLUSH_SECONDS)
        writer.close()
