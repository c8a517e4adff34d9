"""The process that owns a sandbox for `matchlock run`.

It records the sandbox in the state store, serves the exec relay on
`<vmdir>/exec.sock`, runs the command, and closes the sandbox when it is
done (`--rm`), or when SIGINT/SIGTERM arrives (`--rm=false`, `-d`). Whatever
happens, the close runs: the VM stops and every resource is released and
recorded. Every task it starts (relay connections, the command) belongs to
one `TaskGroup`, which is done before the sandbox closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from typing import BinaryIO

from ..api.config import SandboxConfig
from ..api.errors import MatchlockError
from ..sandbox.exec_relay import ExecRelay
from ..sandbox.process import GuestProcess
from ..sandbox.sandbox import ExecSpec, Sandbox
from ..state.store import StateStore
from ..util import trace
from .main import READY_FD_ENV
from .terminal import attach

TIMEOUT_EXIT_CODE = 124


@dataclass(frozen=True)
class RunOptions:
    command: str | None
    workdir: str
    interactive: bool
    pty: bool
    remove: bool
    detached: bool
    graceful_shutdown: float
    timeout: float | None
    publish: tuple = ()  # sandbox.portforward.ForwardSpec
    addresses: tuple = ()
    from_snapshot: str = ""  # restore this snapshot (sandbox/snapshots.py) instead of booting the image


def _print_hints(vm_id: str) -> None:
    print(f"Sandbox {vm_id} is running", file=sys.stderr)
    print(f"  Connect: matchlock exec {vm_id} -it sh", file=sys.stderr)
    print(f"  Stop:    matchlock kill {vm_id}", file=sys.stderr)
    sys.stderr.flush()


class ReadyPipe:
    """The pipe a detached owner announces its VM ID on (`run -d`, `fork`), watched until then.

    If whoever waits on it dies first (SIGKILL, Ctrl-C), no one will ever learn the VM ID: the start is
    cancelled at once, so the sandbox is closed and removed instead of booting for nobody. The write
    end of a pipe polls as an error once the read end is gone.
    """

    def __init__(self) -> None:
        self.fd = int(os.environ.pop(READY_FD_ENV))
        self.abandoned = False
        self._watched = False

    def watch(self, task: asyncio.Task) -> None:
        def reader_gone() -> None:
            self._unwatch()
            self.abandoned = True
            task.cancel()

        asyncio.get_running_loop().add_reader(self.fd, reader_gone)
        self._watched = True

    def _unwatch(self) -> None:
        if self._watched:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._watched = False

    def announce(self, vm_id: str, console_log) -> None:
        """Tell the parent we are up, then stop writing to its pipes (stderr goes to the console log)."""
        self._unwatch()
        try:
            os.write(self.fd, f"{vm_id}\n".encode())
        finally:
            os.close(self.fd)
        log = os.open(console_log, os.O_WRONLY | os.O_APPEND)
        os.dup2(log, 2)
        os.close(log)

    def close(self) -> None:
        self._unwatch()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _return_freed_memory() -> None:
    """Give glibc's free heap pages back to the system once the sandbox is up.

    The start (imports, the restore, the CA) frees memory that glibc keeps for reuse; an owner then
    idles for the sandbox's life. Trimming it measured about 1 MiB of a `run -d` owner's 27 MiB PSS
    (benchmarks/bench_density.py). musl and others have no malloc_trim: nothing to give back there.
    """
    import ctypes  # only a detached owner: a foreground `run` would start its command later for it

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class CommandNotStarted(MatchlockError):
    """The guest could not start a detached command (unknown user, missing working directory)."""

    exit_code = 127  # what a shell, and `run` in the foreground, exit with


async def _start_in_background(sandbox: Sandbox, spec: ExecSpec, tasks: asyncio.TaskGroup) -> asyncio.Task[None]:
    """A detached command: no stdin, output appended to vm.log, and so is how it ended.

    It reports to no one, so one that cannot start (unknown user, missing
    directory) fails the run here with the guest's reason, before the VM ID
    is announced.
    """
    log = open(sandbox.paths.console_log, "ab", buffering=0)

    def append(data: bytes) -> None:
        log.write(data)

    try:
        process = sandbox.start_exec(spec, on_stdout=append, on_stderr=append)
        if not await process.started():
            raise CommandNotStarted(f"the command could not start: {(await process.wait()).error}")
    except BaseException:
        log.close()
        raise
    return tasks.create_task(_run_in_background(process, log))


async def _run_in_background(process: GuestProcess, log: BinaryIO) -> None:
    with log:
        try:
            result = await process.wait()
        except MatchlockError as exc:
            log.write(f"[matchlock] command failed: {exc}\n".encode())
            return
        log.write(f"[matchlock] command exited with code {result.exit_code}\n".encode())


ABANDONED_EXIT_CODE = 1


async def own_sandbox(config: SandboxConfig, options: RunOptions) -> int:
    ready = ReadyPipe() if options.detached else None
    store = StateStore()
    trace.mark("owner: state store open")
    try:
        if ready is not None:
            task = asyncio.current_task()
            assert task is not None
            ready.watch(task)
        return await _own(store, config, options, ready)
    except asyncio.CancelledError:
        if ready is None or not ready.abandoned:
            raise
        return ABANDONED_EXIT_CODE  # the sandbox is closed and removed; there is no one left to tell
    except BaseExceptionGroup as group:
        raise _sole_error(group) from None
    finally:
        if ready is not None:
            ready.close()
        store.close()


def _sole_error(group: BaseExceptionGroup) -> BaseException:
    """The owner's task groups fail with one error (relay connections never raise): report it as itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def _own(store: StateStore, config: SandboxConfig, options: RunOptions, ready: ReadyPipe | None) -> int:
    # --timeout covers the whole run, boot included.
    deadline = asyncio.get_running_loop().time() + options.timeout if options.timeout else None
    restore = None
    if options.from_snapshot:
        from ..sandbox.snapshots import Restore

        restore = Restore.load(store, options.from_snapshot)
        config = restore.prepare(config)
    async with asyncio.timeout_at(deadline):
        # Until QEMU has the snapshot's files open, `snapshot rm` of it is refused (they are not half-read).
        with restore.reading() if restore is not None else contextlib.nullcontext():
            sandbox = await Sandbox.create(config, store=store, restore=restore)
    trace.mark("owner: sandbox ready")
    died: list[str] = []  # why the VM died under us, if it did
    announced: list[str] = []  # the user has been told the VM ID
    try:
        # Every task of the run (relay connections, the command, the watcher) belongs to this group.
        async with asyncio.TaskGroup() as tasks:
            relay = ExecRelay(sandbox, sandbox.paths.exec_socket, tasks)
            sandbox.tracker.resources(exec_socket=str(relay.path))
            try:
                await relay.start()
                trace.mark("owner: exec relay serving")
                return await _serve(sandbox, options, tasks, deadline, died, announced, ready)
            finally:
                await relay.aclose()
    finally:
        # A start that failed before the user saw the VM ID leaves no record they cannot name.
        trace.mark("owner: command done")
        await sandbox.aclose(
            graceful_timeout=0 if died else options.graceful_shutdown,
            remove=options.remove or not announced,
            crashed="".join(died),
        )
        trace.mark("owner: sandbox closed")


