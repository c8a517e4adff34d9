"""Per-stream handlers of the guest agent: exec and file operations.

Each handler reacts to events for its stream and uses the agent's small
reactor (`watch_read`, `watch_write`, `call_later`) for its file
descriptors. Output is read from a command only while the host has granted
window on the stream, so a host that stops reading stalls that one command
(its pipe fills and it blocks), never the agent or other streams.
"""

from __future__ import annotations

import _signal
import _socket
import errno
import os
import stat

from ..wire import agent as msgs
from ..wire.mux import DATA_CHUNK, STDERR, STDIN, STDOUT
from ..wire.replies import Exited, OpError, Result, Started
from . import timing
from .process import Spawned, set_window_size, spawn, take_child_stamps

_ERROR_PIPE_LIMIT = 8192


class StreamHandler:
    def __init__(self, agent, stream: int) -> None:
        self.agent = agent
        self.stream = stream
        self.done = False
        self.sink = None  # set when the host of this stream is gone (a restored clone): output is dropped

    @property
    def conn(self):
        return self.sink if self.sink is not None else self.agent.conn

    def on_data(self, channel: int, data: bytes) -> None:
        self.conn.consumed(self.stream, len(data))

    def on_eof(self, channel: int) -> None:
        pass

    def on_message(self, message: dict) -> None:
        pass

    def on_window(self) -> None:
        pass

    def on_reset(self, reason: str) -> None:
        self.done = True

    def finish(self, reply: Exited | Result | OpError) -> None:
        """Send the stream's last reply and close it."""
        if not self.done:
            self.done = True
            self.conn.send_message(self.stream, reply.to_wire())
            self.conn.close_stream(self.stream)

    def fail(self, message: str, err: int | None = None) -> None:
        self.finish(OpError(message, err))


