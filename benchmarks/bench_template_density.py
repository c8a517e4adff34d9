"""Sandboxes started from one boot template: their memory, and how long snapshots of them take (issue 14).

In one run:
(a) N idle sandboxes (`matchlock run -d`) from the same template: the PSS of every process, the total,
    and what PSS cannot see: memfd pages no process maps, and the template RAM file's pages in the page
    cache (shared by every sandbox of that template, and reclaimable);
(b) `matchlock snapshot create` of one of them, full and filesystem: wall time of the command.

Usage: .venv/bin/python benchmarks/bench_template_density.py [--sandboxes N] [--runs N] [--settle S]
(hold /tmp/matchlock-vm.lock; the machine has 2 cores: keep N <= 4).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from bench_density import MATCHLOCK, _matchlock, _measure, _mib
from benchstate import private_state_dir
from timing import median_ms

from matchlock.vm import checkpoint, snapshot


def page_cache_kib(path: Path) -> int:
    """Resident page-cache KiB of `path` (util-linux fincore)."""
    proc = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "-o", "RES", str(path)], capture_output=True, text=True
    )
    return int(proc.stdout.split()[0]) // 1024 if proc.returncode == 0 and proc.stdout.strip() else 0


def template_ram_files() -> list[Path]:
    return sorted(snapshot.templates_dir().glob(f"*/{checkpoint.RAM_FILE}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sandboxes", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring")
    args = parser.parse_args()
    with private_state_dir():
        _matchlock("run", "--", "true", env={})  # builds the template
        ids = [_matchlock("run", "-d", env={}).strip() for _ in range(max(1, args.sandboxes))]
        try:
            time.sleep(args.settle)
            print(f"(a) {len(ids)} idle sandboxes from one template")
            total, hidden = _measure(ids)
            print(f"  total PSS {_mib(total)} MiB; per sandbox {_mib(total / len(ids))} MiB")
            print(f"  + memfd pages in no process's mappings {_mib(hidden)} MiB")
            print("  template RAM files in the page cache (shared by their sandboxes, reclaimable):")
            for path in template_ram_files():
                print(f"    {_mib(page_cache_kib(path))} MiB  {path.parent.name}")
            print(f"(b) snapshot create of {ids[0]} (medians of {args.runs})")
            for mode in ("full", "filesystem"):
                samples = []
                for run in range(args.runs):
                    name = f"bench-{mode}-{run}"
                    started = time.perf_counter()
                    _matchlock("snapshot", "create", ids[0], "--name", name, "--mode", mode, env={})
                    samples.append(time.perf_counter() - started)
                    _matchlock("snapshot", "rm", name, env={})
                print(f"  {mode:10s} {median_ms(samples):7.0f} ms  {[round(s, 3) for s in samples]}")
        finally:
            for vm in ids:
                subprocess.run([MATCHLOCK, "kill", vm], capture_output=True, timeout=60)
                subprocess.run([MATCHLOCK, "rm", vm], capture_output=True, timeout=60)


if __name__ == "__main__":
    main()
