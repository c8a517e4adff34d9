"""`Client`: the thread-based SDK client (the API of the published SDK 0.2.17, plus fixes and allow-list calls).

    with Client() as client:
        client.create(Sandbox("alpine:latest").options())
        print(client.exec("echo hello").stdout)

It runs `matchlock rpc` (or `$MATCHLOCK_BIN rpc`) as a child and speaks JSON-RPC over its stdio. All
methods are thread-safe; requests run concurrently. Differences from the published SDK, all compatible:
`create`, `launch` and `port_forward` take a `timeout` (they waited forever), a bad line from the server
no longer kills the reader, late output notifications are still delivered, a failing output writer
raises from its exec call, and `allow_list_add` / `allow_list_delete` exist.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from ..jsonrpc import Broadcast, Failed, Resolved, Routed
from . import calls
from .builder import Sandbox
from .calls import CREATE_TIMEOUT, PORT_FORWARD_TIMEOUT, Notify
from .errors import MatchlockError, RPCError
from .hooks import LocalVFSHooks, NetworkHookServer, ThreadedAfterHooks, parse_file_event, plan_create
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
    VolumeInfo,
)

Reader = IO[str] | IO[bytes]


class _Call:
    __slots__ = ("done", "result", "error", "on_notification")

    def __init__(self, on_notification: Notify | None) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.on_notification = on_notification


def default_config() -> Config:
    return Config(binary_path=os.environ.get("MATCHLOCK_BIN", "matchlock"))


def server_argv(config: Config) -> list[str]:
    argv = [config.binary_path, "rpc"]
    return ["sudo", *argv] if config.use_sudo else argv


class Client:
    """Client for one sandbox served by a `matchlock rpc` child process."""

    def __init__(self, config: Config | None = None):
        self._config = config if config is not None else default_config()
        self._process: subprocess.Popen[bytes] | None = None
        self._session: Session[_Call] = Session()
        self._write_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closed = False
        self._stdout_closed = False  # set before pending calls are failed, so none can slip in after
        self._vm_id: str | None = None
        self._last_vm_id: str | None = None
        self._create_opts: CreateOptions | None = None  # for fork(); secrets stay in memory only
        self._vfs = LocalVFSHooks()
        self._after_hooks = ThreadedAfterHooks(self._vfs, self)
        self._hook_lock = threading.Lock()
        self._hook_server: NetworkHookServer | None = None

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self.close()

    @property
    def vm_id(self) -> str | None:
        return self._vm_id

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
        if self._closed:
            return
        self._closed = True
        self._last_vm_id = self._vm_id
        self._vfs.set([])
        self._stop_hook_server()
        process = self._process
        if process is None or process.poll() is not None:
            return
        seconds = calls.close_seconds(timeout)
        with contextlib.suppress(MatchlockError, TimeoutError):
            self._request("close", {"timeout_seconds": seconds}, timeout=seconds + 1.0)
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
        vm_id = self._vm_id or self._last_vm_id
        if vm_id:
            self._cli("rm", vm_id)

    def _cli(self, *args: str) -> str:
        completed = subprocess.run([self._config.binary_path, *args], capture_output=True, text=True, check=True)
        return completed.stdout

    def volume_create(self, name: str, size_mb: int = 10240) -> VolumeInfo:
        argv = calls.volume_create_argv(self._config.binary_path, name, size_mb)
        return calls.parse_volume_create(self._cli(*argv[1:]), name, size_mb)

    def volume_list(self) -> list[VolumeInfo]:
        return calls.parse_volume_list(self._cli("volume", "ls", "--json"))

    def volume_remove(self, name: str) -> None:
        self._cli("volume", "rm", calls.volume_name(name))

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
            for event in self._session.feed(data):
                self._dispatch(event)
        self._stdout_closed = True
        lost = MatchlockError("Matchlock process closed unexpectedly")
        for _, call in self._session.eof():
            call.error = lost
            call.done.set()
        self._stop_hook_server()

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, Resolved):
            event.context.result = event.result
            event.context.done.set()
        elif isinstance(event, Failed):
            event.context.error = RPCError(event.code, event.message)
            event.context.done.set()
        elif isinstance(event, Malformed):
            event.context.error = MatchlockError(event.reason)
            event.context.done.set()
        elif isinstance(event, Routed):
            call = event.context
            error = calls.deliver(call.on_notification, event.method, event.params)
            if error is not None and call.error is None and not call.done.is_set():
                call.error = error
        elif isinstance(event, Broadcast) and event.method == "event":
            file_event = parse_file_event(event.params)
            if file_event is not None:
                self._after_hooks.on_event(file_event)

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

    def _request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        on_notification: Notify | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request and wait for its result; on timeout send `cancel` and raise TimeoutError."""
        if self._process is None or self._process.poll() is not None or self._stdout_closed:
            raise MatchlockError("Matchlock process not running")
        call = _Call(on_notification)
        call_id, line = self._session.start(method, params, call)
        if self._stdout_closed:
            self._session.forget(call_id)
            raise MatchlockError("Matchlock process closed unexpectedly")
        try:
            self._write(line)
        except MatchlockError:
            self._session.forget(call_id)
            raise
        if not call.done.wait(timeout):
            self._send_quietly(self._session.abandon(call_id))
            if not call.done.is_set():
                raise TimeoutError(f"request {method} (id={call_id}) timed out after {timeout}s")
        if call.error is not None:
            raise call.error
        return call.result

    def _notify(self, method: str, params: dict[str, Any]) -> None:
        self._send_quietly(self._session.send(method, params))

    # --- hooks -----------------------------------------------------------------------------

    def _stop_hook_server(self) -> None:
        with self._hook_lock:
            server, self._hook_server = self._hook_server, None
        if server is not None:
            server.stop()

    # --- sandbox ---------------------------------------------------------------------------

    def create(self, opts: CreateOptions | None = None, *, timeout: float | None = CREATE_TIMEOUT) -> str:
        """Create and boot the sandbox; returns its id. `timeout=None` waits forever."""
        plan = plan_create(opts)
        self._stop_hook_server()
        self._vfs.set([])
        callback_socket = None
        if plan.callbacks:
            server = NetworkHookServer(plan.callbacks)
            with self._hook_lock:
                self._hook_server = server
            callback_socket = server.socket_path
        try:
            vm_id = calls.parse_create(self._request("create", plan.params(callback_socket), timeout=timeout))
        except BaseException:
            self._stop_hook_server()
            raise
        self._vm_id = vm_id
        self._create_opts = copy.copy(plan.opts)
        self._vfs.set(plan.vfs.local)
        if plan.opts.port_forwards:
            self._port_forward(plan.opts.port_forward_addresses, plan.opts.port_forwards, timeout=PORT_FORWARD_TIMEOUT)
        return vm_id

    def launch(self, sandbox: Sandbox, *, timeout: float | None = CREATE_TIMEOUT) -> str:
        """Create the sandbox and start the image's ENTRYPOINT/CMD in the background."""
        opts = copy.deepcopy(sandbox.options())
        opts.launch_entrypoint = True
        return self.create(opts, timeout=timeout)

    def port_forward(self, *specs: str, timeout: float | None = PORT_FORWARD_TIMEOUT) -> list[PortForwardBinding]:
        """Forward `[LOCAL:]REMOTE` ports on 127.0.0.1; replaces the earlier set."""
        return self.port_forward_with_addresses(None, *specs, timeout=timeout)

    def port_forward_with_addresses(
        self, addresses: list[str] | None, *specs: str, timeout: float | None = PORT_FORWARD_TIMEOUT
    ) -> list[PortForwardBinding]:
        return self._port_forward(addresses, [calls.parse_forward_spec(spec) for spec in specs], timeout=timeout)

    def _port_forward(
        self, addresses: list[str] | None, forwards: list[PortForward], *, timeout: float | None
    ) -> list[PortForwardBinding]:
        if not forwards:
            return []
        result = self._request("port_forward", calls.port_forward_params(addresses, forwards), timeout=timeout)
        return calls.parse_bindings(result)

    def allow_list_add(self, *hosts: str, timeout: float | None = None) -> AllowListUpdate:
        """Allow more hosts on the running sandbox (needs network interception); `changed` = newly added."""
        result = self._request("allow_list_add", calls.allow_list_params(hosts), timeout=timeout)
        return calls.parse_allow_list(result, "allow_list_add", "added")

    def pause(self, timeout: float | None = None) -> None:
        """Stop the sandbox's vCPUs (memory and connections kept); exec fails until `resume()`."""
        self._request("pause", {}, timeout=timeout)

    def resume(self, timeout: float | None = None) -> None:
        self._request("resume", {}, timeout=timeout)

    def snapshot(self, name: str = "", mode: str = "full", timeout: float | None = None) -> dict:
        """Save the sandbox (`full`: memory and disks, `filesystem`: disks); `from_snapshot` and
        `matchlock run --from-snapshot` restore it. Returns the snapshot record (name, mode, size, ...)."""
        return calls.parse_snapshot(self._request("snapshot", calls.snapshot_params(name, mode), timeout=timeout))

    def snapshot_list(self, timeout: float | None = None) -> list[dict]:
        """The complete snapshots (records as `snapshot()` returns); works before `create`."""
        return calls.parse_snapshot_list(self._request("snapshot_list", {}, timeout=timeout))

    def snapshot_remove(self, *names: str, timeout: float | None = None) -> list[str]:
        """Remove snapshots (all names are checked first); clones restored from them keep running."""
        params = calls.snapshot_remove_params(names)
        return calls.parse_removed(self._request("snapshot_remove", params, timeout=timeout))

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
        clones = [outcome for outcome in outcomes if isinstance(outcome, Client)]
        failures = [outcome for outcome in outcomes if not isinstance(outcome, Client)]
        if failures:
            for clone in clones:
                clone._discard()
            raise failures[0]
        return clones

    def _clone(self, opts: CreateOptions, timeout: float | None) -> Client | Exception:
        clone = Client(self._config)
        try:
            clone.start()
            clone.create(opts, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported by fork() once every clone has settled
            clone._discard()
            return exc
        return clone

    def _discard(self) -> None:
        """Close and remove, quietly: cleaning up after a failure that is being reported already."""
        self.close()
        with contextlib.suppress(MatchlockError, OSError, subprocess.CalledProcessError):
            self.remove()

    def allow_list_delete(self, *hosts: str, timeout: float | None = None) -> AllowListUpdate:
        """Remove hosts from the allow-list; an empty list afterwards allows every host."""
        result = self._request("allow_list_delete", calls.allow_list_params(hosts), timeout=timeout)
        return calls.parse_allow_list(result, "allow_list_delete", "removed")

    # --- exec ------------------------------------------------------------------------------

    def exec(self, command: str, working_dir: str = "", timeout: float | None = None) -> ExecResult:
        """Run `sh -c command` to completion; on timeout the command is cancelled and TimeoutError raised."""
        return calls.parse_exec(self._request("exec", calls.exec_params(command, working_dir), timeout=timeout))

    def exec_stream(
        self,
        command: str,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        working_dir: str = "",
        timeout: float | None = None,
    ) -> ExecStreamResult:
        """Run a command, writing its output to the writers as it arrives."""

        on_output = calls.output_writer({"exec_stream.stdout": stdout, "exec_stream.stderr": stderr})
        result = self._request("exec_stream", calls.exec_params(command, working_dir), on_output, timeout)
        return ExecStreamResult(*calls.parse_status(result, "exec_stream"))

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
        writers = {"exec_pipe.stdout": stdout, "exec_pipe.stderr": stderr}
        params = calls.exec_params(command, working_dir, user)
        result = self._run_with_input("exec_pipe", params, stdin, None, writers, timeout)
        return ExecPipeResult(*calls.parse_status(result, "exec_pipe"))

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
        params = calls.tty_params(command, working_dir, user, rows, cols)
        result = self._run_with_input("exec_tty", params, stdin, resize, {"exec_tty.stdout": stdout}, timeout)
        return ExecInteractiveResult(*calls.parse_status(result, "exec_tty"))

    def _run_with_input(
        self,
        method: str,
        params: dict[str, Any],
        stdin: Reader | None,
        resize: Iterable[tuple[int, int]] | None,
        writers: dict[str, IO[str] | None],
        timeout: float | None,
    ) -> Any:
        """exec_pipe / exec_tty: input is pumped once the server says `<method>.ready`."""
        ready, done = threading.Event(), threading.Event()
        target: list[int] = []
        on_notification = calls.input_notifications(method, writers, ready.set, target)

        pumps = [threading.Thread(target=self._pump_stdin, args=(method, stdin, ready, done, target), daemon=True)]
        if resize is not None:
            pumps.append(threading.Thread(target=self._pump_resize, args=(resize, ready, done, target), daemon=True))
        for pump in pumps:
            pump.start()
        try:
            return self._request(method, params, on_notification, timeout)
        finally:
            done.set()
            ready.set()  # wakes pumps that never saw ready
            for pump in pumps:
                pump.join(timeout=0.2)

    def _pump_stdin(
        self, method: str, stdin: Reader | None, ready: threading.Event, done: threading.Event, target: list[int]
    ) -> None:
        ready.wait()
        if not target or done.is_set():
            return
        call_id = target[0]
        while stdin is not None and not done.is_set():
            try:
                chunk = stdin.read(4096)
            except (OSError, ValueError):
                break
            if chunk is None:  # a non-blocking reader with nothing yet
                done.wait(0.01)
                continue
            data = calls.as_bytes(chunk)
            if not data:
                break
            self._notify(f"{method}.stdin", {"id": call_id, "data": calls.encode(data)})
        if not done.is_set():
            self._notify(f"{method}.stdin_eof", {"id": call_id})

    def _pump_resize(
        self, resize: Iterable[tuple[int, int]], ready: threading.Event, done: threading.Event, target: list[int]
    ) -> None:
        ready.wait()
        if not target:
            return
        for size in resize:
            if done.is_set():
                return
            if isinstance(size, tuple | list) and len(size) >= 2:
                self._notify("exec_tty.resize", {"id": target[0], "rows": int(size[0]), "cols": int(size[1])})

    # --- files and log ---------------------------------------------------------------------

    def write_file(self, path: str, content: bytes | str, mode: int = 0o644, timeout: float | None = None) -> None:
        data = calls.as_bytes(content)
        self._vfs.check_action("write", path, len(data), mode)
        data = self._vfs.mutate_write(path, data, mode)
        self._request("write_file", calls.write_file_params(path, data, mode), timeout=timeout)

    def read_file(self, path: str, timeout: float | None = None) -> bytes:
        self._vfs.check_action("read", path, 0, 0)
        return calls.parse_read_file(self._request("read_file", {"path": path}, timeout=timeout))

    def list_files(self, path: str, timeout: float | None = None) -> list[FileInfo]:
        self._vfs.check_action("readdir", path, 0, 0)
        return calls.parse_list_files(self._request("list_files", {"path": path}, timeout=timeout))

    def log(self, timeout: float | None = None) -> str:
        """The VM's log so far (console and entrypoint output)."""
        return calls.parse_log(self._request("log", timeout=timeout))

    def log_stream(self, stdout: IO[str] | None = None, timeout: float | None = None) -> None:
        """Follow the VM log into `stdout` until the timeout (then TimeoutError) or the server ends it."""

        on_data = calls.output_writer({"log_stream.data": stdout})
        self._request("log_stream", on_notification=on_data, timeout=timeout)
