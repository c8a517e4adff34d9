"""SPIKE: our VFS served over vhost-user-fs by a Python back end (vhost_user_fs_proto.py), against QEMU's
virtiofsd (cache=auto), today's host_fs path (guest FUSE daemon + virtio-serial) and the guest's ext4.

One VM (the Debian cloud kernel + virtiofs.ko, cold boot, as bench_virtiofs.py does), the workload
scripts of bench_vfs.py, every target in turn per workload. Times are taken in the guest around each
workload (bench_virtiofs.timed).
Also prints the vhost-user-fs migration probe: QMP `migrate` to a file with the device attached.

Usage: .venv/bin/python benchmarks/bench_vhost_user_fs.py [--files 1000] [--mib 32]  (hold /tmp/matchlock-vm.lock)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vfs  # noqa: E402
import bench_virtiofs as bv  # noqa: E402
from benchstate import private_state_dir  # noqa: E402

from support.cli import MATCHLOCK  # noqa: E402 - bench_vfs put tests/ on the path
from support.git_image import git_image  # noqa: E402

PROTO = Path(__file__).resolve().parent / "vhost_user_fs_proto.py"


def proto(source: Path, socket_path: Path) -> contextlib.AbstractContextManager[subprocess.Popen]:
    argv = [sys.executable, str(PROTO), "--socket", str(socket_path), "--source", str(source)]
    return bv.serving(argv, socket_path, "the prototype", 20)


async def requests_served(process: subprocess.Popen, log: Path) -> int:
    """The prototype's count of requests taken off its rings (it prints one on each SIGUSR1)."""

    def counts() -> list[str]:
        return [
            line.split()[1] for line in log.read_text(errors="replace").splitlines() if line.startswith("@requests")
        ]

    seen = len(counts())
    os.kill(process.pid, signal.SIGUSR1)
    for _ in range(50):
        await asyncio.sleep(0.05)
        if len(now := counts()) > seen:
            return int(now[-1])
    raise bv.BenchError(f"the prototype (pid {process.pid}) did not report its request count: {bv._tail(log)}")