class ExecHandler(StreamHandler):
    def __init__(self, agent, stream: int, request: msgs.ExecRequest) -> None:
        super().__init__(agent, stream)
        self.request = request
        timing.stamp("exec request")
        self.proc: Spawned = spawn(request, privileged=agent.privileged, hidden_devices=agent.hidden_devices)
        self.exit_code: int | None = None
        self.error = b""
        self.stdin_buffer = bytearray()
        self.stdin_eof = False
        self.open_outputs: dict[int, int] = {STDOUT: self.proc.stdout}
        if self.proc.stderr is not None:
            self.open_outputs[STDERR] = self.proc.stderr
        timing.stamp("exec forked")
        self.kill_timer = None
        self.started = False  # `started` waits for the exec itself: the user and directory are settled then
        agent.processes[self.proc.pid] = self
        agent.watch_read(self.proc.error_pipe, self._read_error)

    # --- output -------------------------------------------------------------

    def _watch_outputs(self) -> None:
        if not self.started:
            return
        can_send = self.conn.send_window(self.stream) > 0
        for channel, fd in self.open_outputs.items():
            if can_send:
                self.agent.watch_read(fd, lambda ch=channel: self._read_output(ch))
            else:
                self.agent.unwatch_read(fd)

    def _read_output(self, channel: int) -> None:
        fd = self.open_outputs[channel]
        window = self.conn.send_window(self.stream)
        try:
            data = os.read(fd, min(window, DATA_CHUNK)) if window else None
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's last slave closed
                raise
            data = b""
        if data is None:
            self._watch_outputs()
            return
        if not data:
            self._close_output(channel)
            return
        if not self.done:
            self.conn.send_data(self.stream, channel, data)
        if self.conn.send_window(self.stream) == 0:
            self._watch_outputs()

    def _close_output(self, channel: int) -> None:
        fd = self.open_outputs.pop(channel)
        self.agent.unwatch_read(fd)
        if fd != self.proc.stdin:
            os.close(fd)
        self._maybe_finish()

    def _read_error(self) -> None:
        data = os.read(self.proc.error_pipe, 4096)
        if data and len(self.error) < _ERROR_PIPE_LIMIT:
            self.error += data
            return
        if not data:  # the pipe closes on exec (close-on-exec), or with the child that failed to get there
            timing.add(take_child_stamps(self.proc))
            self.agent.unwatch_read(self.proc.error_pipe)
            os.close(self.proc.error_pipe)
            self.proc.error_pipe = -1
            if not self.error:
                timing.stamp("exec started")
                self.started = True
                self.conn.send_message(self.stream, Started(self.proc.pid).to_wire())
                self._watch_outputs()
            else:  # the command never ran: its outputs have nothing to say
                for channel in list(self.open_outputs):
                    self._close_output(channel)
            self._maybe_finish()

    def on_window(self) -> None:
        self._watch_outputs()

    # --- input and control --------------------------------------------------

    def on_data(self, channel: int, data: bytes) -> None:
        if channel != STDIN or self.proc.stdin is None or self.stdin_eof or self.done:
            self.conn.consumed(self.stream, len(data))
            return
        self.stdin_buffer += data
        self.agent.watch_write(self.proc.stdin, self._write_stdin)

    def on_eof(self, channel: int) -> None:
        if channel == STDIN:
            self.stdin_eof = True
            if self.proc.stdin is not None:
                self.agent.watch_write(self.proc.stdin, self._write_stdin)

    def _write_stdin(self) -> None:
        fd = self.proc.stdin
        assert fd is not None  # watched only while stdin is open
        try:
            written = os.write(fd, self.stdin_buffer[:DATA_CHUNK]) if self.stdin_buffer else 0
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the command closed its stdin
            written = len(self.stdin_buffer)
            self.stdin_eof = True
        del self.stdin_buffer[:written]
        self.conn.consumed(self.stream, written)
        if self.stdin_buffer:
            return
        self.agent.unwatch_write(fd)
        if self.stdin_eof:
            if self.proc.pty:
                # A terminal has no half-close: send the EOF character (^D).
                try:
                    os.write(fd, b"\x04")
                except OSError:
                    pass
            else:
                os.close(fd)
                self.proc.stdin = None

    def on_message(self, message: dict) -> None:
        kind = message.get("type")
        if kind == msgs.CTL_RESIZE and self.proc.pty:
            set_window_size(self.proc.stdout, msgs.TerminalSize.parse(message))
        elif kind == msgs.CTL_SIGNAL:
            signum = message.get("signal")
            if isinstance(signum, int) and 1 <= signum <= 64:
                self.proc.signal(signum)
        elif kind == msgs.CTL_CANCEL:
            self.cancel()

    def on_reset(self, reason: str) -> None:
        super().on_reset(reason)
        self.cancel()

    def cancel(self) -> None:
        """SIGTERM to the command's group now, SIGKILL to everything after the grace period."""
        if self.exit_code is not None or self.kill_timer is not None:
            return
        self.proc.signal(_signal.SIGTERM)
        self.kill_timer = self.agent.call_later(msgs.CANCEL_GRACE_SECONDS, self._kill)

    def _kill(self) -> None:
        self.proc.signal(_signal.SIGKILL)

    # --- completion ---------------------------------------------------------

    def on_exit(self, code: int) -> None:
        timing.stamp("exit reaped")
        self.exit_code = code
        if self.kill_timer is not None:
            self.kill_timer.cancel()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.exit_code is None or self.open_outputs or self.proc.error_pipe != -1:
            return
        if self.proc.stdin is not None:
            self.agent.unwatch_write(self.proc.stdin)
            os.close(self.proc.stdin)
            self.proc.stdin = None
        if self.started:
            stamps = None
            if timing.stamps is not None:  # the first exit status since a HELLO that asked for them
                timing.stamp("exit sent")
                stamps = tuple(timing.take(last=True))
            self.finish(Exited(self.exit_code, None, stamps))
        else:
            self.fail(self.error.decode("utf-8", "replace"))  # the reason the child reported


