"""VFS throughput in one VM: a host_fs mount against the guest's own ext4 upper and the agent channel.

Bulk: `dd` of SIZE MiB written (with fsync) and read back (after dropping the guest's page cache;
the read step includes the drop and the rm) through the mount, and on the upper disk; the agent
channel's rate is the same bytes streamed to the host as exec output. Metadata: untar FILES small
files, then `find` + `stat` of all of them, in the mount and in the upper. Ratios are from this one
run. Each step is timed on the host around one exec, so every number includes one exec round trip
(tens of ms). For the mount, the host's own share of each request's time is printed too.

Usage: .venv/bin/python benchmarks/bench_vfs.py [--mib 64] [--files 2000]   (hold /tmp/matchlock-vm.lock)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchstate import private_state_dir  # noqa: E402

IMAGE = "matchlock/busybox:builtin"


HOST_SHARE: dict[str, tuple[int, float]] = {}  # step -> (VFS requests, host seconds serving them)


async def _timed(box, command: str, step: str = "") -> float:
    from matchlock.sandbox.sandbox import ExecSpec

    server = box.vfs.server
    served, busy = server.served, server.service_seconds
    started = time.perf_counter()
    result = await box.exec(ExecSpec(command))
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise RuntimeError(f"{command!r} failed: {result.stderr.decode(errors='replace')[-500:]}")
    if step:
        HOST_SHARE[step] = (server.served - served, server.service_seconds - busy)
    return elapsed


def _small_files_tar(path: Path, files: int) -> None:
    with tarfile.open(path, "w") as tar:
        for n in range(files):
            body = f"file {n}\n".encode() * (1 + n % 20)
            info = tarfile.TarInfo(f"tree/d{n % 50}/f{n}.txt")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


async def run(mib: int, files: int) -> dict[str, float]:
    from matchlock.api.config import NetworkConfig, SandboxConfig
    from matchlock.api.vfs import MountConfig, VFSConfig
    from matchlock.sandbox.sandbox import Sandbox

    with tempfile.TemporaryDirectory(prefix="matchlock-vfs-bench-") as share:
        _small_files_tar(Path(share) / "small.tar", files)
        vfs = VFSConfig(workspace="/workspace", mounts={"/workspace/h": MountConfig("host_fs", share)})
        # Privileged: the guest may drop its page cache between the write and the read.
        config = SandboxConfig(image=IMAGE, privileged=True, network=NetworkConfig(no_network=True), vfs=vfs)
        box = await Sandbox.create(config)
        try:
            drop = "sync; echo 3 > /proc/sys/vm/drop_caches"
            r: dict[str, float] = {}
            for name, where in (("mount", "/workspace/h"), ("upper", "/root")):
                target = f"{where}/untar"
                steps = {
                    "write": f"dd if=/dev/zero of={where}/big bs=1M count={mib} conv=fsync",
                    "read": f"{drop}; dd if={where}/big of=/dev/null bs=1M; rm {where}/big",
                    "untar": f"mkdir -p {target} && tar xf /workspace/h/small.tar -C {target}",
                    "find_stat": f"{drop}; find {target} -type f -exec stat -c %s {{}} + > /dev/null",
                }
                for step, command in steps.items():
                    r[f"{name}_{step}"] = await _timed(box, command, f"{name}_{step}")
            r["channel"] = await _timed(box, f"dd if=/dev/zero bs=1M count={mib} 2>/dev/null")
        finally:
            await box.aclose()
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--files", type=int, default=2000)
    args = parser.parse_args()
    with private_state_dir():
        r = asyncio.run(run(args.mib, args.files))
    rate = {k: args.mib / v for k, v in r.items() if k.endswith(("_write", "_read")) or k == "channel"}
    print(f"bulk, {args.mib} MiB (MiB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))
    print(f"  mount write / channel: {rate['mount_write'] / rate['channel']:.2f}x   "
          f"mount read / channel: {rate['mount_read'] / rate['channel']:.2f}x   (target >= 0.5x)")  # fmt: skip
    print(f"  mount write / upper: {rate['mount_write'] / rate['upper_write']:.2f}x   "
          f"mount read / upper: {rate['mount_read'] / rate['upper_read']:.2f}x")  # fmt: skip
    for step in ("untar", "find_stat"):
        mount, upper = r[f"mount_{step}"], r[f"upper_{step}"]
        print(f"metadata {step} of {args.files} files: mount {mount:.2f} s, upper {upper:.2f} s, "
              f"ratio {mount / upper:.2f}x (target <= 3x)")  # fmt: skip
    for step, (requests, busy) in HOST_SHARE.items():
        if step.startswith("mount") and requests:
            print(f"  {step}: {requests} VFS requests, host service {busy / requests * 1e6:.0f} us each, "
                  f"{r[step] / requests * 1e3:.2f} ms of wall time each")  # fmt: skip


if __name__ == "__main__":
    main()
