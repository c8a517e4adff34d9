"""Pause/resume, snapshots, restores and forks (issue 14), against baselines measured in the same run.

1. Pause and resume latency (QMP stop/cont through the sandbox API), against
   a `ping` round trip through the agent.
2. Snapshot create time and size (full and filesystem).
3. Restore to first exec (a full snapshot, and a filesystem one, which
   boots cold from a template on the copied disk), against creating a fresh
   sandbox from the boot template to its first exec.
4. Fork to first exec: one full snapshot of a live sandbox, then N restores
   started together, to every clone's first exec result, against N fresh
   sandboxes from the boot template started together; in this process, and
   through the CLI (`matchlock fork -n N` against N x `run -d` at once, the
   first execs through each sandbox's relay); then the steps of `fork`
   timed one by one (snapshot, owners up, first execs).
5. Memory: RSS and PSS of each QEMU (the source and its idle clones).
6. Full snapshot time and size against dirty guest memory (MiB written to
   the guest's tmpfs first), against the clean snapshot of item 2.

Usage: .venv/bin/python benchmarks/bench_snapshot_fork.py [--runs N] [--forks N] [--no-network] [--fork-only]
       [--timeline]
(at most 1 + N VMs run at once; the machine has 2 cores, keep N small).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchstate import private_state_dir
from timing import median_ms, smaps_rollup, timed_async

from matchlock.api.config import Resources, SandboxConfig
from matchlock.api.network import NetworkConfig
from matchlock.sandbox import relay_client, snapshots
from matchlock.sandbox import relay_protocol as rp
from matchlock.sandbox.sandbox import ExecSpec, Sandbox
from matchlock.state import snapshots as records
from matchlock.state.store import StateStore

MATCHLOCK = str(Path(sys.executable).with_name("matchlock"))


async def _first_exec(box: Sandbox) -> None:
    result = await box.exec(ExecSpec("true"))
    assert result.exit_code == 0, result


async def _create_to_exec(config: SandboxConfig, store: StateStore, restore=None) -> tuple[float, Sandbox]:
    started = time.perf_counter()
    box = await Sandbox.create(restore.prepare(config) if restore else config, store=store, restore=restore)
    await _first_exec(box)
    return time.perf_counter() - started, box


def _relay_exec(vm_id: str) -> None:
    """`true` through the sandbox's exec relay, as `matchlock exec` does (without its Python start-up)."""
    with relay_client.connect(vm_id) as relay:
        relay.send(rp.ExecAction("true", "", "", rp.EXEC_PIPE).encode())
        relay.send(rp.Stdin(b"").encode())
        while replies := relay.receive():
            for reply in replies:
                if isinstance(reply, rp.Exited):
                    assert reply.code == 0, reply
                    return
                assert not isinstance(reply, rp.ExecReply), reply
    raise AssertionError(f"{vm_id} closed the relay before `true` exited")


def _cli(*args: str) -> str:
    return subprocess.run([MATCHLOCK, *args], capture_output=True, text=True, check=True).stdout


def _to_first_execs(start: Callable[[], list[str]]) -> tuple[float, list[str]]:
    """Seconds from `start()` (which returns VM IDs once they are up) to every one's first exec result."""
    started = time.perf_counter()
    ids = start()
    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(_relay_exec, ids))
    return time.perf_counter() - started, ids


def _cli_fork_runs(runs: int, forks: int, no_network: bool) -> tuple[list[float], list[float]]:
    """Through the CLI: `forks` x `run -d` at once (the baseline), and `fork -n forks` of a running sandbox."""
    flags = ["--disk-size", "512"] + (["--no-network"] if no_network else [])

    def run_detached() -> str:
        return _cli("run", "-d", *flags).strip()

    def fresh() -> list[str]:
        with ThreadPoolExecutor(forks) as pool:
            return list(pool.map(lambda _: run_detached(), range(forks)))

    source = run_detached()
    fresh_samples, fork_samples = [], []
    try:
        for _ in range(runs):
            for samples, start in (
                (fresh_samples, fresh),
                (fork_samples, lambda: _cli("fork", source, "-n", str(forks)).split()),
            ):
                elapsed, ids = _to_first_execs(start)
                samples.append(elapsed)
                assert len(ids) == forks, ids
                for vm_id in ids:
                    _cli("rm", "-f", vm_id)
    finally:
        _cli("rm", "-f", source)
    return fresh_samples, fork_samples


def fork_steps(source: str, name: str, forks: int) -> tuple[list, tuple[float, ...]]:
    """`matchlock fork source -n forks` (cli/snapshot.py) step by step in this process, then every clone's
    first exec: the owners, and the instants started, preloaded, saved, owners up, first execs done.
    Call with no other thread running: the owners are forked from this process."""
    from matchlock.cli import launcher
    from matchlock.cli.snapshot import _has_network, _remove_snapshot

    started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # as `fork`: the owners' modules load while the source saves
        saving = pool.submit(relay_client.control, source, "snapshot", name=name, mode="full")
        launcher.preload()
        preloaded = time.perf_counter()
        saving.result()
    saved = time.perf_counter()
    args = ["run", "--from-snapshot", name, "-d", *([] if _has_network(name) else ["--no-network"])]
    owners = launcher.wait(launcher.start(args, forks))
    up = time.perf_counter()
    _remove_snapshot(name)
    assert all(owner.vm_id for owner in owners), [owner.error for owner in owners]
    with ThreadPoolExecutor(forks) as pool:
        list(pool.map(_relay_exec, [owner.vm_id for owner in owners]))
    return owners, (started, preloaded, saved, up, time.perf_counter())


