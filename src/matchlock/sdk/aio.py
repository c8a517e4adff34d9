"""`AsyncClient`: the SDK for asyncio programs (the `Client` API, as coroutines).

    async with AsyncClient() as client:
        await client.create(Sandbox("alpine:latest").options())
        print((await client.exec("echo hello")).stdout)

It shares the wire logic with `Client` (`calls`, `hooks`, `session`, on the jsonrpc core); only the I/O
differs. Cancelling a call's task also cancels the request in the server. Output writers are ordinary
file-like objects; `stdin` may be a file-like object (read in a worker thread) or anything with an
`async read(n)`, such as `asyncio.StreamReader`; `resize` may be an iterable or an async iterable.
Network hooks and VFS after-hooks may be plain functions (run in a worker thread) or coroutine functions
(awaited on the loop); a `dangerous_hook` receives this `AsyncClient`. `action_hook` and `mutate_hook`
stay plain functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import shutil
import subprocess
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable
from typing import IO, Any

from ..jsonrpc import Broadcast, Failed, Resolved, Routed
from . import calls
from .builder import Sandbox
from .calls import CREATE_TIMEOUT, PORT_FORWARD_TIMEOUT, Notify
from .client import default_config, server_argv
from .errors import MatchlockError, RPCError
from .hooks import (
    MAX_HOOK_LINE,
    LocalVFSHook,
    LocalVFSHooks,
    answer_line,
    network_result_to_wire,
    new_socket_dir,
    parse_file_event,
    plan_create,
    resolve_network_call,
)
from .session import Malformed, Session
from .types import (
    AllowListUpdate,
    Config,
    CreateOptions,
    ExecInteractiveResult,
    ExecPipeResult,
    ExecResult,
    ExecStreamResult,
    FileInfo,
    PortForward,
    PortForwardBinding,
    VFSHookEvent,
    VolumeInfo,
)

Resize = Iterable[tuple[int, int]] | AsyncIterable[tuple[int, int]]


class _Background:
    """The one place this module starts free-running tasks (reader, hooks): it keeps them referenced
    and cancels them on close. Everything request-scoped uses a TaskGroup instead."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_all(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _call(callback: Callable[..., Any], *args: Any) -> Any:
    """Await a coroutine function; run a plain one in a worker thread so it cannot stall the loop."""
    if inspect.iscoroutinefunction(callback):
        return await callback(*args)
    return await asyncio.to_thread(callback, *args)


async def _call_quietly(callback: Callable[..., Any], *args: Any) -> None:
    # After-hooks are observers: their failure must not disturb the client or later events.
    with contextlib.suppress(Exception):
        await _call(callback, *args)


class _NetworkHookServer:
    """Answers the proxy's network-hook connections on a Unix socket (one JSON line each way)."""

    def __init__(self, callbacks: dict[str, tuple[str, Callable[..., Any]]]) -> None:
        self._callbacks = callbacks
        self._dir, self.socket_path = new_socket_dir()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.socket_path, limit=MAX_HOOK_LINE)
        except OSError:
            self.stop()
            raise

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await reader.readline()
            except (ValueError, OSError) as exc:  # ValueError: longer than the limit
                answer: dict[str, Any] = {"error": f"invalid network hook request: {exc}"}
            else:
                if not line:
                    return
                answer = await self._answer(line.rstrip(b"\n"))
            writer.write(answer_line(answer))
            await writer.drain()
        except OSError:
            pass  # the proxy gave up (its timeout); it fails open
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        resolved = resolve_network_call(line, self._callbacks)
        if isinstance(resolved, dict):
            return resolved
        hook, request = resolved
        try:
            return network_result_to_wire(await _call(hook, request))
        except Exception as exc:  # noqa: BLE001 - a failing user hook fails open in the proxy
            return {"error": f"network hook raised {type(exc).__name__}: {exc}"}


class _Call:
    __slots__ = ("future", "on_notification")

    def __init__(self, future: asyncio.Future[Any], on_notification: Notify | None) -> None:
        self.future = future
        self.on_notification = on_notification


