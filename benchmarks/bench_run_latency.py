"""`matchlock run -- true` from a boot template, end to end, against its limits measured in the same run.

Interleaved, per round:
1. `python -c pass`: the interpreter's own start, below which no Python CLI can go;
2. raw QEMU restoring the same boot template (same argv, template files, RAM and a TAP), from the
   spawn to the restored guest running, and on to the guest's first byte once woken (its HELLO):
   the floor of any template start under TCG;
3. `matchlock run -- true`, with MATCHLOCK_DEBUG_TIMING set to the spawn instant, so its
   per-phase timeline (src/matchlock/util/trace.py) starts when the interpreter does, with the guest's
   own stamps (`guest: ...`, ms since its previous stamp).
Then, once, the floor of the exec itself: `true` in an already-running sandbox, in process (the first
exec, and back-to-back ones).

Prints medians, the ratios, and the median of every phase of the timeline.
Usage: .venv/bin/python benchmarks/bench_run_latency.py [--runs N]   (hold /tmp/matchlock-vm.lock)
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchstate import private_state_dir
from timing import median_ms, timed_async

import matchlock
from matchlock.api.config import SandboxConfig
from matchlock.api.image import DEFAULT_IMAGE
from matchlock.image.runtime import ensure_runtime_disk
from matchlock.image.store import ImageStore
from matchlock.kernel import resolve
from matchlock.net.namespace import GUEST_MAC, SandboxNamespace
from matchlock.sandbox.sandbox import ExecSpec, Sandbox
from matchlock.sandbox.upper import make_upper_disk
from matchlock.util.trace import ENV as TIMING_ENV
from matchlock.vm import checkpoint, snapshot
from matchlock.vm.accel import choose_accelerator, host_tsc_khz
from matchlock.vm.machine import Disk, Machine, MachineNetwork, MachineSpec
from matchlock.wire import boot

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")
_MARK = re.compile(r"^\[timing\]\s+([\d.]+) ms \(\+\s*([\d.]+)\) (.+)$")
_GUEST_MARK = re.compile(r"^\[timing\]\s+guest\s+[\d.]+ ms \(\+\s*([\d.]+)\) (.+)$")


def python_pass_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def run_true() -> tuple[float, list[tuple[str, float]]]:
    """Wall seconds of one `matchlock run -- true`, and its timeline as (label, ms since the previous mark)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [MATCHLOCK, "run", "--", "true"], capture_output=True, text=True, timeout=120,
        env={**os.environ, TIMING_ENV: f"{started:.6f}"},
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"matchlock run failed ({proc.returncode}): {proc.stderr[-800:]}")
    phases = [(m[3], float(m[2])) for line in proc.stderr.splitlines() if (m := _MARK.match(line))]
    phases.append(("process exit", elapsed * 1000 - (float(_last_total(proc.stderr)) if phases else 0.0)))
    phases += [("guest: " + m[2], float(m[1])) for line in proc.stderr.splitlines() if (m := _GUEST_MARK.match(line))]
    return elapsed, phases


def _last_total(stderr: str) -> str:
    totals = [m[1] for line in stderr.splitlines() if (m := _MARK.match(line))]
    return totals[-1]


def _spec(work: Path, tap_fd: int) -> MachineSpec:
    """The machine `run -- true` boots (as Sandbox.create builds it), with disks of its own."""
    kernel = resolve()
    upper = work / "upper.img"
    make_upper_disk(upper, 5120)
    return MachineSpec(
        name="bench-raw", kernel=kernel.path, initrd=kernel.initrd, kernel_args=tuple(kernel.cmdline),
        acpi=kernel.acpi,
        disks=(
            Disk(ensure_runtime_disk(), boot.RUNTIME_DISK_SERIAL, readonly=True),
            Disk(ImageStore().resolve(DEFAULT_IMAGE).lower_path, boot.LOWER_DISK_SERIAL, readonly=True),
            Disk(upper, boot.UPPER_DISK_SERIAL, ephemeral=True),
        ),
        console_log=work / "console.log", accel=choose_accelerator(), tsc_khz=host_tsc_khz(),
        network=MachineNetwork(mac=GUEST_MAC, tap_fd=tap_fd),
    )  # fmt: skip


