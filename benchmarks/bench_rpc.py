"""What the JSON-RPC layer costs, measured in one run: `matchlock rpc` against the same work in-process.

Baselines: an in-process sandbox (no RPC): `exec` of `true`, and `write_file`/`read_file` of 8 MiB.
Measured: the same calls through a `matchlock rpc` subprocess with raw JSON lines (what the SDKs send:
one base64 line per file). Ratios are rpc / in-process medians.

Usage: .venv/bin/python benchmarks/bench_rpc.py [--runs N]   (hold /tmp/matchlock-vm.lock)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")
FILE_SIZE = 8 * 1024 * 1024
IMAGE = "matchlock/busybox:builtin"


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


async def _in_process(runs: int) -> dict[str, list[float]]:
    from matchlock.api.config import NetworkConfig, SandboxConfig
    from matchlock.sandbox.sandbox import ExecSpec, Sandbox

    box = await Sandbox.create(SandboxConfig(image=IMAGE, network=NetworkConfig(no_network=True)))
    data = os.urandom(FILE_SIZE)
    samples: dict[str, list[float]] = {"exec": [], "write_file": [], "read_file": []}
    try:
        for _ in range(5):
            await box.exec(ExecSpec("true"))
        for _ in range(runs):
            started = time.perf_counter()
            await box.exec(ExecSpec("true"))
            samples["exec"].append(time.perf_counter() - started)
        for _ in range(max(3, runs // 10)):
            started = time.perf_counter()
            await box.write_file("/tmp/bench.bin", data)
            samples["write_file"].append(time.perf_counter() - started)
            started = time.perf_counter()
            assert await box.read_file("/tmp/bench.bin") == data
            samples["read_file"].append(time.perf_counter() - started)
    finally:
        await box.aclose()
    return samples


class _Rpc:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([MATCHLOCK, "rpc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.next_id = 0

    def call(self, method: str, params: dict | None = None) -> dict:
        self.next_id += 1
        msg: dict = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params:
            msg["params"] = params
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            reply = json.loads(self.proc.stdout.readline())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]


def _rpc(runs: int) -> dict[str, list[float]]:
    rpc = _Rpc()
    data = os.urandom(FILE_SIZE)
    encoded = base64.b64encode(data).decode()
    samples: dict[str, list[float]] = {"exec": [], "write_file": [], "read_file": []}
    try:
        rpc.call("create", {"image": IMAGE, "network": {"no_network": True}})
        for _ in range(5):
            rpc.call("exec", {"command": "true"})
        for _ in range(runs):
            started = time.perf_counter()
            rpc.call("exec", {"command": "true"})
            samples["exec"].append(time.perf_counter() - started)
        for _ in range(max(3, runs // 10)):
            started = time.perf_counter()
            rpc.call("write_file", {"path": "/tmp/bench.bin", "content": encoded, "mode": 420})
            samples["write_file"].append(time.perf_counter() - started)
            started = time.perf_counter()
            assert base64.b64decode(rpc.call("read_file", {"path": "/tmp/bench.bin"})["content"]) == data
            samples["read_file"].append(time.perf_counter() - started)
        rpc.call("close", {"timeout_seconds": 2})
    finally:
        if rpc.proc.poll() is None:
            assert rpc.proc.stdin is not None
            rpc.proc.stdin.close()
            rpc.proc.wait(60)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        os.environ["MATCHLOCK_STATE_DIR"] = state
        local = asyncio.run(_in_process(args.runs))
        remote = _rpc(args.runs)
    print(f"{'operation':<24}{'in-process ms':>14}{'rpc ms':>10}{'ratio':>8}")
    for name in ("exec", "write_file", "read_file"):
        base, measured = _median_ms(local[name]), _median_ms(remote[name])
        label = name if name == "exec" else f"{name} {FILE_SIZE >> 20} MiB"
        print(f"{label:<24}{base:>14.1f}{measured:>10.1f}{measured / base:>8.2f}")


if __name__ == "__main__":
    main()
