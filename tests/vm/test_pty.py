"""`matchlock run -it` through a real pseudo-terminal pair, as a user's terminal drives it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]
MATCHLOCK = os.path.join(os.path.dirname(sys.executable), "matchlock")


class Terminal:
    def __init__(self, *args: str, rows: int = 30, cols: int = 100, command: tuple[str, ...] = ("run", "-it")) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child becomes `matchlock run -it` on the pty's slave side
            os.execv(MATCHLOCK, [MATCHLOCK, *command, *args])
        self.resize(rows, cols)
        self.output = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def expect(self, needle: bytes, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not seen; terminal shows {self.output[-500:]!r}")
            if select.select([self.fd], [], [], min(remaining, 0.5))[0]:
                try:
                    self.output += os.read(self.fd, 4096)
                except OSError:
                    break
        return self.output

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.output += os.read(self.fd, 4096)
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("matchlock run -it did not exit")


def test_interactive_shell_size_resize_and_exit_code(state_dir):
    term = Terminal("--", "sh")
    term.expect(b"# ")
    term.send(b"stty size; tty\n")
    term.expect(b"30 100")
    term.expect(b"/dev/pts/")
    term.resize(42, 132)  # the kernel sends SIGWINCH to matchlock, which forwards the new size
    time.sleep(0.5)
    term.send(b"stty size\n")
    term.expect(b"42 132")
    term.send(b"exit 5\n")
    assert term.wait() == 5


def test_ctrl_c_reaches_the_guest_process(state_dir):
    # busybox runs many applets inside the shell process, where a trap would
    # only defer the signal; `exec cat` makes cat itself the signalled process.
    term = Terminal("--", "sh", "-c", "echo ready; exec cat")
    term.expect(b"ready")
    term.send(b"typed\r")
    term.expect(b"typed\r\ntyped")  # echoed by the guest's terminal, then printed by cat
    term.send(b"\x03")  # raw mode: ^C travels to the guest's terminal, whose driver sends SIGINT
    assert term.wait() == 130


def test_exec_it_into_a_detached_sandbox(cli):
    started = cli("run", "-d")
    vm = started.stdout.strip()
    assert vm.startswith("vm-"), started
    try:
        term = Terminal(rows=25, cols=90, command=("exec", "-it", vm, "--", "sh"))
        term.expect(b"# ")
        term.send(b"stty size; echo $TERM\n")
        term.expect(b"25 90")
        term.resize(50, 160)
        time.sleep(0.5)
        term.send(b"stty size\n")
        term.expect(b"50 160")
        term.send(b"exit 3\n")
        assert term.wait() == 3
    finally:
        cli("kill", vm)
