"""VM-core benchmarks, each against a baseline measured in the same run.

1. Cold start: `matchlock run -- true`, end to end (CLI start, disks, QEMU,
   kernel, guest init, agent, exec, teardown), against raw QEMU booting the
   same kernel with the same machine options into a busybox /init that
   powers off at once. Interleaved runs; medians and their ratio.
2. Agent round trip: `read_file` of a 1-byte file through the multiplexer
   and the agent, against a raw 64-byte echo over the same kind of
   virtio-serial port (busybox `dd` echoing in the guest).
3. Memory: peak RSS of QEMU and of the supervising process for one idle
   sandbox.

Usage: .venv/bin/python benchmarks/bench_vm.py [--runs N] [--round-trips N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchstate import private_state_dir
from timing import timed_async

from matchlock.api.config import SandboxConfig
from matchlock.kernel import resolve
from matchlock.sandbox.sandbox import Sandbox
from matchlock.util import debian
from matchlock.vm.accel import choose_accelerator, host_tsc_khz
from matchlock.vm.machine import Disk, MachineSpec, build_argv

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")


def _busybox_root(root: Path, init: str) -> None:
    deb = debian.download(["busybox-static"])["busybox-static"]
    debian.extract(deb, root / "unpacked")
    (root / "tree" / "bin").mkdir(parents=True)
    for name in ("dev", "proc", "sys"):
        (root / "tree" / name).mkdir()
    shutil.copy2(root / "unpacked" / "bin" / "busybox", root / "tree" / "bin" / "busybox")
    for applet in ("sh", "mount", "reboot", "dd", "cat", "grep", "basename", "dirname", "echo"):
        os.symlink("busybox", root / "tree" / "bin" / applet)
    (root / "tree" / "init").write_text(init)
    (root / "tree" / "init").chmod(0o755)


def _raw_spec(disk: Path, console: Path) -> MachineSpec:
    kernel = resolve()
    return MachineSpec(
        name="bench-raw",
        kernel=kernel.path,
        initrd=kernel.initrd,
        kernel_args=tuple(kernel.cmdline),
        acpi=kernel.acpi,
        disks=(Disk(disk, "runtime", readonly=True),),
        console_log=console,
        accel=choose_accelerator(),
        tsc_khz=host_tsc_khz(),
    )


def _raw_boot_seconds(disk: Path, work: Path) -> float:
    agent_host, agent_guest = socket.socketpair()
    qmp_host, qmp_guest = socket.socketpair()
    argv = build_argv(_raw_spec(disk, work / "raw-console.log"), agent_guest.fileno(), qmp_guest.fileno())
    started = time.monotonic()
    proc = subprocess.run(argv, pass_fds=(agent_guest.fileno(), qmp_guest.fileno()), capture_output=True, timeout=120)
    elapsed = time.monotonic() - started
    for s in (agent_host, agent_guest, qmp_host, qmp_guest):
        s.close()
    if proc.returncode != 0:
        raise RuntimeError(f"raw boot failed: {proc.stderr.decode()[-500:]}")
    return elapsed


def _matchlock_run_seconds(env: dict | None = None) -> float:
    started = time.monotonic()
    proc = subprocess.run([MATCHLOCK, "run", "--", "true"], capture_output=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"matchlock run failed: {proc.stderr.decode()[-500:]}")
    return elapsed


def bench_cold_start(work: Path, runs: int) -> None:
    root = work / "raw"
    _busybox_root(root, "#!/bin/sh\nreboot -f\n")
    disk = work / "raw.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(disk), str(root / "tree")], check=True)
    _matchlock_run_seconds()  # warm the image/runtime caches; not counted
    raw, ours, booted = [], [], []
    for _ in range(runs):
        raw.append(_raw_boot_seconds(disk, work))
        ours.append(_matchlock_run_seconds())
        booted.append(_matchlock_run_seconds({"MATCHLOCK_NO_TEMPLATES": "1"}))
    raw_median = statistics.median(raw)
    print(f"cold start: a new sandbox each time (median of {runs}, interleaved)")
    print(f"  raw QEMU, same kernel, /init = reboot -f        : {raw_median:.3f} s  {[round(x, 2) for x in raw]}")
    for label, samples in (("matchlock run -- true (boot template)", ours),
                           ("matchlock run -- true (full boot, no template)", booted)):  # fmt: skip
        median = statistics.median(samples)
        print(f"  {label:<47} : {median:.3f} s  {[round(x, 2) for x in samples]}  = {median / raw_median:.2f}x")
    print("  target <= 1.5x raw")


ECHO_INIT = """#!/bin/sh
mount -t sysfs sys /sys
P=/dev/$(basename $(dirname $(grep -l matchlock.agent /sys/class/virtio-ports/*/name)))
exec 3<>$P
exec dd bs=64 count=COUNT iflag=fullblock <&3 >&3 2>/dev/null
"""


def _raw_echo_rtts(work: Path, count: int) -> list[float]:
    root = work / "echo"
    _busybox_root(root, ECHO_INIT.replace("COUNT", str(count)))
    disk = work / "echo.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(disk), str(root / "tree")], check=True)
    agent_host, agent_guest = socket.socketpair()
    qmp_host, qmp_guest = socket.socketpair()
    argv = build_argv(_raw_spec(disk, work / "echo-console.log"), agent_guest.fileno(), qmp_guest.fileno())
    proc = subprocess.Popen(argv, pass_fds=(agent_guest.fileno(), qmp_guest.fileno()))
    agent_guest.close()
    message, rtts = b"x" * 64, []
    try:
        time.sleep(0.5)
        for _ in range(count):
            started = time.perf_counter()
            agent_host.sendall(message)
            received = b""
            while len(received) < 64:
                chunk = agent_host.recv(64 - len(received))
                if not chunk:
                    raise RuntimeError("echo guest went away")
                received += chunk
            rtts.append(time.perf_counter() - started)
    finally:
        proc.kill()
        proc.wait()
    return rtts


async def _timed(operation, count: int) -> list[float]:
    for _ in range(20):  # warm the guest's code paths
        await operation()
    return await timed_async(count, operation)


async def _agent_rtts_and_memory(count: int) -> tuple[dict, dict]:
    box = await Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin"))
    try:
        await box.write_file("/tmp/one", b"x")
        rtts = {
            "ping (no work in the guest)": await _timed(box.ping, count),
            "read_file of a 1-byte file": await _timed(lambda: box.read_file("/tmp/one"), count),
        }
        await asyncio.sleep(3)  # idle
        memory = {
            "qemu": _rss_kib(box.machine.pid),
            "supervisor": _rss_kib(os.getpid()),
        }
        return rtts, memory
    finally:
        await box.aclose()


def _rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def bench_round_trip_and_memory(work: Path, count: int) -> None:
    raw = _raw_echo_rtts(work, count)
    ours, memory = asyncio.run(_agent_rtts_and_memory(count))
    raw_ms = statistics.median(raw) * 1000
    print(f"agent round trip (median of {count}; target <= 5x the raw echo)")
    print(f"  raw 64-byte echo over virtio-serial (busybox dd) : {raw_ms:.3f} ms")
    for label, samples in ours.items():
        ms = statistics.median(samples) * 1000
        print(f"  {label:<48} : {ms:.3f} ms = {ms / raw_ms:.2f}x")
    (qemu_rss, qemu_peak), (sup_rss, sup_peak) = memory["qemu"], memory["supervisor"]
    print("idle sandbox memory")
    print(f"  QEMU       : RSS {qemu_rss / 1024:.1f} MiB, peak {qemu_peak / 1024:.1f} MiB")
    print(f"  supervisor : RSS {sup_rss / 1024:.1f} MiB, peak {sup_peak / 1024:.1f} MiB")
    print(f"  total peak : {(qemu_peak + sup_peak) / 1024:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--round-trips", type=int, default=300)
    args = parser.parse_args()
    with private_state_dir(), tempfile.TemporaryDirectory(prefix="matchlock-bench-") as tmp:
        work = Path(tmp)
        bench_cold_start(work, max(1, min(args.runs, 50)))
        bench_round_trip_and_memory(work, max(10, min(args.round_trips, 5000)))


if __name__ == "__main__":
    main()