async def _watch(sandbox: Sandbox, stop: asyncio.Event, died: list[str]) -> None:
    """End the run when the VM dies under it (QEMU killed, guest panic, agent gone)."""
    died.append(await sandbox.wait_failure())
    print(f"Error: sandbox {sandbox.id}: {died[0]}", file=sys.stderr, flush=True)
    stop.set()


async def _serve(
    sandbox: Sandbox,
    options: RunOptions,
    tasks: asyncio.TaskGroup,
    deadline: float | None,
    died: list[str],
    announced: list[str],
    ready: ReadyPipe | None,
) -> int:
    """Forward ports and run the command; with --rm=false, keep serving until SIGINT/SIGTERM/SIGHUP,
    the --timeout, or the death of the VM."""
    forwarder = None
    background: asyncio.Task[None] | None = None
    attached: asyncio.Task[int] | None = None
    watcher: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    try:
        if options.publish:
            forwarder = await sandbox.port_forward(options.publish, options.addresses)
            for binding in forwarder.bindings:
                print(f"Forwarding {binding.address}:{binding.local_port} -> sandbox:{binding.remote_port}",
                      file=sys.stderr, flush=True)  # fmt: skip
        spec = ExecSpec(options.command or "", working_dir=options.workdir)
        if options.remove:
            announced.append(sandbox.id)  # removed whatever happens
            async with asyncio.timeout_at(deadline):
                return await attach(sandbox, spec, interactive=options.interactive, pty=options.pty)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signalled: list[int] = []

        def on_signal(signum: int) -> None:
            signalled.append(signum)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, on_signal, signum)
        watcher = tasks.create_task(_watch(sandbox, stop, died))
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            print(f"[matchlock] --timeout reached: stopping sandbox {sandbox.id}", file=sys.stderr, flush=True)
            stop.set()

        timer = loop.call_at(deadline, time_out) if deadline is not None else None
        if ready is not None:
            if options.command:
                background = await _start_in_background(sandbox, spec, tasks)
            ready.announce(sandbox.id, sandbox.paths.console_log)
            announced.append(sandbox.id)
            _return_freed_memory()  # from here on a detached owner mostly waits
        else:
            _print_hints(sandbox.id)
            announced.append(sandbox.id)
            if options.command:
                attached = tasks.create_task(
                    attach(sandbox, spec, interactive=options.interactive, pty=options.pty, handle_signals=False)
                )
        await stop.wait()
        if died:
            return 1
        if timed_out:
            return TIMEOUT_EXIT_CODE
        finished = attached is not None and attached.done()
        if signalled and (signalled[0] != signal.SIGTERM or (attached is not None and not finished)):
            # Ctrl-C or a hang-up, or a signal that cut the command short: 128 + the signal, as with --rm.
            # SIGTERM after the command finished is `matchlock kill`'s stop: that is no failure.
            return 128 + signalled[0]
        return attached.result() if attached is not None and finished else 0
    finally:
        if timer is not None:
            timer.cancel()
        for task in (background, attached, watcher):
            if task is not None:
                task.cancel()  # the group awaits it
        if forwarder is not None:
            await forwarder.aclose()