class PortForwardHandler(StreamHandler):
    """One forwarded connection: a TCP connection to 127.0.0.1:port inside the guest.

    Half-close travels both ways: the host's EOF on stdin becomes
    shutdown(SHUT_WR) here, and the local server's EOF becomes EOF on stdout.
    """

    def __init__(self, agent, stream: int, request: msgs.PortForwardRequest) -> None:
        super().__init__(agent, stream)
        self.port = request.port
        self.sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.pending = bytearray()
        self.host_eof = False
        self.guest_eof = False
        self.connected = False
        err = self.sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            self._abort(f"cannot connect to 127.0.0.1:{self.port} in the sandbox: {os.strerror(err)}")
            return
        agent.watch_write(self.fd, self._connected)

    def _abort(self, message: str) -> None:
        self._close_socket()
        self.fail(message)

    def _connected(self) -> None:
        self.agent.unwatch_write(self.fd)
        err = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if err:
            self._abort(f"cannot connect to 127.0.0.1:{self.port} in the sandbox: {os.strerror(err)}")
            return
        self.connected = True
        self.conn.send_message(self.stream, Started().to_wire())
        self.on_window()
        if self.pending or self.host_eof:
            self.agent.watch_write(self.fd, self._write)

    def on_window(self) -> None:
        if self.connected and not self.guest_eof and not self.done:
            if self.conn.send_window(self.stream) > 0:
                self.agent.watch_read(self.fd, self._read)
            else:
                self.agent.unwatch_read(self.fd)

    def _read(self) -> None:
        window = self.conn.send_window(self.stream)
        if window == 0:
            self.agent.unwatch_read(self.fd)
            return
        try:
            data = self.sock.recv(min(window, DATA_CHUNK))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.conn.send_data(self.stream, STDOUT, data)
            if self.conn.send_window(self.stream) == 0:
                self.agent.unwatch_read(self.fd)
            return
        self.guest_eof = True
        self.agent.unwatch_read(self.fd)
        self.conn.end_channel(self.stream, STDOUT)
        self._maybe_finish()

    def on_data(self, channel: int, data: bytes) -> None:
        if self.done or channel != STDIN:
            self.conn.consumed(self.stream, len(data))
            return
        self.pending += data
        if self.connected:
            self.agent.watch_write(self.fd, self._write)

    def on_eof(self, channel: int) -> None:
        if channel == STDIN:
            self.host_eof = True
            if self.connected:
                self.agent.watch_write(self.fd, self._write)

    def _write(self) -> None:
        try:
            written = self.sock.send(self.pending[:DATA_CHUNK]) if self.pending else 0
        except BlockingIOError:
            return
        except OSError:
            written, self.pending[:] = len(self.pending), b""
            self.host_eof = True
        del self.pending[:written]
        self.conn.consumed(self.stream, written)
        if self.pending:
            return
        self.agent.unwatch_write(self.fd)
        if self.host_eof:
            try:
                self.sock.shutdown(_socket.SHUT_WR)
            except OSError:
                pass
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.guest_eof and self.host_eof and not self.pending:
            self._close_socket()
            self.finish(Result())

    def on_reset(self, reason: str) -> None:
        super().on_reset(reason)
        self._close_socket()

    def _close_socket(self) -> None:
        if self.fd >= 0:
            self.agent.unwatch_read(self.fd)
            self.agent.unwatch_write(self.fd)
            self.sock.close()
            self.fd = -1


class WriteFileHandler(StreamHandler):
    def __init__(self, agent, stream: int, request: msgs.WriteFileRequest) -> None:
        super().__init__(agent, stream)
        self.mode = request.mode
        self.path = request.path
        parent = os.path.dirname(request.path)
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
            self.fd = os.open(request.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, request.mode)
        except OSError as exc:
            self.fd = -1
            self.fail(f"cannot write {request.path}: {exc.strerror}", exc.errno)

    def on_data(self, channel: int, data: bytes) -> None:
        if self.fd >= 0 and not self.done:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError as exc:
                self._close()
                self.fail(f"cannot write {self.path}: {exc.strerror}", exc.errno)
        super().on_data(channel, data)

    def on_eof(self, channel: int) -> None:
        if self.done:
            return
        try:
            os.fchmod(self.fd, self.mode)
        except OSError as exc:
            self._close()
            self.fail(f"cannot chmod {self.path}: {exc.strerror}", exc.errno)
            return
        self._close()
        self.finish(Result())

    def on_reset(self, reason: str) -> None:
        super().on_reset(reason)
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ReadFileHandler(StreamHandler):
    def __init__(self, agent, stream: int, path: str) -> None:
        super().__init__(agent, stream)
        self.fd = -1
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            info = os.fstat(self.fd)
        except OSError as exc:
            self._close()
            self.fail(f"cannot read {path}: {exc.strerror}", exc.errno)
            return
        if not stat.S_ISREG(info.st_mode):
            self._close()
            self.fail(f"cannot read {path}: not a regular file")
            return
        if info.st_size > msgs.READ_FILE_LIMIT:
            self._close()
            self.fail(
                f"cannot read {path}: the file is {info.st_size} bytes, above the "
                f"{msgs.READ_FILE_LIMIT // (1024 * 1024)} MiB limit of read_file"
            )
            return
        self.remaining = msgs.READ_FILE_LIMIT
        self.expected = info.st_size
        self.on_window()

    def on_window(self) -> None:
        while self.fd >= 0 and not self.done:
            window = self.conn.send_window(self.stream)
            if window == 0:
                return
            wanted = min(window, DATA_CHUNK, self.remaining + 1)
            data = os.read(self.fd, wanted)
            if len(data) > self.remaining:
                self._close()
                self.fail("file grew beyond the read_file limit while it was read")
                return
            if data:
                self.remaining -= len(data)
                self.expected -= len(data)
                self.conn.send_data(self.stream, STDOUT, data)
            # A short read of a file we expected to be done with is its end:
            # skips one read() per file, which matters under emulation.
            if not data or (len(data) < wanted and self.expected <= 0):
                self._close()
                self.finish(Result())
                return

    def on_reset(self, reason: str) -> None:
        super().on_reset(reason)
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def list_files(path: str) -> Result:
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            entries.append(msgs.FileInfo(entry.name, info.st_size, info.st_mode, stat.S_ISDIR(info.st_mode)))
    entries.sort(key=lambda e: e.name)
    return Result(tuple(entries))