class AsyncClient:
    """asyncio client for one sandbox served by a `matchlock rpc` child process."""

    def __init__(self, config: Config | None = None):
        self._config = config if config is not None else default_config()
        self._process: asyncio.subprocess.Process | None = None
        self._session: Session[_Call] = Session()
        self._write_lock = asyncio.Lock()
        self._background = _Background()
        self._closed = False
        self._stdout_closed = False  # set before pending calls are failed, so none can slip in after
        self._vm_id: str | None = None
        self._last_vm_id: str | None = None
        self._create_opts: CreateOptions | None = None  # for fork(); secrets stay in memory only
        self._vfs = LocalVFSHooks()
        self._safe_hook_running = False
        self._hook_server: _NetworkHookServer | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    @property
    def vm_id(self) -> str | None:
        return self._vm_id

    # --- process ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._process is not None:
            return
        self._process = await asyncio.create_subprocess_exec(
            *server_argv(self._config),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._background.spawn(self._read_loop(self._process))

    async def close(self, timeout: float = 0) -> None:
        """Close the sandbox and stop the server; idempotent (see `Client.close`)."""
        if self._closed:
            return
        self._closed = True
        self._last_vm_id = self._vm_id
        self._vfs.set([])
        self._stop_hook_server()
        process = self._process
        if process is not None and process.returncode is None:
            seconds = calls.close_seconds(timeout)
            with contextlib.suppress(MatchlockError, TimeoutError):
                await self._request("close", {"timeout_seconds": seconds}, timeout=seconds + 1.0)
            if process.stdin is not None:
                process.stdin.close()
            try:
                async with asyncio.timeout(seconds):
                    await process.wait()
            except TimeoutError:
                process.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1):
                        await process.wait()
        await self._background.cancel_all()

    async def remove(self) -> None:
        """Delete the stopped VM's state (`matchlock rm ID`); call after close()."""
        vm_id = self._vm_id or self._last_vm_id
        if vm_id:
            await self._cli("rm", vm_id)

    async def _cli(self, *args: str) -> str:
        argv = [self._config.binary_path, *args]
        child = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await child.communicate()
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, argv, out.decode(), err.decode())
        return out.decode()

    async def volume_create(self, name: str, size_mb: int = 10240) -> VolumeInfo:
        argv = calls.volume_create_argv(self._config.binary_path, name, size_mb)
        return calls.parse_volume_create(await self._cli(*argv[1:]), name, size_mb)

    async def volume_list(self) -> list[VolumeInfo]:
        return calls.parse_volume_list(await self._cli("volume", "ls", "--json"))

    async def volume_remove(self, name: str) -> None:
        await self._cli("volume", "rm", calls.volume_name(name))

    # --- transport -------------------------------------------------------------------------

    async def _read_loop(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                data = await process.stdout.read(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            for event in self._session.feed(data):
                self._dispatch(event)
        self._stdout_closed = True
        lost = MatchlockError("Matchlock process closed unexpectedly")
        for _, call in self._session.eof():
            if not call.future.done():
                call.future.set_exception(lost)
        self._stop_hook_server()

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, Resolved | Failed | Malformed):
            future = event.context.future
            if future.done():
                return
            if isinstance(event, Resolved):
                future.set_result(event.result)
            elif isinstance(event, Failed):
                future.set_exception(RPCError(event.code, event.message))
            else:
                future.set_exception(MatchlockError(event.reason))
        elif isinstance(event, Routed):
            call = event.context
            error = calls.deliver(call.on_notification, event.method, event.params)
            if error is not None and not call.future.done():
                call.future.set_exception(error)
        elif isinstance(event, Broadcast) and event.method == "event":
            file_event = parse_file_event(event.params)
            if file_event is not None:
                self._on_file_event(file_event)

    async def _write(self, line: bytes) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise MatchlockError("Matchlock process not running")
        try:
            async with self._write_lock:
                process.stdin.write(line)
                await process.stdin.drain()
        except (OSError, RuntimeError) as exc:  # RuntimeError: the transport is already closed
            raise MatchlockError(f"Matchlock process closed unexpectedly ({exc})") from exc

    async def _send_quietly(self, line: bytes) -> None:
        with contextlib.suppress(MatchlockError):
            await self._write(line)

    async def _request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        on_notification: Notify | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request and await its result; a timeout or a cancelled task cancels it in the server."""
        if self._process is None or self._process.returncode is not None or self._stdout_closed:
            raise MatchlockError("Matchlock process not running")
        call = _Call(asyncio.get_running_loop().create_future(), on_notification)
        call_id, line = self._session.start(method, params, call)
        try:
            await self._write(line)
        except asyncio.CancelledError:
            # The line is already in the transport's buffer: the server will run it unless told not to.
            await self._send_quietly(self._session.abandon(call_id))
            raise
        except BaseException:
            self._session.forget(call_id)
            raise
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(call.future)
        except TimeoutError:
            if call.future.done():  # answered as the timer fired
                return call.future.result()
            await self._send_quietly(self._session.abandon(call_id))
            raise TimeoutError(f"request {method} (id={call_id}) timed out after {timeout}s") from None
        except asyncio.CancelledError:
            if not call.future.done():
                await self._send_quietly(self._session.abandon(call_id))
            raise

    async def _notify(self, method: str, params: dict[str, Any]) -> None:
        await self._send_quietly(self._session.send(method, params))

    # --- hooks -----------------------------------------------------------------------------

    def _stop_hook_server(self) -> None:
        server, self._hook_server = self._hook_server, None
        if server is not None:
            server.stop()

    def _on_file_event(self, event: VFSHookEvent) -> None:
        safe, dangerous = self._vfs.after_hooks_for(event)
        for hook in dangerous:
            self._background.spawn(_call_quietly(hook.callback, self, event))
        if safe and not self._safe_hook_running:
            self._safe_hook_running = True
            self._background.spawn(self._run_safe_hooks(safe, event))

    async def _run_safe_hooks(self, hooks: list[LocalVFSHook], event: VFSHookEvent) -> None:
        try:
            for hook in hooks:
                await _call_quietly(hook.callback, event)
        finally:
            self._safe_hook_running = False

    # --- sandbox ---------------------------------------------------------------------------

    async def create(self, opts: CreateOptions | None = None, *, timeout: float | None = CREATE_TIMEOUT) -> str:
        """Create and boot the sandbox; returns its id. `timeout=None` waits forever."""
        plan = plan_create(opts)
        self._stop_hook_server()
        self._vfs.set([])
        callback_socket = None
        if plan.callbacks:
            server = _NetworkHookServer(plan.callbacks)
            await server.start()
            self._hook_server = server
            callback_socket = server.socket_path
        try:
            result = await self._request("create", plan.params(callback_socket), timeout=timeout)
            vm_id = calls.parse_create(result)
        except BaseException:
            self._stop_hook_server()
            raise
        self._vm_id = vm_id
        self._create_opts = copy.copy(plan.opts)
        self._vfs.set(plan.vfs.local)
        if plan.opts.port_forwards:
            await self._port_forward(
                plan.opts.port_forward_addresses, plan.opts.port_forwards, timeout=PORT_FORWARD_TIMEOUT
            )
        return vm_id

    async def launch(self, sandbox: Sandbox, *, timeout: float | None = CREATE_TIMEOUT) -> str:
        """Create the sandbox and start the image's ENTRYPOINT/CMD in the background."""
        opts = copy.deepcopy(sandbox.options())
        opts.launch_entrypoint = True
        return await self.create(opts, timeout=timeout)

    async def port_forward(self, *specs: str, timeout: float | None = PORT_FORWARD_TIMEOUT) -> list[PortForwardBinding]:
        return await self.port_forward_with_addresses(None, *specs, timeout=timeout)

    async def port_forward_with_addresses(
        self, addresses: list[str] | None, *specs: str, timeout: float | None = PORT_FORWARD_TIMEOUT
    ) -> list[PortForwardBinding]:
        forwards = [calls.parse_forward_spec(spec) for spec in specs]
        return await self._port_forward(addresses, forwards, timeout=timeout)

    async def _port_forward(
        self, addresses: list[str] | None, forwards: list[PortForward], *, timeout: float | None
    ) -> list[PortForwardBinding]:
        if not forwards:
            return []
        params = calls.port_forward_params(addresses, forwards)
        return calls.parse_bindings(await self._request("port_forward", params, timeout=timeout))

    async def allow_list_add(self, *hosts: str, timeout: float | None = None) -> AllowListUpdate:
        result = await self._request("allow_list_add", calls.allow_list_params(hosts), timeout=timeout)
        return calls.parse_allow_list(result, "allow_list_add", "added")

    async def pause(self, timeout: float | None = None) -> None:
        """Stop the sandbox's vCPUs (memory and connections kept); exec fails until `resume()`."""
        await self._request("pause", {}, timeout=timeout)

    async def resume(self, timeout: float | None = None) -> None:
        await self._request("resume", {}, timeout=timeout)

    async def snapshot(self, name: str = "", mode: str = "full", timeout: float | None = None) -> dict:
        """Save the sandbox (`full`: memory and disks, `filesystem`: disks); `from_snapshot` and
        `matchlock run --from-snapshot` restore it. Returns the snapshot record (name, mode, size, ...)."""
        return calls.parse_snapshot(await self._request("snapshot", calls.snapshot_params(name, mode), timeout=timeout))

    async def snapshot_list(self, timeout: float | None = None) -> list[dict]:
        """The complete snapshots (records as `snapshot()` returns); works before `create`."""
        return calls.parse_snapshot_list(await self._request("snapshot_list", {}, timeout=timeout))

    async def snapshot_remove(self, *names: str, timeout: float | None = None) -> list[str]:
        """Remove snapshots (all names are checked first); clones restored from them keep running."""
        params = calls.snapshot_remove_params(names)
        return calls.parse_removed(await self._request("snapshot_remove", params, timeout=timeout))

    async def fork(self, count: int = 1, *, timeout: float | None = CREATE_TIMEOUT) -> list[AsyncClient]:
        """`count` new async clients, each owning a clone of this running sandbox (see `Client.fork`)."""
        name, opts = calls.fork_plan(self._create_opts, count)
        await self.snapshot(name, mode="full", timeout=timeout)
        making: list[asyncio.Task[AsyncClient | Exception]] = []
        try:
            async with asyncio.TaskGroup() as group:
                making = [group.create_task(self._clone(opts, timeout)) for _ in range(count)]
        except BaseException:  # cancelled: the clones already made are nobody's
            for task in making:
                made = task.result() if task.done() and not task.cancelled() else None
                if isinstance(made, AsyncClient):
                    await made._discard()
            raise
        finally:
            with contextlib.suppress(MatchlockError, TimeoutError):
                await self.snapshot_remove(name, timeout=timeout)
        outcomes = [task.result() for task in making]
        clones = [outcome for outcome in outcomes if isinstance(outcome, AsyncClient)]
        failures = [outcome for outcome in outcomes if not isinstance(outcome, AsyncClient)]
        if failures:
            for clone in clones:
                await clone._discard()
            raise failures[0]
        return clones

    async def _clone(self, opts: CreateOptions, timeout: float | None) -> AsyncClient | Exception:
        clone = AsyncClient(self._config)
        try:
            await clone.start()
            await clone.create(opts, timeout=timeout)
        except BaseException as exc:
            await clone._discard()
            if not isinstance(exc, Exception):
                raise  # cancelled: this clone is gone, the group closes the others
            return exc
        return clone

    async def _discard(self) -> None:
        """Close and remove, quietly: cleaning up after a failure that is being reported already."""
        await self.close()
        with contextlib.suppress(MatchlockError, OSError, subprocess.CalledProcessError):
            await self.remove()

    async def allow_list_delete(self, *hosts: str, timeout: float | None = None) -> AllowListUpdate:
        result = await self._request("allow_list_delete", calls.allow_list_params(hosts), timeout=timeout)
        return calls.parse_allow_list(result, "allow_list_delete", "removed")

    # --- exec ------------------------------------------------------------------------------

    async def exec(self, command: str, working_dir: str = "", timeout: float | None = None) -> ExecResult:
        result = await self._request("exec", calls.exec_params(command, working_dir), timeout=timeout)
        return calls.parse_exec(result)

    async def exec_stream(
        self,
        command: str,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        working_dir: str = "",
        timeout: float | None = None,
    ) -> ExecStreamResult:
        on_output = calls.output_writer({"exec_stream.stdout": stdout, "exec_stream.stderr": stderr})
        result = await self._request("exec_stream", calls.exec_params(command, working_dir), on_output, timeout)
        return ExecStreamResult(*calls.parse_status(result, "exec_stream"))

    async def exec_pipe(
        self,
        command: str,
        stdin: Any = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        working_dir: str = "",
        timeout: float | None = None,
        user: str = "",
    ) -> ExecPipeResult:
        writers = {"exec_pipe.stdout": stdout, "exec_pipe.stderr": stderr}
        params = calls.exec_params(command, working_dir, user)
        result = await self._run_with_input("exec_pipe", params, stdin, None, writers, timeout)
        return ExecPipeResult(*calls.parse_status(result, "exec_pipe"))

    async def exec_interactive(
        self,
        command: str,
        stdin: Any = None,
        stdout: IO[str] | None = None,
        working_dir: str = "",
        rows: int = 24,
        cols: int = 80,
        resize: Resize | None = None,
        timeout: float | None = None,
        user: str = "",
    ) -> ExecInteractiveResult:
        params = calls.tty_params(command, working_dir, user, rows, cols)
        result = await self._run_with_input("exec_tty", params, stdin, resize, {"exec_tty.stdout": stdout}, timeout)
        return ExecInteractiveResult(*calls.parse_status(result, "exec_tty"))

    async def _run_with_input(
        self,
        method: str,
        params: dict[str, Any],
        stdin: Any,
        resize: Resize | None,
        writers: dict[str, IO[str] | None],
        timeout: float | None,
    ) -> Any:
        ready = asyncio.Event()
        target: list[int] = []
        on_notification = calls.input_notifications(method, writers, ready.set, target)

        async with asyncio.TaskGroup() as group:
            pumps = [group.create_task(self._pump_stdin(method, stdin, ready, target))]
            if resize is not None:
                pumps.append(group.create_task(self._pump_resize(resize, ready, target)))
            try:
                return await self._request(method, params, on_notification, timeout)
            finally:
                for pump in pumps:
                    pump.cancel()

    async def _pump_stdin(self, method: str, stdin: Any, ready: asyncio.Event, target: list[int]) -> None:
        await ready.wait()
        if not target:
            return
        call_id = target[0]
        while stdin is not None:
            try:
                if isinstance(stdin, asyncio.StreamReader) or inspect.iscoroutinefunction(stdin.read):
                    chunk = await stdin.read(4096)
                else:
                    chunk = await asyncio.to_thread(stdin.read, 4096)
            except (OSError, ValueError):
                break
            if chunk is None:  # a non-blocking reader with nothing yet
                await asyncio.sleep(0.01)
                continue
            data = calls.as_bytes(chunk)
            if not data:
                break
            await self._notify(f"{method}.stdin", {"id": call_id, "data": calls.encode(data)})
        await self._notify(f"{method}.stdin_eof", {"id": call_id})

    async def _pump_resize(self, resize: Resize, ready: asyncio.Event, target: list[int]) -> None:
        await ready.wait()
        if not target:
            return
        async for size in _iterate(resize):
            if isinstance(size, tuple | list) and len(size) >= 2:
                await self._notify("exec_tty.resize", {"id": target[0], "rows": int(size[0]), "cols": int(size[1])})

    # --- files and log ---------------------------------------------------------------------

    async def write_file(
        self, path: str, content: bytes | str, mode: int = 0o644, timeout: float | None = None
    ) -> None:
        data = calls.as_bytes(content)
        self._vfs.check_action("write", path, len(data), mode)
        data = self._vfs.mutate_write(path, data, mode)
        await self._request("write_file", calls.write_file_params(path, data, mode), timeout=timeout)

    async def read_file(self, path: str, timeout: float | None = None) -> bytes:
        self._vfs.check_action("read", path, 0, 0)
        return calls.parse_read_file(await self._request("read_file", {"path": path}, timeout=timeout))

    async def list_files(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        self._vfs.check_action("readdir", path, 0, 0)
        return calls.parse_list_files(await self._request("list_files", {"path": path}, timeout=timeout))

    async def log(self, timeout: float | None = None) -> str:
        return calls.parse_log(await self._request("log", timeout=timeout))

    async def log_stream(self, stdout: IO[str] | None = None, timeout: float | None = None) -> None:
        on_data = calls.output_writer({"log_stream.data": stdout})
        await self._request("log_stream", on_notification=on_data, timeout=timeout)


async def _iterate(items: Resize) -> AsyncIterator[tuple[int, int]]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
