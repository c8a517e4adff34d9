"""Pause/resume, snapshots, restores and forks (issue 14), against baselines measured in the same run.

1. Pause and resume latency (QMP stop/cont through the sandbox API), against
   a `ping` round trip through the agent.
2. Snapshot create time and size (full and filesystem).
3. Restore to first exec (a full snapshot, and a filesystem one, which
   boots cold from a template on the copied disk), against creating a fresh
   sandbox from the boot template to its first exec.
4. Fork to first exec: one full snapshot of a live sandbox, then N restores
   started together, to every clone's first exec result.
5. Memory: RSS and PSS of each QEMU (the source and its idle clones).
6. Full snapshot time and size against dirty guest memory (MiB written to
   the guest's tmpfs first), against the clean snapshot of item 2.

Usage: .venv/bin/python benchmarks/bench_snapshot_fork.py [--runs N] [--forks N] [--no-network]
(at most 1 + N VMs run at once; the machine has 2 cores, keep N small).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchstate import private_state_dir
from timing import median_ms, timed_async

from matchlock.api.config import Resources, SandboxConfig
from matchlock.api.network import NetworkConfig
from matchlock.sandbox import snapshots
from matchlock.sandbox.sandbox import ExecSpec, Sandbox
from matchlock.state import snapshots as records
from matchlock.state.store import StateStore


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB from /proc/PID/smaps_rollup."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key] = int(rest.split()[0])
    return values["Rss"], values["Pss"]


async def _first_exec(box: Sandbox) -> None:
    result = await box.exec(ExecSpec("true"))
    assert result.exit_code == 0, result


async def _create_to_exec(config: SandboxConfig, store: StateStore, restore=None) -> tuple[float, Sandbox]:
    started = time.perf_counter()
    box = await Sandbox.create(restore.prepare(config) if restore else config, store=store, restore=restore)
    await _first_exec(box)
    return time.perf_counter() - started, box


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


async def main(runs: int, forks: int, no_network: bool) -> None:
    config = SandboxConfig(
        image="matchlock/busybox:builtin",
        resources=Resources(disk_size_mb=512),
        network=NetworkConfig(no_network=no_network),
    )
    store = StateStore()
    source = await Sandbox.create(config, store=store)
    await source.exec(ExecSpec("sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &"))
    try:
        ping = await timed_async(runs * 4, source.ping)
        pauses: list[float] = []
        resumes: list[float] = []
        for _ in range(runs * 4):
            pauses += await timed_async(1, lambda: snapshots.pause(source))
            resumes += await timed_async(1, lambda: snapshots.resume(source))
        print("1. pause / resume (QMP stop / cont)")
        print(f"  pause   median {median_ms(pauses):7.2f} ms   resume median {median_ms(resumes):7.2f} ms")
        print(f"  baseline: agent ping round trip {median_ms(ping):.2f} ms "
              f"(pause = {median_ms(pauses) / median_ms(ping):.2f}x)")  # fmt: skip

        print("2. snapshot create")
        created = {}
        for mode in ("full", "filesystem"):
            samples = []
            for run in range(runs):
                name = f"bench-{mode}-{run}"
                started = time.perf_counter()
                record = await snapshots.create(source, store, name, mode)
                samples.append(time.perf_counter() - started)
                created[mode] = record
            print(f"  {mode:10s} median {median_ms(samples):7.1f} ms, size {_mib(created[mode].size)}")

        print("3. create to first exec")
        baseline, full, filesystem = [], [], []
        for _ in range(runs):
            for samples, restore in (
                (baseline, None),
                (full, snapshots.Restore.load(store, created["full"].name)),
                (filesystem, snapshots.Restore.load(store, created["filesystem"].name)),
            ):
                elapsed, box = await _create_to_exec(config, store, restore)
                samples.append(elapsed)
                await box.aclose()
        base = median_ms(baseline)
        print(f"  baseline: fresh sandbox from the boot template {base:7.1f} ms")
        print(f"  full snapshot restore                          {median_ms(full):7.1f} ms "
              f"({median_ms(full) / base:.2f}x)")  # fmt: skip
        print(f"  filesystem snapshot restore (template boot)    {median_ms(filesystem):7.1f} ms "
              f"({median_ms(filesystem) / base:.2f}x)")  # fmt: skip

        print(f"4. fork of {forks} to every clone's first exec")
        started = time.perf_counter()
        record = await snapshots.create(source, store, "bench-fork", "full")
        saved = time.perf_counter() - started
        restore = snapshots.Restore.load(store, record.name)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_create_to_exec(config, store, restore)) for _ in range(forks)]
        total = time.perf_counter() - started
        clones = [task.result()[1] for task in tasks]
        each = [saved + task.result()[0] for task in tasks]
        print(f"  snapshot {saved * 1000:.1f} ms; all {forks} clones answered after {total * 1000:.1f} ms "
              f"(median per clone {statistics.median(each) * 1000:.1f} ms; baseline create {base:.1f} ms)")  # fmt: skip

        print("5. memory of each QEMU (idle)")
        await asyncio.sleep(2)
        for label, box in (("source", source), *((f"clone {i + 1}", c) for i, c in enumerate(clones))):
            assert box.machine is not None and box.machine.pid is not None
            rss, pss = _memory_kib(box.machine.pid)
            print(f"  {label:8s} RSS {rss / 1024:6.1f} MiB  PSS {pss / 1024:6.1f} MiB")
        for clone in clones:
            await clone.aclose()

        # Last: freed tmpfs pages keep their contents, so every later snapshot would carry them.
        print("6. full snapshot against dirty guest memory")
        for dirty in (0, 64, 192):
            if dirty:
                await source.exec(ExecSpec(f"dd if=/dev/urandom of=/dev/shm/fill bs=1M count={dirty} 2>/dev/null"))
            started = time.perf_counter()
            record = await snapshots.create(source, store, f"bench-dirty-{dirty}", "full")
            elapsed = time.perf_counter() - started
            print(f"  full, {dirty:3d} MiB dirtied in tmpfs: {elapsed * 1000:7.1f} ms, size {_mib(record.size)}")
            records.remove(store, record.name)
    finally:
        await source.aclose()
        for record in records.ready(store):
            records.remove(store, record.name)
        store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--forks", type=int, default=2)
    parser.add_argument("--no-network", action="store_true")
    args = parser.parse_args()
    with private_state_dir():
        asyncio.run(main(args.runs, args.forks, args.no_network))
