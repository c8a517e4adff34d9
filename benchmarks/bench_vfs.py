"""VFS speed in one VM: a mount against the guest's own ext4 upper (metadata) and the agent channel (bulk).

Metadata (issue 12's workloads): untar FILES small files (a git repository: the files plus a packed
.git made on the host), `find` + `stat` of all of them, and `git status` in that repository, each in
the mount and in the upper (/root), ratios from this one run. `find` + `stat` starts cold (the guest's
caches dropped). `git status` runs once first, cold, because the index's stat data was recorded on
the host and the first status re-hashes every file (printed, not in the ratio); the timed one is the
next, warm, as one runs it again while working; `git_status_cold` is that again after a cache drop.
Bulk: `dd` of MIB MiB written (with fsync) through the mount and read back after dropping the guest's
page cache, against the same bytes streamed to the host as exec output (the agent channel, guest to
host) and, for reads, also as exec stdin (host to guest, the direction READ data travels), RUNS
times in the same VM, so the spread shows. Each step is timed on the host around one exec, so every
number includes one exec round trip (tens of ms). For the mount, the VFS requests each step made
and the host's share of their time are printed too.

The workload scripts are module-level constants (`*_SCRIPT`), run as `sh -c SCRIPT sh ARG...`, so
other benchmarks (virtio-fs) can run the same ones.

Usage: .venv/bin/python benchmarks/bench_vfs.py [--files 5000] [--mib 64] [--runs 3] [--mount-type host_fs]
(hold /tmp/matchlock-vm.lock)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchstate import private_state_dir  # noqa: E402

DROP_CACHES = "sync; echo 3 > /proc/sys/vm/drop_caches"
# $1 target directory (created), $2 tarball.
UNTAR_SCRIPT = 'mkdir -p "$1" && tar xf "$2" -C "$1"'
# $1 directory. Cold: the guest's dentry, inode and page caches are dropped first (needs privileged).
FIND_STAT_SCRIPT = DROP_CACHES + '; find "$1" -type f -exec stat -c %s {} + > /dev/null'
# $1 repository. The first status (after a cache drop) also refreshes the index's stat data for this
# filesystem, re-hashing every file; the timed one is the next, as one runs it again while working.
GIT_SETUP_SCRIPT = DROP_CACHES + '; cd "$1" && git -c safe.directory="*" status --porcelain > /dev/null'
GIT_STATUS_SCRIPT = 'cd "$1" && test -z "$(git -c safe.directory="*" status --porcelain)"'
GIT_STATUS_COLD_SCRIPT = DROP_CACHES + "; " + GIT_STATUS_SCRIPT  # the same, after dropping the caches
# $1 file, $2 MiB.
BULK_WRITE_SCRIPT = 'dd if=/dev/zero of="$1" bs=1M count="$2" conv=fsync 2>/dev/null'
# $1 file (removed after).
BULK_READ_SCRIPT = DROP_CACHES + '; dd if="$1" of=/dev/null bs=1M 2>/dev/null; rm "$1"'
# The agent channel's rates: $1 MiB to the exec's stdout (guest to host), and stdin read to its end.
CHANNEL_SCRIPT = 'dd if=/dev/zero bs=1M count="$1" 2>/dev/null'
CHANNEL_IN_SCRIPT = "cat > /dev/null"

# step -> (requests, host service seconds, the same from each frame's read, requests by op, of them with no reply)
HOST_SHARE: dict[str, tuple[int, float, float, dict[str, int], int]] = {}


def small_files_repo(tarball: Path, files: int) -> None:
    """A tarball of `tree/`: `files` small files in 50 directories, committed to a packed git repository."""
    with tempfile.TemporaryDirectory(prefix="matchlock-vfs-tree-") as tmp:
        tree = Path(tmp, "tree")
        for n in range(files):
            path = tree / f"d{n % 50}" / f"f{n}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"file {n}\n".encode() * (1 + n % 20))
        git = ["git", "-C", str(tree), "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
        for step in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "tree"], ["gc", "-q"]):
            subprocess.run([*git, *step], check=True, capture_output=True)
        with tarfile.open(tarball, "w") as tar:

            def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                return info

            tar.add(tree, arcname="tree", filter=as_root)


async def _timed(box, script: str, *args: str, step: str = "") -> float:
    from matchlock.sandbox.sandbox import ExecSpec

    server = box.vfs.server
    served, busy, turnaround = server.served, server.service_seconds, server.turnaround_seconds
    notices = getattr(server, "notices", 0)  # absent on an older server: every request counts as a round trip
    ops = dict(server.op_counts)
    started = time.perf_counter()
    result = await box.exec(ExecSpec(shlex.join(["sh", "-c", script, "sh", *args])))
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise RuntimeError(f"{script!r} {args} failed: {result.stderr.decode(errors='replace')[-500:]}")
    if step:
        by_op = {op: n - ops.get(op, 0) for op, n in server.op_counts.items() if n - ops.get(op, 0)}
        HOST_SHARE[step] = (server.served - served, server.service_seconds - busy,
                            server.turnaround_seconds - turnaround, by_op,
                            getattr(server, "notices", 0) - notices)  # fmt: skip
    return elapsed


async def _channel_in(box, mib: int) -> float:
    """MIB MiB sent to a command's stdin (host to guest, the direction a READ reply travels)."""
    from matchlock.sandbox.sandbox import ExecSpec

    chunk = bytes(1 << 20)
    started = time.perf_counter()
    process = box.start_exec(ExecSpec(CHANNEL_IN_SCRIPT), stdin=True)
    for _ in range(mib):
        await process.write(chunk)
    process.close_stdin()
    result = await process.wait()
    if result.exit_code != 0:
        raise RuntimeError(f"stdin to the guest failed: {result.stderr!r:.300}")
    return time.perf_counter() - started


