"""Exec modes, cancellation, files and isolation through the Sandbox API, on one real VM."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from matchlock.api.errors import FileOperationError
from matchlock.sandbox.sandbox import ExecSpec

pytestmark = [pytest.mark.vm]


def sh(box, loop_thread, command: str, **kwargs):
    return loop_thread.run(box.exec(ExecSpec(command, **kwargs)))


def test_buffered_exec(sandbox, loop_thread):
    result = sh(sandbox, loop_thread, "echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")


def test_large_output_is_exact(sandbox, loop_thread):
    result = sh(sandbox, loop_thread, "head -c 5000000 /dev/urandom > /tmp/big; sha256sum /tmp/big >&2; cat /tmp/big")
    assert len(result.stdout) == 5_000_000
    assert result.stderr.split()[0].decode() == hashlib.sha256(result.stdout).hexdigest()


def test_file_round_trip_and_modes(sandbox, loop_thread):
    content = os.urandom(100 * 1024)
    loop_thread.run(sandbox.write_file("/tmp/deep/dir/data.bin", content, 0o751))
    assert loop_thread.run(sandbox.read_file("/tmp/deep/dir/data.bin")) == content
    modes = sh(sandbox, loop_thread, "stat -c '%a %s' /tmp/deep/dir/data.bin; stat -c %a /tmp/deep/dir")
    assert modes.stdout.decode().split() == ["751", str(len(content)), "755"]
    names = {f.name: f for f in loop_thread.run(sandbox.list_files("/tmp/deep/dir"))}
    assert names["data.bin"].size == len(content) and not names["data.bin"].is_dir
    assert names["data.bin"].mode & 0o7777 == 0o751


def test_file_errors_are_clear(sandbox, loop_thread):
    with pytest.raises(FileOperationError, match="not a regular file"):
        loop_thread.run(sandbox.read_file("/tmp"))
    with pytest.raises(FileOperationError, match="No such file"):
        loop_thread.run(sandbox.read_file("/tmp/missing"))
    sh(sandbox, loop_thread, "head -c 17000000 /dev/zero > /tmp/too-big")
    with pytest.raises(FileOperationError, match="16 MiB"):
        loop_thread.run(sandbox.read_file("/tmp/too-big"))
    with pytest.raises(FileOperationError, match="No such file"):
        loop_thread.run(sandbox.list_files("/nonexistent"))


def test_cancel_kills_the_process_group_with_sigterm_first(sandbox, loop_thread):
    async def scenario():
        out = bytearray()
        started = asyncio.Event()

        def on_stdout(data):
            out.extend(data)
            started.set()

        process = sandbox.start_exec(
            ExecSpec("trap 'echo got-term; exit 3' TERM; sleep 1000 & sleep 1001 & echo ready; wait"),
            on_stdout=on_stdout,
        )
        async with asyncio.TaskGroup() as group:
            waiter = group.create_task(process.wait())
            await started.wait()
            process.cancel()
        return waiter.result(), bytes(out)

    result, out = loop_thread.run(scenario())
    assert b"got-term" in out, out
    assert result.exit_code == 3
    leftovers = sh(sandbox, loop_thread, "ps -o args | grep 'sleep 100[01]' || true")
    assert leftovers.stdout == b""


def test_cancel_escalates_to_sigkill(sandbox, loop_thread):
    async def scenario():
        started = asyncio.Event()
        process = sandbox.start_exec(
            ExecSpec("trap '' TERM; echo ready; sleep 1000"), on_stdout=lambda _: started.set()
        )
        async with asyncio.TaskGroup() as group:
            waiter = group.create_task(process.wait())
            await started.wait()
            process.cancel()
        return waiter.result()

    result = loop_thread.run(scenario())
    assert result.exit_code == 137
    assert sh(sandbox, loop_thread, "ps -o args | grep '[s]leep 1000' || true").stdout == b""


def test_background_jobs_do_not_outlive_the_command(sandbox, loop_thread):
    result = sh(sandbox, loop_thread, "sleep 900 & echo started")
    assert result.stdout == b"started\n"
    assert sh(sandbox, loop_thread, "ps -o args | grep '[s]leep 900' || true").stdout == b""


def test_slow_reader_does_not_block_other_streams(sandbox, loop_thread):
    async def scenario():
        gate = asyncio.Event()

        async def blocked(_data):
            await gate.wait()

        flood = sandbox.start_exec(ExecSpec("cat /dev/zero"), on_stdout=blocked)
        async with asyncio.TaskGroup() as group:
            group.create_task(flood.wait())
            async with asyncio.timeout(60):
                quick = await sandbox.exec(ExecSpec("echo still-responsive"))
            flood.cancel()
            gate.set()
        return quick

    assert loop_thread.run(scenario()).stdout == b"still-responsive\n"


def test_workloads_are_confined(sandbox, loop_thread):
    status = sh(sandbox, loop_thread, "grep -E '^(NoNewPrivs|Seccomp|CapBnd)' /proc/self/status").stdout.decode()
    fields = dict(line.split(":\t") for line in status.splitlines())
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    bounding = int(fields["CapBnd"], 16)
    for cap in (16, 17, 19, 21, 22):  # SYS_MODULE, SYS_RAWIO, SYS_PTRACE, SYS_ADMIN, SYS_BOOT
        assert not bounding & (1 << cap), cap
    hidden = sh(sandbox, loop_thread, "ls -A /run/matchlock; grep -c matchlock /proc/mounts; echo; ls -l /dev/vport*")
    listing = hidden.stdout.decode()
    assert listing.startswith("0\n"), listing  # nothing under /run/matchlock, no runtime mounts
    assert "vport" not in listing  # workloads get a /dev without the agent's port (guest/confine.py)
    # Only this exec's namespace is visible: its init (PID 1), sh and ps (or ps alone, if sh execs
    # it). No pipeline here: `ps | tail` raced, as ps may scan /proc before sh has forked tail.
    pids = [int(p) for p in sh(sandbox, loop_thread, "ps -o pid").stdout.split()[1:]]
    assert pids in ([1, 2], [1, 2, 3]), pids
    # The namespace init keeps its capabilities; the workload may not inspect it.
    assert sh(sandbox, loop_thread, "cat /proc/1/environ").exit_code != 0


def test_pid_namespace_per_exec(sandbox, loop_thread):
    first = sh(sandbox, loop_thread, "echo $$").stdout
    assert first == b"2\n"  # sh is PID 2 under the namespace's init


def test_clean_shutdown_and_forced_kill(loop_thread, module_state_dir):
    from matchlock.api.config import SandboxConfig
    from matchlock.sandbox.sandbox import Sandbox

    async def scenario():
        graceful = await Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin"))
        await graceful.write_file("/tmp/data", b"synced")
        await graceful.aclose(graceful_timeout=20)
        forced = await Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin"))
        pid = forced.machine.pid
        await forced.aclose()
        return graceful.machine.returncode, forced.machine.returncode, pid

    graceful_code, forced_code, forced_pid = loop_thread.run(scenario())
    assert graceful_code == 0  # the guest synced and reset; QEMU exited on its own (-no-reboot)
    assert forced_code is not None and not os.path.exists(f"/proc/{forced_pid}")
