"""Attach the local terminal (or pipes) to a command in a sandbox.

Three modes, as in `docker run`: plain (stdout and stderr forwarded
separately, stdin closed), pipe (`-i`: stdin forwarded, EOF propagated) and
pty (`-it`: raw local terminal, one merged output stream, window size
changes forwarded). Output is also appended to the sandbox's vm.log so
`matchlock log` shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading

from ..sandbox.process import GuestProcess
from ..sandbox.sandbox import ExecSpec, Sandbox
from .tty import OutputSink, raw_terminal, terminal_size

READ_CHUNK = 64 * 1024


def start_stdin_reader(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Read stdin on a daemon thread: works for ttys, pipes and regular files
    alike, never flips the shared terminal to non-blocking, and cannot keep
    the process alive at exit."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=16)

    def reader() -> None:
        while True:
            try:
                data = os.read(sys.stdin.fileno(), READ_CHUNK)
            except OSError:
                data = b""
            future = asyncio.run_coroutine_threadsafe(queue.put(data), loop)
            try:
                future.result()
            except Exception:  # noqa: BLE001 - loop closed: nothing left to feed
                return
            if not data:
                return

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    return queue


async def forward_stdin(process: GuestProcess, queue: asyncio.Queue) -> None:
    while data := await queue.get():
        await process.write(data)
    process.close_stdin()


async def attach(sandbox: Sandbox, spec: ExecSpec, *, interactive: bool, pty: bool, handle_signals: bool = True) -> int:
    loop = asyncio.get_running_loop()
    with open(sandbox.console_log, "ab", buffering=0) as log:
        stdout = OutputSink(sys.stdout.fileno(), log)
        stderr = OutputSink(sys.stderr.fileno(), log)
        if pty:
            process = sandbox.start_exec(spec, on_stdout=stdout, stdin=True, tty=terminal_size())
        else:
            process = sandbox.start_exec(spec, on_stdout=stdout, on_stderr=stderr, stdin=interactive)
        feeder = asyncio.create_task(forward_stdin(process, start_stdin_reader(loop))) if interactive else None
        interrupts = 0

        def interrupt() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1:
                process.cancel()  # SIGTERM in the guest, SIGKILL after 5 s
            else:
                main.cancel()

        main = asyncio.current_task()
        assert main is not None
        handled = ([signal.SIGINT, signal.SIGTERM] + ([] if pty else [signal.SIGHUP])) if handle_signals else []
        for signum in handled:
            loop.add_signal_handler(signum, interrupt)
        if pty:
            loop.add_signal_handler(signal.SIGWINCH, lambda: process.resize(**terminal_size().to_wire()))
        try:
            with raw_terminal(sys.stdin.fileno()) if pty else contextlib.nullcontext():
                result = await process.wait()
        finally:
            for signum in handled + ([signal.SIGWINCH] if pty else []):
                loop.remove_signal_handler(signum)
            if feeder is not None:
                feeder.cancel()
    if result.error:
        print(f"Error: {result.error}", file=sys.stderr)
    return result.exit_code
