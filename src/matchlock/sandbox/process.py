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

from ..api.errors import ExecError, GuestProtocolError
from ..vm.channel import GuestStream
from ..wire import agent as msgs
from ..wire.mux import STDERR, STDIN, STDOUT, ChannelEnded, DataReceived, MessageReceived, StreamClosed, StreamReset

OutputCallback = Callable[[bytes], Awaitable[None] | None]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    duration_ms: int
    stdout: bytes = b""
    stderr: bytes = b""
    error: str | None = None  # why the command could not start (exit code 127)


class GuestProcess:
    def __init__(self, stream: GuestStream, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None):
        self.stream = stream
        self._callbacks = {STDOUT: on_stdout, STDERR: on_stderr}
        self.pid: int | None = None
        self._started = time.monotonic()
        self._result: ExecResult | None = None
        self._cancelled = False

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

    async def wait(self) -> ExecResult:
        if self._result is not None:
            return self._result
        exit_reply: dict | None = None
        try:
            while True:
                event = await self.stream.next_event()
                if isinstance(event, DataReceived):
                    await self._deliver(event)
                elif isinstance(event, MessageReceived):
                    exit_reply = self._on_message(event.message, exit_reply)
                elif isinstance(event, ChannelEnded):
                    continue
                elif isinstance(event, StreamReset):
                    raise ExecError(f"the guest aborted the command: {event.reason}")
                elif isinstance(event, StreamClosed):
                    if exit_reply is None:
                        raise GuestProtocolError("the guest ended an exec stream without an exit status")
                    break
        finally:
            self.stream.close()
        code, _ = msgs.parse_exit(exit_reply)
        error = exit_reply.get("error")
        self._result = ExecResult(
            exit_code=code,
            duration_ms=int((time.monotonic() - self._started) * 1000),
            error=str(error)[:4096] if error is not None else None,
        )
        return self._result

    async def _deliver(self, event: DataReceived) -> None:
        if event.channel == STDIN:
            raise GuestProtocolError("the guest sent data on the stdin channel")
        callback = self._callbacks[event.channel]
        if callback is not None:
            result = callback(event.data)
            if inspect.isawaitable(result):
                await self.stream.guard(result)
        self.stream.consumed(len(event.data))

    def _on_message(self, message: dict, exit_reply: dict | None) -> dict | None:
        kind = message.get("type")
        if exit_reply is not None:
            raise GuestProtocolError(f"the guest sent {str(kind)[:40]!r} after the exit status")
        if kind == msgs.REPLY_STARTED:
            pid = message.get("pid")
            self.pid = pid if isinstance(pid, int) else None
            return None
        if kind == msgs.REPLY_EXIT:
            try:
                msgs.parse_exit(message)
            except ValueError as exc:
                raise GuestProtocolError(f"malformed exit status from the guest: {exc}") from None
            return message
        if kind == msgs.REPLY_ERROR:
            raise ExecError(str(message.get("message", "exec failed"))[:4096])
        raise GuestProtocolError(f"unexpected exec reply {str(kind)[:40]!r} from the guest")