async def run(
    files: int, mib: int, runs: int, mount_type: str, cpus: float = 1.0
) -> tuple[dict[str, float], list[dict[str, float]]]:
    from matchlock.api.config import NetworkConfig, Resources, SandboxConfig
    from matchlock.api.vfs import MountConfig, VFSConfig
    from matchlock.sandbox.sandbox import Sandbox
    from support.cli import MATCHLOCK
    from support.git_image import git_image

    image = git_image(MATCHLOCK)
    with tempfile.TemporaryDirectory(prefix="matchlock-vfs-bench-") as share:
        small_files_repo(Path(share) / "tree.tar", files)
        vfs = VFSConfig(workspace="/workspace", mounts={"/workspace/h": MountConfig(mount_type, share)})
        # Privileged: the guest may drop its page cache before cold steps.
        config = SandboxConfig(
            image=image,
            resources=Resources(cpus=cpus),
            privileged=True,
            network=NetworkConfig(no_network=True),
            vfs=vfs,
        )
        box = await Sandbox.create(config)
        try:
            await _timed(box, "cp /workspace/h/tree.tar /root/tree.tar")  # a local tarball for both sides
            meta: dict[str, float] = {}
            for name, where in (("mount", "/workspace/h"), ("upper", "/root")):
                repo = f"{where}/untar/tree"
                meta[f"{name}_untar"] = await _timed(box, UNTAR_SCRIPT, f"{where}/untar", "/root/tree.tar",
                                                     step=f"{name}_untar")  # fmt: skip
                meta[f"{name}_find_stat"] = await _timed(box, FIND_STAT_SCRIPT, repo, step=f"{name}_find_stat")
                meta[f"{name}_git_setup"] = await _timed(box, GIT_SETUP_SCRIPT, repo, step=f"{name}_git_setup")
                meta[f"{name}_git_status"] = await _timed(box, GIT_STATUS_SCRIPT, repo, step=f"{name}_git_status")
                meta[f"{name}_git_status_cold"] = await _timed(box, GIT_STATUS_COLD_SCRIPT, repo,
                                                               step=f"{name}_git_status_cold")  # fmt: skip
            meta["upper_write"] = await _timed(box, BULK_WRITE_SCRIPT, "/root/big", str(mib))
            meta["upper_read"] = await _timed(box, BULK_READ_SCRIPT, "/root/big")
            bulk = []
            for _ in range(runs):
                one = {
                    "channel": await _timed(box, CHANNEL_SCRIPT, str(mib)),
                    "channel_in": await _channel_in(box, mib),
                }
                one["mount_write"] = await _timed(box, BULK_WRITE_SCRIPT, "/workspace/h/big", str(mib),
                                                  step="mount_write")  # fmt: skip
                one["mount_read"] = await _timed(box, BULK_READ_SCRIPT, "/workspace/h/big", step="mount_read")
                bulk.append(one)
            if os.environ.get("MATCHLOCK_VFS_STATS"):  # the guest daemon's own timings, from its console
                log = Path(box.console_log).read_text(errors="replace")
                print("\n".join(line for line in log.splitlines() if "matchlock-vfs: stats" in line))
        finally:
            await box.aclose()
    return meta, bulk


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mount-type", default="host_fs", choices=("host_fs", "overlay"))
    parser.add_argument("--cpus", type=float, default=1.0, help="guest vCPUs (both sides of every ratio)")
    args = parser.parse_args()
    with private_state_dir():
        started = time.perf_counter()
        meta, bulk = asyncio.run(run(args.files, args.mib, args.runs, args.mount_type, args.cpus))
    print(
        f"{args.mount_type} mount, {args.cpus:g} guest vCPUs, {os.cpu_count()} host cores, whole run {time.perf_counter() - started:.0f} s"
    )
    for step in ("untar", "find_stat", "git_status", "git_status_cold"):
        mount, upper = meta[f"mount_{step}"], meta[f"upper_{step}"]
        print(f"metadata {step} ({args.files} files): mount {mount:.2f} s, upper {upper:.2f} s, "
              f"ratio {mount / upper:.2f}x (target <= 3x)")  # fmt: skip
    print(
        f"  first (cold, re-hashing) git status: mount {meta['mount_git_setup']:.2f} s, upper {meta['upper_git_setup']:.2f} s"
    )
    rate = [{k: args.mib / v for k, v in one.items()} for one in bulk]
    upper_w, upper_r = args.mib / meta["upper_write"], args.mib / meta["upper_read"]
    print(f"bulk, {args.mib} MiB (MiB/s) per run: "
          + "; ".join(", ".join(f"{k} {v:.1f}" for k, v in r.items()) for r in rate)
          + f"; upper write {upper_w:.1f}, read {upper_r:.1f}")  # fmt: skip
    print(f"  mount write / channel: {_spread([r['mount_write'] / r['channel'] for r in rate])}  (target >= 0.5x)")
    print(f"  mount read / channel:  {_spread([r['mount_read'] / r['channel'] for r in rate])}  (target >= 0.5x)")
    print(f"  mount read / channel in (host to guest, as READ data goes): "
          f"{_spread([r['mount_read'] / r['channel_in'] for r in rate])}")  # fmt: skip
    for step, (requests, busy, turnaround, by_op, notices) in HOST_SHARE.items():
        if step.startswith("mount") and requests:
            wall = meta.get(step, bulk[-1].get(step, 0.0))
            ops = ", ".join(f"{op} {n}" for op, n in sorted(by_op.items(), key=lambda kv: -kv[1]))
            per_file = ""
            if step in ("mount_untar", "mount_find_stat"):  # round trips: the guest waits for their replies
                per_file = (
                    f", {requests / args.files:.1f} per file, {(requests - notices) / args.files:.1f} round trips"
                )
            print(f"  {step}: {requests} VFS requests ({ops}){per_file}; host service {busy / requests * 1e6:.0f} us "
                  f"each (from the frame's read: {turnaround / requests * 1e6:.0f} us), "
                  f"{wall / requests * 1e3:.2f} ms of wall time each")  # fmt: skip


if __name__ == "__main__":
    main()
