"""A command running in the guest, seen from the host.

`GuestProcess.wait()` pumps the stream: output goes to the callbacks, and
credit goes back to the guest only after a callback returns, so a slow
consumer (a full terminal, a paused RPC client) slows the command down
instead of growing host memory. Every reply from the guest is validated.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..api.errors import ExecError
from ..vm.channel import GuestStream
from ..wire import agent as msgs
from ..wire.mux import STDERR, STDIN, STDOUT, DataReceived, StreamReset
from ..wire.replies import ExecReplies, Exited, OpError, Started

OutputCallback = Callable[[bytes], Awaitable[None] | None]
NOT_STARTED = 127  # the exit code of a command that could not start, as a shell's


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    duration_ms: int
    stdout: bytes = b""
    stderr: bytes = b""
    error: str | None = None  # why the command could not start (exit code NOT_STARTED)


class GuestProcess:
    def __init__(self, stream: GuestStream, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None):
        self.stream = stream
        self._callbacks = {STDOUT: on_stdout, STDERR: on_stderr}
        self.pid: int | None = None
        self._started = time.monotonic()
        self._result: ExecResult | None = None
        self._cancelled = False
        self._replies = ExecReplies()  # the grammar of an exec stream, checked on every event
        self._answered = False  # `started`, or `error` instead: the guest's first answer
        self._not_started: str | None = None  # the guest's reason, when it answered `error` instead of `started`

    async def write(self, data: bytes) -> None:
        await self.stream.send(STDIN, data)

    def close_stdin(self) -> None:
        self.stream.end(STDIN)

    def resize(self, rows: int, cols: int) -> None:
        size = msgs.TerminalSize(rows, cols)  # validated like the guest will
        msgs.TerminalSize.parse(size.to_wire())
        self.stream.message({"type": msgs.CTL_RESIZE, **size.to_wire()})

    def send_signal(self, signum: int) -> None:
        self.stream.message({"type": msgs.CTL_SIGNAL, "signal": int(signum)})

    def cancel(self) -> None:
        """SIGTERM to the command's process group now; the guest sends SIGKILL after 5 s."""
        self._cancelled = True
        self.stream.message({"type": msgs.CTL_CANCEL})

    async def started(self) -> bool:
        """Wait for the guest's first answer: True once the command runs (its user and working directory
        were found), False if it could not start; `wait()` then returns the reason in `error`."""
        while not self._answered:
            await self._next_reply()
        return self._not_started is None

    async def wait(self) -> ExecResult:
        if self._result is not None:
            return self._result
        try:
            while not self._replies.done:
                await self._next_reply()
        finally:
            self.stream.close()
        duration_ms = int((time.monotonic() - self._started) * 1000)
        if self._not_started is not None:
            self._result = ExecResult(NOT_STARTED, duration_ms, error=self._not_started)
            return self._result
        exited = self._replies.final
        assert isinstance(exited, Exited)  # the grammar ends a started exec stream with exit, error or reset
        self._result = ExecResult(exit_code=exited.code, duration_ms=duration_ms)
        return self._result

    async def _next_reply(self) -> None:
        outcome = await self.stream.next_reply(self._replies)
        if isinstance(outcome, DataReceived):
            await self._deliver(outcome)
        elif isinstance(outcome, Started):
            self.pid, self._answered = outcome.pid, True
        elif isinstance(outcome, OpError) and not self._answered:
            self._not_started, self._answered = outcome.message, True
        elif isinstance(outcome, OpError):
            raise ExecError(outcome.message)
        elif isinstance(outcome, StreamReset):
            raise ExecError(f"the guest aborted the command: {outcome.reason}")

    async def _deliver(self, event: DataReceived) -> None:
        callback = self._callbacks[event.channel]
        if callback is not None:
            result = callback(event.data)
            if inspect.isawaitable(result):
                await self.stream.unless_broken(result)
        self.stream.consumed(len(event.data))
