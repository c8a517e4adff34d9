"""`matchlock exec <id> -- true` against the in-process agent, measured in one run.

Baselines, all against the same running sandbox:
- agent round trip: an in-process `ping` through the multiplexer;
- in-process exec of `true` (what the guest costs for a command);
- Python start-up of the CLI: `matchlock version`, which imports the CLI
  but does no sandbox work;
and the thing measured: `matchlock exec <id> -- true` as a separate process
(CLI start-up + state lookup + relay + guest exec).

Target: exec ≤ 2x the in-process exec plus the CLI's start-up.
Usage: .venv/bin/python benchmarks/bench_exec.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

from benchstate import private_state_dir
from timing import median_ms, timed, timed_async

from matchlock.sandbox.sandbox import ExecSpec

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")


def _time_command(argv: list[str], runs: int) -> list[float]:
    return timed(runs, lambda: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL))


async def _in_process(runs: int) -> tuple[list[float], list[float]]:
    """In-process numbers come from a sandbox of our own (the relay is not involved)."""
    from matchlock.api.config import SandboxConfig
    from matchlock.sandbox.sandbox import Sandbox

    box = await Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin"))
    try:
        for _ in range(10):
            await box.ping()
            await box.exec(ExecSpec("true"))
        pings = await timed_async(runs, box.ping)
        return pings, await timed_async(runs, lambda: box.exec(ExecSpec("true")))
    finally:
        await box.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    runs = max(5, min(parser.parse_args().runs, 500))
    with private_state_dir():
        vm_id = subprocess.run([MATCHLOCK, "run", "-d"], check=True, capture_output=True, text=True).stdout.strip()
        try:
            pings, in_process = asyncio.run(_in_process(runs))
            _time_command([MATCHLOCK, "exec", vm_id, "--", "true"], 5)  # warm caches
            startup = _time_command([MATCHLOCK, "version"], runs)
            cli_exec = _time_command([MATCHLOCK, "exec", vm_id, "--", "true"], runs)
        finally:
            subprocess.run([MATCHLOCK, "rm", "-f", vm_id], capture_output=True)
    ping_ms, inproc_ms = median_ms(pings), median_ms(in_process)
    startup_ms, cli_ms = median_ms(startup), median_ms(cli_exec)
    budget = 2 * inproc_ms + startup_ms
    print(f"exec latency (median of {runs})")
    print(f"  agent round trip, in process (ping)     : {ping_ms:7.2f} ms")
    print(f"  exec `true`, in process                  : {inproc_ms:7.2f} ms")
    print(f"  CLI start-up (`matchlock version`)       : {startup_ms:7.2f} ms")
    print(f"  `matchlock exec <id> -- true`            : {cli_ms:7.2f} ms")
    print(f"  relay + CLI overhead beyond start-up     : {cli_ms - startup_ms - inproc_ms:7.2f} ms")
    print(f"  target: <= 2 x in-process exec + start-up = {budget:.2f} ms -> {'met' if cli_ms <= budget else 'missed'}")


if __name__ == "__main__":
    main()
