"""`AsyncClient`: the SDK for asyncio programs (the `Client` API, as coroutines).

    async with AsyncClient() as client:
        await client.create(Sandbox("alpine:latest").options())
        print((await client.exec("echo hello")).stdout)

It shares everything but the I/O with `Client`: the requests and their results (`calls`), the connection
state (`base.ClientBase`), the hook protocols (`hooks`) and the session (`session`, on the jsonrpc core).
Cancelling a call's task also cancels the request in the server. Output writers are ordinary file-like
objects; `stdin` may be a file-like object (read in a worker thread) or anything with an `async read(n)`,
such as `asyncio.StreamReader`; `resize` may be an iterable or an async iterable.
Network hooks and VFS after-hooks may be plain functions (run in a worker thread) or coroutine functions
(awaited on the loop); a `dangerous_hook` receives this `AsyncClient`. `action_hook` and `mutate_hook`
stay plain functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import subprocess
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable
from typing import IO, Any, TypeVar

from . import calls, volumes
from .base import ClientBase, PendingCall, server_argv, split_forks
from .builder import Sandbox
from .calls import CREATE_TIMEOUT, PORT_FORWARD_TIMEOUT, Call
from .errors import MatchlockError
from .hooks import (
    MAX_HOOK_LINE,
    LocalVFSHook,
    answer_line,
    network_result_to_wire,
    new_socket_dir,
    resolve_network_call,
)
from .streams import InputRoute, Notify, as_bytes
from .types import (
    AllowListUpdate,
    Config,
    CreateOptions,
    ExecInteractiveResult,
    ExecPipeResult,
    ExecResult,
    ExecStreamResult,
    FileInfo,
    PortForwardBinding,
    VFSHookEvent,
    VolumeInfo,
)

R = TypeVar("R")
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


class _Call(PendingCall):
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any], on_notification: Notify | None) -> None:
        super().__init__(on_notification)
        self.future = future

    def resolve(self, result: Any) -> None:
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def output_failed(self, error: Exception) -> None:
        self.fail(error)  # at once: the awaiting task is the one whose writer failed


class AsyncClient(ClientBase):
    """asyncio client for one sandbox served by a `matchlock rpc` child process."""

    def __init__(self, config: Config | None = None):
        super().__init__(config)
        self._process: asyncio.subprocess.Process | None = None
        self._write_lock = asyncio.Lock()
        self._background = _Background()
        self._safe_hook_running = False
        self._hook_server: _NetworkHookServer | None = None

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

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
        if not self._begin_close():
            return
        process = self._process
        if process is not None and process.returncode is None:
            call, seconds = calls.close(timeout)
            with contextlib.suppress(MatchlockError, TimeoutError):
                await self._request(call, seconds + 1.0)
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
        vm_id = self._removable_id()
        if vm_id:
            await self._cli(volumes.remove(vm_id))

    async def _cli(self, call: volumes.CliCall[R]) -> R:
        argv = [self._config.binary_path, *call.args]
        child = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await child.communicate()
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, argv, out.decode(), err.decode())
        return call.parse(out.decode())

    async def volume_create(self, name: str, size_mb: int = 10240) -> VolumeInfo:
        return await self._cli(volumes.volume_create(name, size_mb))

    async def volume_list(self) -> list[VolumeInfo]:
        return await self._cli(volumes.volume_list())

    async def volume_remove(self, name: str) -> None:
        await self._cli(volumes.volume_remove(name))

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
            self._receive(data)
        self._server_gone()

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

    async def _request(self, call: Call[R], timeout: float | None = None) -> R:
        """Send one request and await its result; a timeout or a cancelled task cancels it in the server."""
        if self._process is None or self._process.returncode is not None or self._stdout_closed:
            raise MatchlockError("Matchlock process not running")
        pending = _Call(asyncio.get_running_loop().create_future(), call.on_notification)
        call_id, line = self._session.start(call.method, call.params, pending)
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
                result = await asyncio.shield(pending.future)
        except TimeoutError:
            if not pending.future.done():
                await self._send_quietly(self._session.abandon(call_id))
                raise TimeoutError(f"request {call.method} (id={call_id}) timed out after {timeout}s") from None
            result = pending.future.result()  # answered as the timer fired
        except asyncio.CancelledError:
            if not pending.future.done():
                await self._send_quietly(self._session.abandon(call_id))
            raise
        return call.parse(result)

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
        plan = self._begin_create(opts)
        callback_socket = None
        if plan.callbacks:
            server = _NetworkHookServer(plan.callbacks)
            await server.start()
            self._hook_server = server
            callback_socket = server.socket_path
        try:
            vm_id = await self._request(calls.create(plan.params(callback_socket)), timeout)
        except BaseException:
            self._stop_hook_server()
            raise
        forwards = self._created(plan, vm_id)
        if forwards is not None:
            await self._request(forwards, PORT_FORWARD_TIMEOUT)
        return vm_id

    async def launch(self, sandbox: Sandbox, *, timeout: float | None = CREATE_TIMEOUT) -> str:
        """Create the sandbox and start the image's ENTRYPOINT/CMD in the background."""
        return await self.create(calls.launch_options(sandbox), timeout=timeout)

    async def port_forward(self, *specs: str, timeout: float | None = PORT_FORWARD_TIMEOUT) -> list[PortForwardBinding]:
        return await self.port_forward_with_addresses(None, *specs, timeout=timeout)

    async def port_forward_with_addresses(
        self, addresses: list[str] | None, *specs: str, timeout: float | None = PORT_FORWARD_TIMEOUT
    ) -> list[PortForwardBinding]:
        call = calls.port_forward(addresses, [calls.parse_forward_spec(spec) for spec in specs])
        return [] if call is None else await self._request(call, timeout)

    async def allow_list_add(self, *hosts: str, timeout: float | None = None) -> AllowListUpdate:
        return await self._request(calls.allow_list_add(hosts), timeout)

    async def allow_list_delete(self, *hosts: str, timeout: float | None = None) -> AllowListUpdate:
        return await self._request(calls.allow_list_delete(hosts), timeout)

    async def pause(self, timeout: float | None = None) -> None:
        """Stop the sandbox's vCPUs (memory and connections kept); exec fails until `resume()`."""
        await self._request(calls.pause(), timeout)

    async def resume(self, timeout: float | None = None) -> None:
        await self._request(calls.resume(), timeout)

    async def snapshot(self, name: str = "", mode: str = "full", timeout: float | None = None) -> dict:
        """Save the sandbox (see `Client.snapshot`); returns the snapshot record."""
        return await self._request(calls.snapshot(name, mode), timeout)

    async def snapshot_list(self, timeout: float | None = None) -> list[dict]:
        return await self._request(calls.snapshot_list(), timeout)

    async def snapshot_remove(self, *names: str, timeout: float | None = None) -> list[str]:
        return await self._request(calls.snapshot_remove(names), timeout)

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
        clones, failure = split_forks([task.result() for task in making])
        if failure is not None:
            for clone in clones:
                await clone._discard()
            raise failure
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
        clone._adopt_vfs_hooks(self)
        return clone

    async def _discard(self) -> None:
        """Close and remove, quietly: cleaning up after a failure that is being reported already."""
        await self.close()
        with contextlib.suppress(MatchlockError, OSError, subprocess.CalledProcessError):
            await self.remove()

    # --- exec ------------------------------------------------------------------------------

    async def exec(self, command: str, working_dir: str = "", timeout: float | None = None) -> ExecResult:
        return await self._request(calls.exec_command(command, working_dir), timeout)

    async def exec_stream(
        self,
        command: str,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        working_dir: str = "",
        timeout: float | None = None,
    ) -> ExecStreamResult:
        return await self._request(calls.exec_stream(command, working_dir, stdout, stderr), timeout)

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
        ready = asyncio.Event()
        call, route = calls.exec_pipe(command, working_dir, user, stdout, stderr, ready.set)
        return await self._run_with_input(call, route, ready, stdin, None, timeout)

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
        ready = asyncio.Event()
        call, route = calls.exec_tty(command, working_dir, user, rows, cols, stdout, ready.set)
        return await self._run_with_input(call, route, ready, stdin, resize, timeout)

    async def _run_with_input(
        self,
        call: Call[R],
        route: InputRoute,
        ready: asyncio.Event,
        stdin: Any,
        resize: Resize | None,
        timeout: float | None,
    ) -> R:
        async with asyncio.TaskGroup() as group:
            pumps = [group.create_task(self._pump_stdin(route, stdin, ready))]
            if resize is not None:
                pumps.append(group.create_task(self._pump_resize(route, resize, ready)))
            try:
                return await self._request(call, timeout)
            finally:
                for pump in pumps:
                    pump.cancel()

    async def _pump_stdin(self, route: InputRoute, stdin: Any, ready: asyncio.Event) -> None:
        await ready.wait()
        target = route.target
        if target is None:
            return
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
            data = as_bytes(chunk)
            if not data:
                break
            await self._notify(*route.stdin(target, data))
        await self._notify(*route.stdin_eof(target))

    async def _pump_resize(self, route: InputRoute, resize: Resize, ready: asyncio.Event) -> None:
        await ready.wait()
        target = route.target
        if target is None:
            return
        async for size in _iterate(resize):
            message = route.resize(target, size)
            if message is not None:
                await self._notify(*message)

    # --- files and log ---------------------------------------------------------------------

    async def write_file(
        self, path: str, content: bytes | str, mode: int = 0o644, timeout: float | None = None
    ) -> None:
        await self._request(self._write_file_call(path, content, mode), timeout)

    async def read_file(self, path: str, timeout: float | None = None) -> bytes:
        return await self._request(self._read_file_call(path), timeout)

    async def list_files(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        return await self._request(self._list_files_call(path), timeout)

    async def log(self, timeout: float | None = None) -> str:
        return await self._request(calls.log(), timeout)

    async def log_stream(self, stdout: IO[str] | None = None, timeout: float | None = None) -> None:
        await self._request(calls.log_stream(stdout), timeout)


async def _iterate(items: Resize) -> AsyncIterator[tuple[int, int]]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
