"""Start one workload command in its own PID and mount namespaces.

Process tree for one exec (forked from the agent, so nothing is loaded from
the image):

    agent             unshare(CLONE_NEWPID) just around the fork, so only this
     │                child lands in a new PID namespace
     └─ ns init       PID 1 there; own process group and mount namespace with
         │            the runtime hidden; unless privileged, a /dev without the
         │            disks and read-only kernel knobs (confine.py); mounts
         │            /proc, reaps orphans, mirrors the command's exit status
         └─ sh -c COMMAND   caps dropped, no_new_privs, seccomp, user, cwd

When the command exits, the namespace init exits, and the kernel kills every
process left in the namespace, so background jobs of a finished command never
linger and never hold its output pipes open. Cancellation signals the
group: the command gets SIGTERM, while the namespace init (which, as PID 1
seen from an ancestor namespace, only receives SIGKILL) keeps reaping; the
final SIGKILL takes it down and with it everything inside. Two forks per
exec: forks of the Python agent are the main cost of an exec under emulation.
(A namespace init forked ahead of time, in the boot template or when idle,
was measured no faster: every later write of the agent to a page it shares
with that child is a copy, and the first byte after a restore came later.)
"""

from __future__ import annotations

import _signal
import errno
import fcntl
import gc
import os
import struct
import termios

from ..wire.agent import ExecRequest, TerminalSize
from . import confine, seccomp, syscalls, timing
from .users import resolve_user

HIDDEN_MOUNTS = ("/run/matchlock",)
# What an unprivileged command keeps: Docker's default set, without CAP_MKNOD (a device node made anywhere
# would reach the disks that /dev hides). Every other capability (CAP_SYS_ADMIN, CAP_SYSLOG, CAP_NET_ADMIN,
# CAP_SYS_PTRACE, ...) leaves every set: the bounding set, so no exec regains it, and the others.
WORKLOAD_CAPABILITIES = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}
_KEPT_BITS = frozenset(WORKLOAD_CAPABILITIES.values())
_KEPT_MASK = sum(1 << bit for bit in _KEPT_BITS)
_MAX_CAPABILITIES = 64  # the kernel's sets are 64 bits; it refuses numbers past its last with EINVAL
EXEC_FAILED = 127
_SECCOMP_FILTER = syscalls.SeccompFilter(seccomp.build_filter())
_UNCATCHABLE = (_signal.SIGKILL, _signal.SIGSTOP)


class SpawnError(Exception):
    pass


def set_window_size(fd: int, size: TerminalSize) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


class Spawned:
    """The agent's handle on a running command: pid, pgid and its pipe ends."""

    def __init__(
        self, pid: int, stdin: int | None, stdout: int, stderr: int | None, pty: bool, error_pipe: int, stamps_pipe: int
    ) -> None:
        self.pid = pid
        self.stamps_pipe = stamps_pipe  # the children's timing stamps (-1: not asked for)
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.pty = pty
        self.error_pipe = error_pipe

    def signal(self, signum: int) -> None:
        targets = {self.pid}
        if self.pty:
            try:
                targets.add(os.tcgetpgrp(self.stdout))
            except OSError:
                pass
        for pgid in targets:
            try:
                os.killpg(pgid, signum)
            except ProcessLookupError:
                pass


_own_pid_namespace: int | None = None
_stamps_w = -1  # in a child: where its timing stamps go before the exec (-1: nowhere)


def _restore_pid_namespace() -> None:
    """Later forks of the agent must stay in its own PID namespace."""
    global _own_pid_namespace
    if _own_pid_namespace is None:
        _own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    syscalls.setns(_own_pid_namespace, syscalls.CLONE_NEWPID)


def spawn(request: ExecRequest, *, privileged: bool, hidden_devices: tuple[str, ...] = ()) -> Spawned:
    """Fork the namespace init; returns at once. Exec errors arrive on `error_pipe`."""
    if request.tty:
        master, slave = os.openpty()
        set_window_size(master, request.tty)
        child_fds = (slave, slave, slave)
        parent_fds: tuple[int | None, int, int | None] = (master, master, None)
        to_close_in_parent = [slave]
    else:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        if request.stdin:
            in_r, in_w = os.pipe()
        else:
            in_r, in_w = os.open("/dev/null", os.O_RDONLY), None
        child_fds = (in_r, out_w, err_w)
        parent_fds = (in_w, out_r, err_r)
        to_close_in_parent = [in_r, out_w, err_w]
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    to_close_in_parent.insert(0, error_w)
    stamps_r, stamps_w = os.pipe2(os.O_CLOEXEC) if timing.stamps is not None else (-1, -1)
    if stamps_w >= 0:
        to_close_in_parent.append(stamps_w)
    if _own_pid_namespace is None:
        _restore_pid_namespace()  # opens the handle while /proc is the agent's
    syscalls.unshare(syscalls.CLONE_NEWPID)
    try:
        pid = os.fork()
    except BaseException:
        _restore_pid_namespace()
        raise
    if pid == 0:
        try:
            # Drop everything inherited from the agent (the port, other
            # commands' pipes) so this command cannot hold them open. No
            # garbage collection either: a pass would write to every object
            # shared with the agent (each page a copy) in a child that lives
            # only until its exec.
            gc.disable()
            _signal.set_wakeup_fd(-1)
            _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
            _close_all_except({0, 1, 2, error_w, stamps_w, *child_fds} - {-1})
            _child_stamps(stamps_w)
            _namespace_init(request, child_fds, error_w, privileged, hidden_devices)
        except BaseException as exc:  # noqa: BLE001 - must never return into the agent
            _report(error_w, f"namespace init: {exc}")
        finally:
            os._exit(EXEC_FAILED)
    _restore_pid_namespace()
    for fd in to_close_in_parent:
        os.close(fd)
    stdin, stdout, stderr = parent_fds
    for fd in {fd for fd in parent_fds if fd is not None} | ({stamps_r} - {-1}):
        os.set_blocking(fd, False)
    return Spawned(pid, stdin, stdout, stderr, request.tty is not None, error_r, stamps_r)