async def measure(
    box, targets: list[bv.Target], mib: int, files: int, server: subprocess.Popen, log: Path
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Workload by workload, every target in turn; the scripts are bench_vfs's. Also the prototype's requests per step."""
    seconds: dict[str, dict[str, float]] = {target.name: {} for target in targets}
    requests: dict[str, int] = {}
    for step in bv.WORKLOADS:
        for target in targets:
            before = await requests_served(server, log) if target.name == "proto" else 0
            seconds[target.name][step] = await bv.timed(box, target, *bv.workload(step, target.guest_dir, mib))
            if target.name == "proto":
                requests[step] = await requests_served(server, log) - before
            print(f"  {step:<10} {target.name:<10} {seconds[target.name][step]:7.3f} s", file=sys.stderr, flush=True)
            if step == "untar":
                bv.check_untar(target, files)
    return seconds, requests


async def migration_probe(box, work: Path) -> str:
    """What QEMU says to a migration (what a snapshot or template save is) with vhost-user-fs attached."""
    qmp = box.machine.qmp
    try:
        await qmp.execute("migrate", uri=f"exec:cat > {work / 'state.bin'}")
        await asyncio.sleep(2)
        status = await qmp.execute("query-migrate")
        return f"migrate accepted: {status}"
    except Exception as exc:  # noqa: BLE001 - the answer is the message
        return f"migrate refused: {exc}"


async def run(mib: int, files: int, image: str) -> tuple[dict[str, dict[str, float]], list[str]]:
    from matchlock.api.config import NetworkConfig, SandboxConfig
    from matchlock.api.vfs import MountConfig, VFSConfig
    from matchlock.kernel.resolve import ENV_INITRD, ENV_KERNEL
    from matchlock.vm.snapshot import DISABLE_ENV

    with tempfile.TemporaryDirectory(prefix="matchlock-vhost-user-fs-bench-") as tmp:
        work = Path(tmp)
        vmlinuz, initrd = bv.virtiofs_kernel(work)
        tarball = work / "tree.tar"
        bench_vfs.small_files_repo(tarball, files)
        share = work / "share"
        targets = [
            bv.Target("ext4", "/root/bench", None),
            bv.Target("today", "/workspace/h/ours", share / "ours"),
            bv.virtiofs_target("virtiofsd", "auto", share),
            bv.virtiofs_target("proto", "proto", share),
        ]
        for target in targets:
            if target.host_dir is not None:
                target.host_dir.mkdir(parents=True)
        os.environ[ENV_KERNEL], os.environ[ENV_INITRD] = str(vmlinuz), str(initrd)
        os.environ[DISABLE_ENV] = "1"
        sockets = {"auto": work / "virtiofsd-auto.sock", "proto": work / "proto.sock"}
        vfs = VFSConfig(workspace="/workspace", mounts={"/workspace/h": MountConfig("host_fs", str(share))})
        config = SandboxConfig(image=image, privileged=True, network=NetworkConfig(no_network=True), vfs=vfs)
        notes: list[str] = []
        with contextlib.ExitStack() as daemons:
            daemons.enter_context(bv.virtiofsd(share, sockets["auto"], "auto"))
            server = daemons.enter_context(proto(share, sockets["proto"]))
            box = await bv._sandbox_class(bv.virtiofs_qemu_args(sockets)).create(config)
            try:
                await box.write_file("/root/tree.tar", tarball.read_bytes())
                await bv.timed(box, targets[0], 'mkdir -p "$1"', targets[0].guest_dir)
                for target in targets:
                    await bv.timed(box, target, 'test -d "$1"', target.guest_dir, timeout=60)
                seconds, requests = await measure(
                    box, targets, mib, files, server, sockets["proto"].with_suffix(".log")
                )
                notes.append(
                    "proto requests per step (incl. the exec's own mount and lookups): "
                    + ", ".join(f"{k} {v}" for k, v in requests.items())
                )
                notes.append(f"boot: {box.boot_ms} ms (cold, cloud kernel)")
                notes.append(await migration_probe(box, work))
            except bv.BenchError as exc:
                logs = [f"{name}: {bv._tail(sock.with_suffix('.log'))}" for name, sock in sockets.items()]
                raise bv.BenchError("\n  ".join([str(exc), *logs])) from None
            finally:
                await box.aclose()
        notes.append(f"proto log: {bv._tail(sockets['proto'].with_suffix('.log'))}")
    return seconds, notes


def table(seconds: dict[str, dict[str, float]], mib: int, files: int) -> str:
    names = list(seconds)
    ratios = [(n, "ext4") for n in names if n != "ext4"] + [("proto", "today"), ("proto", "virtiofsd")]
    rows = [["workload", *names, *(f"{a}/{b}" for a, b in ratios)]]
    for step in bv.WORKLOADS:
        bulk = step in ("write", "read")
        cells = [bv.LABELS[step].format(mib=mib, files=files)]
        cells += [f"{mib / seconds[n][step]:.1f} MiB/s" if bulk else f"{seconds[n][step]:.3f} s" for n in names]
        cells += [f"{seconds[a][step] / seconds[b][step]:.2f}x" for a, b in ratios]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    started = time.monotonic()
    try:
        bv.check_prerequisites()
        with private_state_dir():
            seconds, notes = asyncio.run(run(args.mib, args.files, git_image(MATCHLOCK)))
    except bv.BenchError as exc:
        sys.exit(f"bench_vhost_user_fs: {exc}")
    print(f"one VM, {args.mib} MiB bulk, {args.files} small files; times taken in the guest; ratios of times")
    print(table(seconds, args.mib, args.files))
    print("\n".join(notes))
    print(f"whole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