def fork_timeline(runs: int, forks: int, no_network: bool) -> None:
    """Where `matchlock fork SRC -n forks` goes: its steps (cli/snapshot.py) one by one, timed. Run in a
    process of its own (`--timeline`): the owners are forked from it, which needs no other thread."""
    from matchlock.cli import launcher

    ready: dict[int, float] = {}
    wait_ready = launcher._wait_ready

    def timed_wait(owner: launcher.Owner) -> None:
        wait_ready(owner)
        ready[owner.pid] = time.perf_counter()

    launcher._wait_ready = timed_wait
    source = _cli("run", "-d", "--disk-size", "512", *(["--no-network"] if no_network else [])).strip()
    phases: dict[str, list[float]] = {"snapshot": [], "first owner up": [], "last owner up": [], "first execs": []}
    try:
        for run in range(runs):
            owners, (started, _, saved, up, done) = fork_steps(source, f"bench-timeline-{run}", forks)
            ids = [owner.vm_id for owner in owners]
            phases["snapshot"].append(saved - started)
            phases["first owner up"].append(min(ready[o.pid] for o in owners) - saved)
            phases["last owner up"].append(up - saved)
            phases["first execs"].append(done - up)
            for vm_id in ids:
                _cli("rm", "-f", vm_id)
    finally:
        _cli("rm", "-f", source)
    total = sum(median_ms(phases[key]) for key in ("snapshot", "last owner up", "first execs"))
    print(f"  `fork -n {forks}` timeline (medians): " + "; ".join(f"{k} {median_ms(v):.0f} ms" for k, v in phases.items())
          + f" (owners up counted from the snapshot's end, first execs from the last owner up; sum {total:.0f} ms)")  # fmt: skip


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


async def main(runs: int, forks: int, no_network: bool, fork_only: bool) -> None:
    config = SandboxConfig(
        image="matchlock/busybox:builtin",
        resources=Resources(disk_size_mb=512),
        network=NetworkConfig(no_network=no_network),
    )
    store = StateStore()
    source = await Sandbox.create(config, store=store)
    await source.exec(ExecSpec("sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &"))
    try:
        if not fork_only:
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

        print(f"4. fork of {forks} to every clone's first exec, against {forks} fresh sandboxes at once")
        fresh, forked, saves, clones = [], [], [], []
        for run in range(runs):
            for clone in clones:
                await clone.aclose()
            started = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(_create_to_exec(config, store)) for _ in range(forks)]
            fresh.append(time.perf_counter() - started)
            for task in tasks:
                await task.result()[1].aclose()
            started = time.perf_counter()
            record = await snapshots.create(source, store, f"bench-fork-{run}", "full")
            saves.append(time.perf_counter() - started)
            restore = snapshots.Restore.load(store, record.name)
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(_create_to_exec(config, store, restore)) for _ in range(forks)]
            forked.append(time.perf_counter() - started)
            clones = [task.result()[1] for task in tasks]
            records.remove(store, record.name)
        print(f"  in one process: baseline {forks} fresh from the template {median_ms(fresh):7.1f} ms; "
              f"fork {median_ms(forked):7.1f} ms ({median_ms(forked) / median_ms(fresh):.2f}x; "
              f"its snapshot {median_ms(saves):.1f} ms)")  # fmt: skip
        cli_fresh, cli_forked = _cli_fork_runs(runs, forks, no_network)
        print(f"  CLI: baseline {forks} x `run -d` at once {median_ms(cli_fresh):7.1f} ms; "
              f"`fork -n {forks}` {median_ms(cli_forked):7.1f} ms ({median_ms(cli_forked) / median_ms(cli_fresh):.2f}x), "
              "each to every sandbox's first exec result")  # fmt: skip

        for clone in clones if fork_only else ():
            await clone.aclose()
        if fork_only:
            return
        print("5. memory of each QEMU (idle)")
        await asyncio.sleep(2)
        for label, box in (("source", source), *((f"clone {i + 1}", c) for i, c in enumerate(clones))):
            assert box.machine is not None and box.machine.pid is not None
            rollup = smaps_rollup(box.machine.pid)
            print(f"  {label:8s} RSS {rollup['Rss'] / 1024:6.1f} MiB  PSS {rollup['Pss'] / 1024:6.1f} MiB")
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
    parser.add_argument("--fork-only", action="store_true", help="Only item 4 (fork against fresh starts).")
    parser.add_argument("--timeline", action="store_true", help="Only the steps of `fork` (part of item 4).")
    args = parser.parse_args()
    with private_state_dir():
        if args.timeline:
            fork_timeline(args.runs, args.forks, args.no_network)
        else:
            asyncio.run(main(args.runs, args.forks, args.no_network, args.fork_only))
            # Item 4's `fork` timeline, once this process's VMs are gone: no more than 1 + N at once.
            timeline = [sys.executable, __file__, "--timeline", "--runs", str(args.runs), "--forks", str(args.forks)]
            subprocess.run(timeline + (["--no-network"] if args.no_network else []), check=True)
