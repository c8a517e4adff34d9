"""The Python SDK against in-process baselines, measured in one run.

1. Cold: SDK `Client.start()` + `create` -> first `exec("true")` result (spawns `matchlock rpc`, boots
   a VM), against in-process `Sandbox.create` -> first `exec` in this process.
2. Warm: one `exec("true")` round trip through the SDK (sync `Client` and `AsyncClient`: JSON-RPC over
   the server's stdio, then the agent), against in-process `Sandbox.exec` on a sandbox of our own;
   and `Client.log()`, which the server answers without the guest, for the transport's own cost.

Printed as medians and ratios. Hold the VM lock: flock /tmp/matchlock-vm.lock .venv/bin/python benchmarks/bench_sdk.py
Usage: .venv/bin/python benchmarks/bench_sdk.py [--runs N] [--boots N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from benchstate import private_state_dir
from timing import median_ms, timed, timed_async

from matchlock import AsyncClient, Client, Config, Sandbox
from matchlock.api.config import SandboxConfig
from matchlock.sandbox.sandbox import ExecSpec
from matchlock.sandbox.sandbox import Sandbox as InProcessSandbox

IMAGE = "matchlock/busybox:builtin"
CONFIG = Config(binary_path=str(Path(sys.executable).parent / "matchlock"))


async def _in_process(runs: int) -> tuple[float, list[float]]:
    started = time.perf_counter()
    box = await InProcessSandbox.create(SandboxConfig(image=IMAGE))
    try:
        await box.exec(ExecSpec("true"))
        cold = time.perf_counter() - started
        for _ in range(10):
            await box.exec(ExecSpec("true"))
        return cold, await timed_async(runs, lambda: box.exec(ExecSpec("true")))
    finally:
        await box.aclose()


def _sdk(runs: int) -> tuple[float, list[float], list[float]]:
    client = Client(CONFIG)
    started = time.perf_counter()
    client.start()
    try:
        client.create(Sandbox(IMAGE).options())
        client.exec("true")
        cold = time.perf_counter() - started
        for _ in range(10):
            client.exec("true")
        warm = timed(runs, lambda: client.exec("true"))
        rpc_only = timed(runs, client.log)  # answered by the server from a host file: transport cost alone
        return cold, warm, rpc_only
    finally:
        client.close()
        client.remove()


async def _async_sdk(runs: int) -> list[float]:
    async with AsyncClient(CONFIG) as client:
        await client.create(Sandbox(IMAGE).options())
        for _ in range(10):
            await client.exec("true")
        warm = await timed_async(runs, lambda: client.exec("true"))
    await client.remove()
    return warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="warm exec round trips per client")
    parser.add_argument("--boots", type=int, default=3, help="cold starts per side")
    args = parser.parse_args()
    runs, boots = max(5, min(args.runs, 1000)), max(1, min(args.boots, 10))
    in_cold, sdk_cold, in_warm, sdk_warm, async_warm, rpc_only = [], [], [], [], [], []
    # Interleaved, one VM per side and round: guest speed under TCG varies from VM to VM and over
    # time, and this spreads it over all sides alike.
    with private_state_dir():
        for _ in range(boots):
            cold, warm = asyncio.run(_in_process(runs))
            in_cold.append(cold)
            in_warm += warm
            cold, warm, log_calls = _sdk(runs)
            sdk_cold.append(cold)
            sdk_warm += warm
            rpc_only += log_calls
            async_warm += asyncio.run(_async_sdk(runs))

    print(f"SDK against in-process, one run ({boots} boots and {runs} warm execs per side and boot)")
    print(f"  cold, create -> first exec result, in process : {median_ms(in_cold):8.1f} ms")
    print(f"  cold, SDK start + create -> first exec result : {median_ms(sdk_cold):8.1f} ms")
    print(f"    ratio SDK / in-process                      : {median_ms(sdk_cold) / median_ms(in_cold):8.2f} x")
    print(f"  warm exec `true`, in process                  : {median_ms(in_warm):8.2f} ms")
    print(f"  warm exec `true`, SDK Client                  : {median_ms(sdk_warm):8.2f} ms")
    print(f"  warm exec `true`, SDK AsyncClient             : {median_ms(async_warm):8.2f} ms")
    print(f"    ratio Client / in-process                   : {median_ms(sdk_warm) / median_ms(in_warm):8.2f} x")
    print(f"    ratio AsyncClient / in-process              : {median_ms(async_warm) / median_ms(in_warm):8.2f} x")
    print(f"  JSON-RPC round trip alone (Client.log())      : {median_ms(rpc_only):8.2f} ms")
    print("  (guest exec time under TCG varies by ~10 ms between VMs: the warm ratios are within that noise)")


if __name__ == "__main__":
    main()