def _child_stamps(fd: int) -> None:
    """In a fresh child: stamp its steps if the agent passed a pipe for them (its first exec, traced)."""
    global _stamps_w
    _stamps_w = fd
    timing.stamps = [] if fd >= 0 else None


def _send_stamps() -> None:
    if _stamps_w >= 0 and timing.stamps:
        lines = "".join(f"{label}\t{at}\n" for label, at in timing.stamps)
        _report(_stamps_w, lines)


def take_child_stamps(proc: Spawned) -> list[tuple[str, float]]:
    """The stamps the command's children wrote before its exec (the pipe is closed for good by then)."""
    if proc.stamps_pipe < 0:
        return []
    try:
        data = os.read(proc.stamps_pipe, 4096)
    except BlockingIOError:
        data = b""
    os.close(proc.stamps_pipe)
    proc.stamps_pipe = -1
    stamps = []
    for line in data.decode("ascii", "replace").splitlines():
        label, _, at = line.partition("\t")
        try:
            stamps.append((label, float(at)))
        except ValueError:
            continue
    return stamps


def _close_all_except(keep: set[int]) -> None:
    # os.closerange(n, n) would become close_range(n, n - 1): with n = 0
    # that is close_range(0, UINT_MAX), which closes everything.
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def _report(error_w: int, message: str) -> None:
    try:
        os.write(error_w, message.encode("utf-8", "replace")[:4000])
    except OSError:
        pass


def _namespace_init(request: ExecRequest, child_fds, error_w: int, privileged: bool, hidden_devices) -> None:
    os.setpgid(0, 0)
    # Handlers inherited from the agent would make PID 1 killable by them.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    if privileged:
        for device in hidden_devices:
            try:
                syscalls.mount("/dev/null", device, None, syscalls.MS_BIND)
            except OSError:
                pass
    else:
        confine.build_dev()  # assembled under /run/matchlock, so before that goes
        confine.take_read_only_sys()
    for path in HIDDEN_MOUNTS:
        try:
            syscalls.umount(path, syscalls.MNT_DETACH)
        except OSError:
            pass
    syscalls.mount("proc", "/proc", "proc", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    if not privileged:
        confine.restrict_kernel_files()
    timing.stamp("ns init: mounts done")
    command_pid = os.fork()
    if command_pid == 0:
        try:
            _exec_command(request, child_fds, error_w, privileged)
        except BaseException as exc:  # noqa: BLE001
            _report(error_w, str(exc))
        finally:
            os._exit(EXEC_FAILED)
    os.close(error_w)
    for fd in {*child_fds, _stamps_w} - {-1}:
        os.close(fd)
    # As PID 1 we inherit every orphan in the namespace: reap until the
    # command itself is done, then exit, which ends the whole namespace.
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(EXEC_FAILED)
        if pid == command_pid:
            code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            os._exit(code)


def _drop_bounding_capabilities() -> None:
    for cap in range(_MAX_CAPABILITIES):
        if cap in _KEPT_BITS:
            continue
        try:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return  # past this kernel's last capability
            raise


def _exec_command(request: ExecRequest, child_fds, error_w: int, privileged: bool) -> None:
    timing.stamp("command: forked")
    stdin, stdout, stderr = child_fds
    if request.tty:
        os.setsid()
        fcntl.ioctl(stdin, termios.TIOCSCTTY, 0)
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    _close_all_except({0, 1, 2, error_w, _stamps_w} - {-1})

    env = dict(request.env)
    user = resolve_user(request.user) if request.user else resolve_user("0")
    timing.stamp("command: user resolved")
    if user.home and "HOME" not in env:
        env["HOME"] = user.home
    if request.tty and "TERM" not in env:
        env["TERM"] = "xterm"

    if not privileged:
        _drop_bounding_capabilities()
    os.setgroups(list(user.groups))
    os.setgid(user.gid)
    os.setuid(user.uid)
    if not privileged:
        # A uid other than 0 has just lost all of them; root keeps only the workload's set.
        kept = _KEPT_MASK if user.uid == 0 else 0
        syscalls.capset(kept, kept, 0)
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        timing.stamp("command: capabilities dropped")
        _SECCOMP_FILTER.install()
    try:
        os.chdir(request.cwd)
    except OSError as exc:
        raise SpawnError(f"cannot use working directory {request.cwd}: {exc.strerror}") from None

    # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive exec.
    for signum in range(1, _signal.NSIG):
        if signum not in _UNCATCHABLE:
            try:
                _signal.signal(signum, _signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
    timing.stamp("command: execve")
    _send_stamps()
    try:
        os.execve("/bin/sh", ["sh", "-c", request.command], env)
    except OSError as exc:
        raise SpawnError(f"cannot run /bin/sh in the image: {exc.strerror}") from None
