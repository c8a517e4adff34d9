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

from ..api.errors import MatchlockError
from ..sandbox.process import ExecResult, GuestProcess
from ..sandbox.sandbox import ExecSpec, Sandbox
from .tty import BROKEN_PIPE_EXIT, OutputSink, raw_terminal, terminal_size

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
    try:
        while data := await queue.get():
            await process.write(data)
    except MatchlockError:
        return  # the command stopped taking input, or the channel broke: its result says which
    process.close_stdin()


async def wait_forwarding(process: GuestProcess, stdin: asyncio.Queue | None) -> ExecResult:
    """The command's result; until it exits, `stdin` (if any) is forwarded to it."""
    if stdin is None:
        return await process.wait()
    try:
        async with asyncio.TaskGroup() as tasks:
            feeder = tasks.create_task(forward_stdin(process, stdin))
            try:
                return await process.wait()
            finally:
                feeder.cancel()  # the command has exited: nobody reads its input any more
    except* MatchlockError as group:
        raise group.exceptions[0] from None  # from process.wait(): the feeder keeps its own


async def attach(sandbox: Sandbox, spec: ExecSpec, *, interactive: bool, pty: bool, handle_signals: bool = True) -> int:
    """Run `spec` with the local stdio attached; returns its exit code.

    The first SIGINT/SIGTERM cancels the command and the exit code is then
    128 + the signal (130 for Ctrl-C), a second one stops waiting. A reader
    that goes away (`| head`) also cancels it, with the shell's 141.
    """
    loop = asyncio.get_running_loop()
    ended_by: list[int] = []  # the exit code the user caused, if they did

    def reader_gone(exc: OSError) -> None:
        if not ended_by:
            if not isinstance(exc, BrokenPipeError):  # a full disk, say: a shell's tools say so and exit 1
                print(f"Error: cannot write the command's output: {exc.strerror}", file=sys.stderr)
            ended_by.append(BROKEN_PIPE_EXIT if isinstance(exc, BrokenPipeError) else 1)
            process.cancel()  # nobody reads the output any more: stop producing it

    with open(sandbox.console_log, "ab", buffering=0) as log:
        stdout = OutputSink(sys.stdout.fileno(), log, on_broken=reader_gone)
        stderr = OutputSink(sys.stderr.fileno(), log)
        if pty:
            process = sandbox.start_exec(spec, on_stdout=stdout, stdin=True, tty=terminal_size())
        else:
            process = sandbox.start_exec(spec, on_stdout=stdout, on_stderr=stderr, stdin=interactive)
        interrupts = 0
        main = asyncio.current_task()
        assert main is not None

        def interrupt(signum: int) -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1:
                if not ended_by:
                    ended_by.append(128 + signum)
                process.cancel()  # SIGTERM in the guest, SIGKILL after 5 s
            else:
                main.cancel()

        handled = ([signal.SIGINT, signal.SIGTERM] + ([] if pty else [signal.SIGHUP])) if handle_signals else []
        for signum in handled:
            loop.add_signal_handler(signum, interrupt, signum)
        if pty:
            loop.add_signal_handler(signal.SIGWINCH, lambda: process.resize(**terminal_size().to_wire()))
        try:
            with raw_terminal(sys.stdin.fileno()) if pty else contextlib.nullcontext():
                result = await wait_forwarding(process, start_stdin_reader(loop) if interactive else None)
        finally:
            for signum in handled + ([signal.SIGWINCH] if pty else []):
                loop.remove_signal_handler(signum)
    if ended_by:
        return ended_by[0]  # the command's own end (SIGTERM from the cancel) is no news to the user
    if result.error:
        print(f"Error: {result.error}", file=sys.stderr)
    return result.exit_code