async def raw_restore_seconds(work: Path) -> tuple[float, float]:
    """Spawn QEMU on the template; seconds until the restored guest runs, and until its first byte once woken."""
    namespace = SandboxNamespace(1500)
    namespace.create()
    try:
        assert namespace.tap_fd is not None
        spec = _spec(work, namespace.tap_fd)
        state = await snapshot.TemplateCache().ensure(spec)
        waking = dataclasses.replace(spec, kernel_args=spec.kernel_args + (boot.TEMPLATE_FLAG,))
        started = time.perf_counter()
        machine = Machine(checkpoint.template_restore(waking, state))
        try:
            await machine.start()  # returns once QEMU reports the guest running
            running = time.perf_counter() - started
            await machine.wake(os.urandom(boot.WAKE_SIZE))
            assert machine.agent_socket is not None
            if not await asyncio.get_running_loop().sock_recv(machine.agent_socket, 1):
                raise RuntimeError("the restored guest closed its port before its HELLO")
            first_byte = time.perf_counter() - started
        finally:
            await machine.kill()
        return running, first_byte
    finally:
        await namespace.aclose()


async def exec_floor(runs: int) -> tuple[float, list[float]]:
    """Seconds of `true` in one running sandbox, in process: its first exec, and back-to-back execs."""
    box = await Sandbox.create(SandboxConfig(image=DEFAULT_IMAGE))
    try:
        first = (await timed_async(1, lambda: box.exec(ExecSpec("true"))))[0]
        return first, await timed_async(runs, lambda: box.exec(ExecSpec("true")))
    finally:
        await box.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = max(1, min(args.runs, 50))
    # An installed package has its bytecode; a work tree under PYTHONDONTWRITEBYTECODE=1 would compile
    # every module changed since its last write on every run (over 100 ms of the start, measured).
    compileall.compile_dir(Path(matchlock.__file__).parent, quiet=1)
    with private_state_dir(), tempfile.TemporaryDirectory(prefix="matchlock-bench-") as tmp:
        work = Path(tmp)
        for _ in range(2):  # not counted: builds the templates (an image's rooted one at its second start)
            run_true()
        interpreter, raw, first_bytes, ours, timelines = [], [], [], [], []
        for _ in range(runs):
            interpreter.append(python_pass_seconds())
            running, first_byte = asyncio.run(raw_restore_seconds(work))
            raw.append(running)
            first_bytes.append(first_byte)
            elapsed, phases = run_true()
            ours.append(elapsed)
            timelines.append(phases)
        first_exec, busy_execs = asyncio.run(exec_floor(runs))
    floor, qemu, hello, total = (statistics.median(x) for x in (interpreter, raw, first_bytes, ours))
    print(f"run -- true from a boot template (median of {runs}, interleaved; target <= 0.6 s)")
    print(f"  python -c pass                          : {floor * 1000:7.1f} ms")
    print(f"  raw QEMU restore of the template        : {qemu * 1000:7.1f} ms")
    print(f"  raw restore to the guest's first byte   : {hello * 1000:7.1f} ms")
    print(f"  matchlock run -- true                   : {total * 1000:7.1f} ms  {[round(x, 3) for x in ours]}")
    print(f"  = {total / qemu:.2f}x raw restore, {total / (hello + floor):.2f}x (first byte + interpreter)")
    print("exec `true` in a running sandbox, in process (the floor of the exec):")
    print(f"  first exec                              : {first_exec * 1000:7.1f} ms")
    print(f"  back to back (median)                   : {median_ms(busy_execs):7.1f} ms")
    print("per phase (median ms since the previous mark; marks in the order of the first run):")
    for label, _ in timelines[0]:
        values = [dict(t).get(label) for t in timelines]
        present = [v for v in values if v is not None]
        print(f"  {statistics.median(present):8.1f}  {label}")


if __name__ == "__main__":
    main()
