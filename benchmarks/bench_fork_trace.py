"""Where one `matchlock fork SRC -n N` goes, step by step, inside every process (issue 14 item 3).

`bench_snapshot_fork.py --timeline` times the phases of `fork` from outside (snapshot, owners up,
first execs). This prints, for one fork, the same phases and then the `MATCHLOCK_DEBUG_TIMING` marks
of each forked owner up to its readiness (image, namespace and upper disk, QEMU's restore, the
handshake with the woken guest) and the source owner's snapshot steps (park, memory save, disk copy),
all on one clock: the instant this script started.

Usage: .venv/bin/python benchmarks/bench_fork_trace.py [--forks N] [--no-network]
(1 + N VMs at once; wrap it in the VM slot lock like the other benchmarks).
"""

from __future__ import annotations

import argparse
import os
import time

# Before matchlock's imports: util/trace.py reads it once, and the owners inherit it (the same clock).
os.environ["MATCHLOCK_DEBUG_TIMING"] = f"{time.perf_counter():.6f}"

from bench_snapshot_fork import _cli, fork_steps  # noqa: E402
from benchstate import private_state_dir  # noqa: E402

from matchlock.cli import launcher  # noqa: E402
from matchlock.state.store import StateStore  # noqa: E402


def _owner_marks(owner: launcher.Owner, wait: float = 5.0) -> str:
    """What the owner wrote to its error pipe before it was ready (its marks): the pipe closes then."""
    deadline = time.monotonic() + wait
    while not owner._stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    return b"".join(owner._stderr).decode(errors="replace").strip()


def trace_fork(forks: int, no_network: bool) -> None:
    source = _cli("run", "-d", "--disk-size", "512", *(["--no-network"] if no_network else [])).strip()
    ids: list[str] = []
    try:
        owners, (started, preloaded, saved, up, done) = fork_steps(source, f"bench-trace-{os.getpid()}", forks)
        ids = [owner.vm_id for owner in owners]
        print(f"`fork -n {forks}`: preload {(preloaded - started) * 1000:.0f} ms, snapshot (with the preload) "
              f"{(saved - started) * 1000:.0f} ms, owners up {(up - saved) * 1000:.0f} ms, "
              f"first execs {(done - up) * 1000:.0f} ms; total {(done - started) * 1000:.0f} ms")  # fmt: skip
        for owner in owners:
            print(f"--- owner {owner.vm_id}\n{_owner_marks(owner)}")
        store = StateStore()
        try:
            log = (store.vm_dir(source) / "logs" / "vm.log").read_text(errors="replace")
        finally:
            store.close()
        print(f"--- source {source} (its owner's marks in vm.log)")
        print("\n".join(line for line in log.splitlines() if line.startswith("[timing]") and "snapshot" in line))
    finally:
        for vm_id in [*ids, source]:
            _cli("rm", "-f", vm_id)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forks", type=int, default=4)
    parser.add_argument("--no-network", action="store_true")
    options = parser.parse_args()
    with private_state_dir():
        trace_fork(options.forks, options.no_network)
