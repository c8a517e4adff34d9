"""The process that owns a sandbox for `matchlock run`.

It records the sandbox in the state store, serves the exec relay on
`<vmdir>/exec.sock`, runs the command, and closes the sandbox when it is
done (`--rm`), or when SIGINT/SIGTERM arrives (`--rm=false`, `-d`). Whatever
happens, the close runs: the VM stops and every resource is released and
recorded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass

from ..api.config import SandboxConfig
from ..sandbox.relay import ExecRelay
from ..sandbox.sandbox import ExecSpec, Sandbox
from ..state.store import StateStore
from .terminal import attach

READY_FD_ENV = "MATCHLOCK_READY_FD"


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


def _print_hints(vm_id: str) -> None:
    print(f"Sandbox {vm_id} is running", file=sys.stderr)
    print(f"  Connect: matchlock exec {vm_id} -it sh", file=sys.stderr)
    print(f"  Stop:    matchlock kill {vm_id}", file=sys.stderr)
    sys.stderr.flush()


def _signal_ready(vm_id: str, console_log) -> None:
    """Tell the `run -d` parent we are up, then stop writing to its pipe."""
    fd = int(os.environ.pop(READY_FD_ENV))
    os.write(fd, f"{vm_id}\n".encode())
    os.close(fd)
    log = os.open(console_log, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 2)
    os.close(log)


async def _run_in_background(sandbox: Sandbox, command: str, workdir: str) -> None:
    """A detached command: no stdin, output appended to vm.log."""
    with open(sandbox.console_log, "ab", buffering=0) as log:
        process = sandbox.start_exec(ExecSpec(command, working_dir=workdir), on_stdout=log.write, on_stderr=log.write)
        result = await process.wait()
        log.write(f"[matchlock] command exited with code {result.exit_code}\n".encode())


async def own_sandbox(config: SandboxConfig, options: RunOptions) -> int:
    store = StateStore()
    try:
        return await _own(store, config, options)
    finally:
        store.close()


async def _own(store: StateStore, config: SandboxConfig, options: RunOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    code = 0
    # --timeout covers the whole run, boot included.
    deadline = loop.time() + options.timeout if options.timeout else None
    async with asyncio.timeout_at(deadline):
        sandbox = await Sandbox.create(config, store=store)
    try:
        relay = ExecRelay(sandbox, sandbox.directory / "exec.sock")
        sandbox.tracker.resources(exec_socket=str(relay.path))
        await relay.start()
        forwarder = None
        try:
            if options.publish:
                forwarder = await sandbox.port_forward(options.publish, options.addresses)
                for binding in forwarder.bindings:
                    print(f"Forwarding {binding.address}:{binding.local_port} -> sandbox:{binding.remote_port}",
                          file=sys.stderr, flush=True)  # fmt: skip
            if options.remove:
                async with asyncio.timeout_at(deadline):
                    return await attach(
                        sandbox, ExecSpec(options.command or "", working_dir=options.workdir),
                        interactive=options.interactive, pty=options.pty,
                    )  # fmt: skip
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(signum, stop.set)
            background = None
            if options.detached:
                if options.command:
                    background = asyncio.create_task(_run_in_background(sandbox, options.command, options.workdir))
                _signal_ready(sandbox.id, sandbox.console_log)
            else:
                _print_hints(sandbox.id)
                if options.command:
                    attached = asyncio.create_task(
                        attach(sandbox, ExecSpec(options.command, working_dir=options.workdir),
                               interactive=options.interactive, pty=options.pty, handle_signals=False)
                    )  # fmt: skip
                    done, _ = await asyncio.wait({attached, asyncio.create_task(stop.wait())},
                                                 return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                    if attached in done:
                        code = attached.result()
                    else:
                        attached.cancel()
            await stop.wait()
            if background is not None:
                background.cancel()
            return code
        finally:
            if forwarder is not None:
                await forwarder.close()
            await relay.stop()
    finally:
        await sandbox.close(graceful_timeout=options.graceful_shutdown, remove=options.remove)
