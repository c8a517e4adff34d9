"""`Client`: the thread-based SDK client (the API of the published SDK 0.2.17, plus fixes and allow-list calls).

    with Client() as client:
        client.create(Sandbox("alpine:latest").options())
        print(client.exec("echo hello").stdout)

It runs `matchlock rpc` (or `$MATCHLOCK_BIN rpc`) as a child and speaks JSON-RPC over its stdio. All
methods are thread-safe; requests run concurrently. Differences from the published SDK, all compatible:
`create`, `launch` and `port_forward` take a `timeout` (they waited forever), a bad line from the server
no longer kills the reader, late output notifications are still delivered, a failing output writer
raises from its exec call, and `allow_list_add` / `allow_list_delete` exist.

The requests and their results are `calls.Call`s and the connection state is `base.ClientBase`, both
shared with `AsyncClient`; this module is the transport: a child process, a reader thread, waiting threads.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar

from . import calls, volumes
from .base import ClientBase, PendingCall, server_argv, split_forks
from .builder import Sandbox
from .calls import CREATE_TIMEOUT, PORT_FORWARD_TIMEOUT, Call
from .errors import MatchlockError
from .hooks import NetworkHookServer, ThreadedAfterHooks
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
Reader = IO[str] | IO[bytes]


class _Call(PendingCall):
    __slots__ = ("done", "result", "error")

    def __init__(self, on_notification: Notify | None) -> None:
        super().__init__(on_notification)
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def resolve(self, result: Any) -> None:
        self.result = result
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def output_failed(self, error: Exception) -> None:
        # Raised once the call's answer is in: the command's output keeps going to the other writers.
        if self.error is None and not self.done.is_set():
            self.error = error


class Client(ClientBase):
    """Client for one sandbox served by a `matchlock rpc` child process."""

    def __init__(self, config: Config | None = None):
        super().__init__(config)
        self._process: subprocess.Popen[bytes] | None = None
        self._write_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._after_hooks = ThreadedAfterHooks(self._vfs, self)
        self._hook_lock = threading.Lock()
        self._hook_server: NetworkHookServer | None = None

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.close()

    # --- process ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._process is not None:
            return
        # stderr is the server's log; the SDK never shows it, and a full pipe would block the server.
        self._process = subprocess.Popen(
            server_argv(self._config), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self._reader = threading.Thread(target=self._read_loop, name="matchlock-rpc-reader", daemon=True)
        self._reader.start()

    def close(self, timeout: float = 0) -> None:
        """Close the sandbox and stop the server; idempotent.

        The server gets `close` with `timeout` seconds (0 means 2) to stop the VM, then as long to exit
        before it is killed. The VM stays listed as stopped until `remove()`.
        """
        if not self._begin_close():
            return
        process = self._process
        if process is None or process.poll() is not None:
            return
        call, seconds = calls.close(timeout)
        with contextlib.suppress(MatchlockError, TimeoutError):
            self._request(call, seconds + 1.0)
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.close()
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=1)
        if self._reader is not None:
            self._reader.join(timeout=1)

    def remove(self) -> None:
        """Delete the stopped VM's state (`matchlock rm ID`); call after close()."""
        vm_id = self._removable_id()
        if vm_id:
            self._cli(volumes.remove(vm_id))

    def _cli(self, call: volumes.CliCall[R]) -> R:
        argv = [self._config.binary_path, *call.args]
        return call.parse(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)

    def volume_create(self, name: str, size_mb: int = 10240) -> VolumeInfo:
        return self._cli(volumes.volume_create(name, size_mb))

    def volume_list(self) -> list[VolumeInfo]:
        return self._cli(volumes.volume_list())

    def volume_remove(self, name: str) -> None:
        self._cli(volumes.volume_remove(name))

    # --- transport -------------------------------------------------------------------------

    def _read_loop(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except (OSError, ValueError):
                data = b""
            if not data:
                break
            self._receive(data)
        self._server_gone()

    def _write(self, line: bytes) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise MatchlockError("Matchlock process not running")
        try:
            with self._write_lock:
                process.stdin.write(line)
                process.stdin.flush()
        except (OSError, ValueError) as exc:
            raise MatchlockError(f"Matchlock process closed unexpectedly ({exc})") from exc

    def _send_quietly(self, line: bytes) -> None:
        with contextlib.suppress(MatchlockError):
            self._write(line)

    def _request(self, call: Call[R], timeout: float | None = None) -> R:
        """Send one request and wait for its result; on timeout send `cancel` and raise TimeoutError."""
        if self._process is None or self._process.poll() is not None or self._stdout_closed:
            raise MatchlockError("Matchlock process not running")
        pending = _Call(call.on_notification)
        call_id, line = self._session.start(call.method, call.params, pending)
        if self._stdout_closed:
            self._session.forget(call_id)
            raise MatchlockError("Matchlock process closed unexpectedly")
        try:
            self._write(line)
        except MatchlockError:
            self._session.forget(call_id)
            raise
        if not pending.done.wait(timeout):
            self._send_quietly(self._session.abandon(call_id))
            if not pending.done.is_set():
                raise TimeoutError(f"request {call.method} (id={call_id}) timed out after {timeout}s")
        if pending.error is not None:
            raise pending.error
        return call.parse(pending.result)

    def _notify(self, method: str, params: dict[str, Any]) -> None:
        self._send_quietly(self._session.send(method, params))

    # --- hooks -----------------------------------------------------------------------------

    def _stop_hook_server(self) -> None:
        with self._hook_lock:
            server, self._hook_server = self._hook_server, None
        if server is not None:
            server.stop()

    def _on_file_event(self, event: VFSHookEvent) -> None:
        self._after_hooks.on_event(event)

    # --- sandbox ---------------------------------------------------------------------------

    def create(self, opts: CreateOptions | None = None, *, timeout: float | None = CREATE_TIMEOUT) -> str:
        """Create and boot the sandbox; returns its id. `timeout=None` waits forever."""
        plan = self._begin_create(opts)
        callback_socket = None
        if plan.callbacks:
            server = NetworkHookServer(plan.callbacks)
            with self._hook_lock:
                self._hook_server = server
            callback_socket = server.socket_path
        try:
            vm_id = self._request(calls.create(plan.params(callback_socket)), timeout)
        except BaseException:
            self._stop_hook_server()
            raise
        forwards = self._created(plan, vm_id)
        if forwards is not None:
            self._request(forwards, PORT_FORWARD_TIMEOUT)
        return vm_id

    def launch(self, sandbox: Sandbox, *, timeout: float | None = CREATE_TIMEOUT) -> str:
        """Create the sandbox and start the image's ENTRYPOINT/CMD in the background."""
        return self.create(calls.launch_options(sandbox), timeout=timeout)

    def port_forward(self, *specs: str, timeout: float | None = PORT_FORWARD_TIMEOUT) -> list[PortForwardBinding]:
        """Forward `[LOCAL:]REMOTE` ports on 127.0.0.1; replaces the earlier set."""
        return self.port_forward_with_addresses(None, *specs, timeout=timeout)

    def port_forward_with_addresses(
        self, addresses: list[str] | None, *specs: str, timeout: float | None = PORT_FORWARD_TIMEOUT
    ) -> list[PortForwardBinding]:
        call = calls.port_forward(addresses, [calls.parse_forward_spec(spec) for spec in specs])
        return [] if call is None else self._request(call, timeout)

    def allow_list_add(self, *hosts: str, timeout: float | None = None) -> AllowListUpdate:
        """Allow more hosts on the running sandbox (needs network interception); `changed` = newly added."""
        return self._request(calls.allow_list_add(hosts), timeout)

    def allow_list_delete(self, *hosts: str, timeout: float | None = None) -> AllowListUpdate:
        """Remove hosts from the allow-list; an empty list afterwards allows every host."""
        return self._request(calls.allow_list_delete(hosts), timeout)

    def pause(self, timeout: float | None = None) -> None:
        """Stop the sandbox's vCPUs (memory and connections kept); exec fails until `resume()`."""
        self._request(calls.pause(), timeout)

    def resume(self, timeout: float | None = None) -> None:
        self._request(calls.resume(), timeout)

    def snapshot(self, name: str = "", mode: str = "full", timeout: float | None = None) -> dict:
        """Save the sandbox (`full`: memory and disks, `filesystem`: disks); `from_snapshot` and
        `matchlock run --from-snapshot` restore it. Returns the snapshot record (name, mode, size, ...)."""
        return self._request(calls.snapshot(name, mode), timeout)

    def snapshot_list(self, timeout: float | None = None) -> list[dict]:
        """The complete snapshots (records as `snapshot()` returns); works before `create`."""
        return self._request(calls.snapshot_list(), timeout)

    def snapshot_remove(self, *names: str, timeout: float | None = None) -> list[str]:
        """Remove snapshots (all names are checked first); clones restored from them keep running."""
        return self._request(calls.snapshot_remove(names), timeout)

    def fork(self, count: int = 1, *, timeout: float | None = CREATE_TIMEOUT) -> list[Client]:
        """`count` new clients, each owning a clone of this running sandbox, which keeps running.

        The clones come from a temporary full snapshot (removed once they are up), created in parallel
        with this client's create options and secrets (`calls.fork_plan`). If any clone fails, the ones
        made are closed and removed and the error is raised. Close and remove each clone when done.
        """
        name, opts = calls.fork_plan(self._create_opts, count)
        self.snapshot(name, mode="full", timeout=timeout)
        try:
            with ThreadPoolExecutor(count, thread_name_prefix="matchlock-fork") as pool:
                outcomes = list(pool.map(lambda _: self._clone(opts, timeout), range(count)))
        finally:
            with contextlib.suppress(MatchlockError, TimeoutError):
                self.snapshot_remove(name, timeout=timeout)
        clones, failure = split_forks(outcomes)
        if failure is not None:
            for clone in clones:
                clone._discard()
            raise failure
        return clones

    def _clone(self, opts: CreateOptions, timeout: float | None) -> Client | Exception:
        clone = Client(self._config)
        try:
            clone.start()
            clone.create(opts, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported by fork() once every clone has settled
            clone._discard()
            return exc
        clone._adopt_vfs_hooks(self)
        return clone

    def _discard(self) -> None:
        """Close and remove, quietly: cleaning up after a failure that is being reported already."""
        self.close()
        with contextlib.suppress(MatchlockError, OSError, subprocess.CalledProcessError):
            self.remove()

    # --- exec ------------------------------------------------------------------------------

    def exec(self, command: str, working_dir: str = "", timeout: float | None = None) -> ExecResult:
        """Run `sh -c command` to completion; on timeout the command is cancelled and TimeoutError raised."""
        return self._request(calls.exec_command(command, working_dir), timeout)

    def exec_stream(
        self,
        command: str,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        working_dir: str = "",
        timeout: float | None = None,
    ) -> ExecStreamResult:
        """Run a command, writing its output to the writers as it arrives."""
        return self._request(calls.exec_stream(command, working_dir, stdout, stderr), timeout)

    def exec_pipe(
        self,
        command: str,
        stdin: Reader | None = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        working_dir: str = "",
        timeout: float | None = None,
        user: str = "",
    ) -> ExecPipeResult:
        """Run a command with stdin forwarded (no terminal); user is `uid`, `uid:gid` or a name."""
        ready = threading.Event()
        call, route = calls.exec_pipe(command, working_dir, user, stdout, stderr, ready.set)
        return self._run_with_input(call, route, ready, stdin, None, timeout)

    def exec_interactive(
        self,
        command: str,
        stdin: Reader | None = None,
        stdout: IO[str] | None = None,
        working_dir: str = "",
        rows: int = 24,
        cols: int = 80,
        resize: Iterable[tuple[int, int]] | None = None,
        timeout: float | None = None,
        user: str = "",
    ) -> ExecInteractiveResult:
        """Run a command in a pseudo-terminal; `resize` yields (rows, cols) changes."""
        ready = threading.Event()
        call, route = calls.exec_tty(command, working_dir, user, rows, cols, stdout, ready.set)
        return self._run_with_input(call, route, ready, stdin, resize, timeout)

    def _run_with_input(
        self,
        call: Call[R],
        route: InputRoute,
        ready: threading.Event,
        stdin: Reader | None,
        resize: Iterable[tuple[int, int]] | None,
        timeout: float | None,
    ) -> R:
        """exec_pipe / exec_tty: input is pumped once the server says `<method>.ready`."""
        done = threading.Event()
        pumps = [threading.Thread(target=self._pump_stdin, args=(route, stdin, ready, done), daemon=True)]
        if resize is not None:
            pumps.append(threading.Thread(target=self._pump_resize, args=(route, resize, ready, done), daemon=True))
        for pump in pumps:
            pump.start()
        try:
            return self._request(call, timeout)
        finally:
            done.set()
            ready.set()  # wakes pumps that never saw ready
            for pump in pumps:
                pump.join(timeout=0.2)

    def _pump_stdin(
        self, route: InputRoute, stdin: Reader | None, ready: threading.Event, done: threading.Event
    ) -> None:
        ready.wait()
        target = route.target
        if target is None or done.is_set():
            return
        while stdin is not None and not done.is_set():
            try:
                chunk = stdin.read(4096)
            except (OSError, ValueError):
                break
            if chunk is None:  # a non-blocking reader with nothing yet
                done.wait(0.01)
                continue
            data = as_bytes(chunk)
            if not data:
                break
            self._notify(*route.stdin(target, data))
        if not done.is_set():
            self._notify(*route.stdin_eof(target))

    def _pump_resize(
        self, route: InputRoute, resize: Iterable[tuple[int, int]], ready: threading.Event, done: threading.Event
    ) -> None:
        ready.wait()
        target = route.target
        if target is None:
            return
        for size in resize:
            if done.is_set():
                return
            message = route.resize(target, size)
            if message is not None:
                self._notify(*message)

    # --- files and log ---------------------------------------------------------------------

    def write_file(self, path: str, content: bytes | str, mode: int = 0o644, timeout: float | None = None) -> None:
        self._request(self._write_file_call(path, content, mode), timeout)

    def read_file(self, path: str, timeout: float | None = None) -> bytes:
        return self._request(self._read_file_call(path), timeout)

    def list_files(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        return self._request(self._list_files_call(path), timeout)

    def log(self, timeout: float | None = None) -> str:
        """The VM's log so far (console and entrypoint output)."""
        return self._request(calls.log(), timeout)

    def log_stream(self, stdout: IO[str] | None = None, timeout: float | None = None) -> None:
        """Follow the VM log into `stdout` until the timeout (then TimeoutError) or the server ends it."""
        self._request(calls.log_stream(stdout), timeout)
