"""Our VFS against virtio-fs (QEMU's own virtiofsd, the mechanism peers use) and the guest's ext4, in one VM.

One sandbox gets the same host directory twice over: a `host_fs` mount through our VFS (what `-v` makes),
and virtio-fs shares served by `/usr/lib/qemu/virtiofsd` children of this process, one with `cache=auto`
(the default) and, unless `--no-always`, one with `cache=always`. The same workloads (the scripts of
bench_vfs.py) run in each and in the guest's own ext4 upper: bulk write and read, untar of FILES small
files (a git repository), find + stat of all, the first git status (it refreshes the index) and git status.

Kernel: the tuned kernel has no CONFIG_VIRTIO_FS (and changing its config rebuilds it for everyone), so
the VM boots Debian's cloud kernel, the project's fallback, with the fallback initramfs plus `virtiofs.ko`
from the same kernel package, given as MATCHLOCK_KERNEL/MATCHLOCK_KERNEL_INITRD. Every target is measured
on that one kernel. The shares are `vhost-user-fs-device`s (virtio-mmio: microvm has no PCI); vhost-user
needs guest RAM in shared memory, which sandboxes already have (a memfd, share=on), and modern virtio:
`-global virtio-mmio.force-legacy=false` applies to every device of the VM, so to every target alike.
The VM boots cold (MATCHLOCK_NO_TEMPLATES): a vhost-user-fs device cannot be restored from a template.
After the workloads, a probe shows what root in the guest sees and what the host sees for created,
chowned and hard-linked files in each target.

Each exec runs in its own mount namespace, so a virtio-fs target's command mounts the share first, then
times the workload in the guest (GUEST_TIMED), so no target pays for the mount or the exec's round trip.
(It was timed on the host, from a printed marker's arrival to the exit's: that measures when the guest
agent gets to forward the marker, not the workload; one run gave ~0.01 s for everything.)

Needs root (virtiofsd's namespace sandbox and its uid switching). Fails with a message if virtiofsd, the
fallback kernel or its virtiofs module is missing.

Usage: .venv/bin/python benchmarks/bench_virtiofs.py [--mib 32] [--files 500] [--no-always]
       (hold /tmp/matchlock-vm.lock)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vfs  # noqa: E402
from benchstate import private_state_dir  # noqa: E402

from support.cli import MATCHLOCK  # noqa: E402 - bench_vfs put tests/ on the path
from support.git_image import git_image  # noqa: E402

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
MODULE = "virtiofs"
WORKLOADS = ("write", "read", "untar", "find_stat", "git_setup", "git_status")
LABELS = {
    "write": "bulk write {mib} MiB",
    "read": "bulk read {mib} MiB",
    "untar": "untar {files} files",
    "find_stat": "find + stat {files}",
    "git_setup": "first git status (untimed in bench_vfs)",
    "git_status": "git status",
}


class BenchError(Exception):
    """A missing prerequisite or a failed step: printed as one message, exit status 1."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    guest_dir: str  # where the workloads run in the guest
    host_dir: Path | None  # the same directory seen from the host (None: the guest's own ext4)
    mount: str = ""  # a command that mounts the share in the exec's own mount namespace


def virtiofs_target(name: str, tag: str, share: Path) -> Target:
    """The virtio-fs device `tag`, serving `share`/`tag`, mounted at /mnt/`tag` in each exec."""
    return Target(name, f"/mnt/{tag}/{tag}", share / tag,
                  mount=f"mkdir -p /mnt/{tag} && busybox mount -t virtiofs {tag} /mnt/{tag} && ")  # fmt: skip


# --------------------------------------------------------------------------- the kernel


def virtiofs_kernel(work: Path) -> tuple[Path, Path]:
    """(vmlinuz, initrd): the cached fallback kernel, and its initramfs with virtiofs.ko loaded last."""
    from matchlock.kernel import fallback
    from matchlock.util import debian

    kernel = fallback.cached_fallback() or fallback.build_fallback()
    build = json.loads((kernel.vmlinuz.parent / "build.json").read_text())
    package, loaded = build["package"], list(build["modules"])
    deb = debian.download([package])[package]
    unpacked = work / "kernel"
    unpacked.mkdir()
    # Only the one module: the whole package is ~100 MB.
    tar = subprocess.run(
        f"dpkg-deb --fsys-tarfile {shlex.quote(str(deb))} | tar -x -C {shlex.quote(str(unpacked))} "
        f"--wildcards '*/{MODULE}.ko*'",
        shell=True, capture_output=True, text=True,
    )  # fmt: skip
    found = sorted(unpacked.rglob(f"{MODULE}.ko*"))
    if tar.returncode != 0 or not found:
        raise BenchError(
            f"{package} ({deb}) has no {MODULE}.ko: {tar.stderr.strip() or 'not in the package'}; "
            "virtio-fs cannot be measured on this kernel (the tuned kernel has no CONFIG_VIRTIO_FS either)"
        )
    depends = subprocess.run(["modinfo", "-F", "depends", str(found[0])], capture_output=True, text=True)
    missing = [name for name in depends.stdout.strip().split(",") if name and name not in loaded]
    if depends.returncode != 0 or missing:
        raise BenchError(
            f"{found[0].name} needs modules the fallback initramfs does not load: "
            f"{missing or depends.stderr.strip()}; fix: apt-get install kmod, or add them to WANTED_MODULES"
        )
    extra = fallback.CpioWriter()
    extra.file(f"lib/modules/{MODULE}.ko", fallback.strip_module_signature(fallback.read_module(found[0])))
    extra.file("lib/modules/order", "".join(f"{name}\n" for name in [*loaded, MODULE]).encode())
    initrd = work / "initrd-virtiofs.cpio"
    # The kernel unpacks concatenated archives in order; a later file replaces an earlier one (the order).
    initrd.write_bytes(kernel.initrd.read_bytes() + extra.getvalue())
    return kernel.vmlinuz, initrd


# --------------------------------------------------------------------------- virtiofsd


@contextlib.contextmanager
def serving(argv: list[str], socket_path: Path, what: str, start_seconds: float) -> Iterator[subprocess.Popen]:
    """A vhost-user back end (`argv`) up once `socket_path` exists, logging to <socket>.log; stopped and
    reaped on exit. `what` names it in the error if it does not come up within `start_seconds`."""
    log_path = socket_path.with_suffix(".log")
    log = open(log_path, "wb")  # noqa: SIM115 - closed below, after the process
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_seconds
        while not socket_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{what} did not start (exit {process.poll()}): {_tail(log_path)}")
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def virtiofsd(source: Path, socket_path: Path, cache: str) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """One virtiofsd serving `source` on `socket_path`."""
    argv = [str(VIRTIOFSD), f"--socket-path={socket_path}", "-o", f"source={source}", "-o", f"cache={cache}"]
    return serving(argv, socket_path, f"{VIRTIOFSD} -o cache={cache}", 10)


def virtiofs_qemu_args(shares: dict[str, Path]) -> tuple[str, ...]:
    """QEMU arguments for one vhost-user-fs device per share (tag -> virtiofsd socket)."""
    # libvhost-user (virtiofsd) refuses legacy virtio, which is what microvm's virtio-mmio defaults to;
    # this makes every virtio-mmio device in the VM modern (virtio 1.0), for every target alike.
    args = ["-global", "virtio-mmio.force-legacy=false"]
    for index, (tag, socket_path) in enumerate(shares.items()):
        args += ["-chardev", f"socket,id=virtiofs{index},path={socket_path}"]
        args += ["-device", f"vhost-user-fs-device,chardev=virtiofs{index},tag={tag}"]
    return tuple(args)


def _sandbox_class(extra_qemu_args: tuple[str, ...]):
    """A Sandbox whose QEMU also gets `extra_qemu_args` (the product has no option for devices of our own)."""
    from matchlock.sandbox.sandbox import Sandbox

    class WithVirtioFS(Sandbox):
        async def _start_machine(self, spec, *, wake):
            spec = dataclasses.replace(spec, extra_args=(*spec.extra_args, *extra_qemu_args))
            await super()._start_machine(spec, wake=wake)

    return WithVirtioFS


# --------------------------------------------------------------------------- the workloads


STEP_TIMEOUT = 240.0  # seconds; a dead virtiofsd leaves a guest's mount or I/O waiting forever


async def _within(awaitable, command: str, timeout: float = STEP_TIMEOUT):
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise BenchError(f"`{command[:200]}` did not finish within {timeout:g} s") from None


# `script` with its arguments, timed in the guest (after any mount): its last line is "@elapsed-ns N".
# /proc/uptime (10 ms steps) if date lacks %N.
NOW = 'now() { n=$(date +%s%N 2>/dev/null); case "$n" in *N*|"") read u _ < /proc/uptime; echo "${u%.*}${u#*.}0000000";; *) echo "$n";; esac; }'
GUEST_TIMED = NOW + '; t0=$(now); sh -c "$0" sh "$@"; rc=$?; t1=$(now); echo "@elapsed-ns $((t1 - t0))"; exit $rc'


async def timed(box, target: Target, script: str, *args: str, timeout: float = STEP_TIMEOUT) -> float:
    """Seconds `script` took, timed in the guest; raises with the output on failure."""
    from matchlock.sandbox.sandbox import ExecSpec

    command = f"{target.mount}sh -c {shlex.quote(GUEST_TIMED)} {shlex.quote(script)} {shlex.join(args)}"
    result = await _within(box.exec(ExecSpec(command)), command, timeout)
    out = result.stdout.decode(errors="replace")
    found = [line.split()[1] for line in out.splitlines() if line.startswith("@elapsed-ns ")]
    if result.exit_code != 0 or not found:
        raise BenchError(
            f"{target.name}: `{command[:160]}...` failed (exit {result.exit_code}): "
            f"{(result.stderr.decode(errors='replace') or out).strip()[-600:]}"
        )
    return int(found[-1]) / 1e9


PROBE_SCRIPT = r"""
mkdir -p "$1" && cd "$1" || exit 1
echo x > plain; echo "create=$?"
echo x > owned && busybox chown 1234:5678 owned; echo "chown=$?"
busybox chmod 640 owned; echo "chmod=$?"
busybox ln -s plain link; echo "symlink=$?"
busybox ln plain hard; echo "hardlink=$?"
stat -c '%n %u:%g %a links=%h ino=%i' plain hard owned
"""


async def probe(box, target: Target) -> list[str]:
    """What root in the guest can do to owners, modes and links there, and what the host then sees."""
    from matchlock.sandbox.sandbox import ExecSpec

    where = f"{target.guest_dir}/probe"
    command = f"{target.mount}sh -c {shlex.quote(PROBE_SCRIPT)} sh {shlex.quote(where)}"
    result = await _within(box.exec(ExecSpec(command)), command)
    lines = [f"guest: {' '.join(result.stdout.decode(errors='replace').split())}"]
    if result.stderr.strip():
        lines.append(f"guest errors: {' | '.join(result.stderr.decode(errors='replace').strip().splitlines())}")
    if target.host_dir is not None:
        seen = []
        for name in ("plain", "hard", "owned"):
            try:
                st = (target.host_dir / "probe" / name).stat()
                seen.append(
                    f"{name} {st.st_uid}:{st.st_gid} {st.st_mode & 0o7777:o} links={st.st_nlink} ino={st.st_ino}"
                )
            except OSError as exc:
                seen.append(f"{name} {exc.strerror}")
        lines.append(f"host:  {'  '.join(seen)}")
    return lines


def _tail(path: Path) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-4:])
    except OSError as exc:
        return f"no log ({exc.strerror})"


def host_file_count(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


async def measure(box, targets: list[Target], mib: int, files: int) -> dict[str, dict[str, float]]:
    """Workload by workload, every target in turn (so a change in the host's load touches all alike)."""
    seconds: dict[str, dict[str, float]] = {target.name: {} for target in targets}
    for step in WORKLOADS:
        for target in targets:
            seconds[target.name][step] = await timed(box, target, *workload(step, target.guest_dir, mib))
            print(f"  {step:<10} {target.name:<16} {seconds[target.name][step]:7.2f} s", file=sys.stderr, flush=True)
            if step == "untar":
                check_untar(target, files)
    return seconds


def workload(step: str, where: str, mib: int) -> tuple[str, ...]:
    """bench_vfs's script for one of WORKLOADS and its arguments, working in the guest's `where`."""
    tree = f"{where}/untar/tree"
    return {
        "write": (bench_vfs.BULK_WRITE_SCRIPT, f"{where}/big", str(mib)),
        "read": (bench_vfs.BULK_READ_SCRIPT, f"{where}/big"),  # and removes it
        "untar": (bench_vfs.UNTAR_SCRIPT, f"{where}/untar", "/root/tree.tar"),
        "find_stat": (bench_vfs.FIND_STAT_SCRIPT, tree),
        "git_setup": (bench_vfs.GIT_SETUP_SCRIPT, tree),
        "git_status": (bench_vfs.GIT_STATUS_SCRIPT, tree),
    }[step]


def check_untar(target: Target, files: int) -> None:
    """After the untar, a shared target's host directory must hold every file the guest wrote."""
    if target.host_dir is not None:
        count = host_file_count(target.host_dir / "untar" / "tree")
        if count < files:
            raise BenchError(f"{target.name}: the host sees {count} files after the untar, not {files}")


async def run(mib: int, files: int, caches: list[str], image: str) -> tuple[dict[str, dict[str, float]], list[str]]:
    from matchlock.api.config import NetworkConfig, SandboxConfig
    from matchlock.api.vfs import MountConfig, VFSConfig
    from matchlock.kernel.resolve import ENV_INITRD, ENV_KERNEL
    from matchlock.vm.snapshot import DISABLE_ENV

    with tempfile.TemporaryDirectory(prefix="matchlock-virtiofs-bench-") as tmp:
        work = Path(tmp)
        vmlinuz, initrd = virtiofs_kernel(work)
        tarball = work / "tree.tar"
        bench_vfs.small_files_repo(tarball, files)
        share = work / "share"  # the one host directory every host-backed target lives in
        targets = [
            Target("ext4", "/root/bench", None),
            Target("ours", "/workspace/h/ours", share / "ours"),
            *(virtiofs_target(f"virtiofs {cache}", cache, share) for cache in caches),
        ]
        for target in targets:
            if target.host_dir is not None:
                target.host_dir.mkdir(parents=True)
        os.environ[ENV_KERNEL], os.environ[ENV_INITRD] = str(vmlinuz), str(initrd)
        # Cold boot: vhost-user-fs cannot be migrated, so a boot template cannot be restored with it.
        os.environ[DISABLE_ENV] = "1"
        sockets = {cache: work / f"virtiofsd-{cache}.sock" for cache in caches}
        vfs = VFSConfig(workspace="/workspace", mounts={"/workspace/h": MountConfig("host_fs", str(share))})
        # Privileged: the scripts drop the guest's page cache, and mount(2) needs CAP_SYS_ADMIN.
        config = SandboxConfig(image=image, privileged=True, network=NetworkConfig(no_network=True), vfs=vfs)
        with contextlib.ExitStack() as daemons:  # left after the VM: virtiofsd outlives its QEMU
            for cache, socket_path in sockets.items():
                daemons.enter_context(virtiofsd(share, socket_path, cache))
            box = await _sandbox_class(virtiofs_qemu_args(sockets)).create(config)
            try:
                await box.write_file("/root/tree.tar", tarball.read_bytes())  # a local tarball for every target
                await timed(box, targets[0], 'mkdir -p "$1"', targets[0].guest_dir)
                for target in targets:  # every share mounts, or we fail now rather than mid-run
                    await timed(box, target, 'test -d "$1"', target.guest_dir, timeout=60)
                seconds = await measure(box, targets, mib, files)
                notes = []
                for target in targets:
                    notes += [f"{target.name}:", *(f"  {line}" for line in await probe(box, target))]
                notes.append(f"kernel: {vmlinuz} (+ {MODULE}.ko), {box.boot_ms} ms to boot")
            except BenchError as exc:
                logs = [f"virtiofsd cache={c}: {_tail(sock.with_suffix('.log'))}" for c, sock in sockets.items()]
                raise BenchError("\n  ".join([str(exc), *logs])) from None
            finally:
                await box.aclose()
    return seconds, notes


def table(seconds: dict[str, dict[str, float]], mib: int, files: int) -> str:
    """Times (rates for bulk), then time ratios: above 1 is slower than what it is compared with."""
    names = list(seconds)
    virtiofs = [name for name in names if name.startswith("virtiofs")]
    ratios = [(name, "ext4") for name in names if name != "ext4"] + [("ours", name) for name in virtiofs]
    head = ["workload", *names, *(f"{a}/{b}" for a, b in ratios)]
    rows = [head]
    for step in WORKLOADS:
        bulk = step in ("write", "read")
        cells = [LABELS[step].format(mib=mib, files=files)]
        for name in names:
            value = seconds[name][step]
            cells.append(f"{mib / value:.1f} MiB/s" if bulk else f"{value:.2f} s")
        cells += [f"{seconds[a][step] / seconds[b][step]:.2f}x" for a, b in ratios]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def check_prerequisites() -> None:
    if not os.access(VIRTIOFSD, os.X_OK):
        raise BenchError(f"{VIRTIOFSD} is missing; fix: apt-get install qemu-system-common (QEMU 7.2 ships it)")
    if os.geteuid() != 0:
        raise BenchError("virtiofsd needs root here (its namespace sandbox and per-request uid switching); run as root")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--no-always", action="store_true", help="skip the cache=always share")
    args = parser.parse_args()
    caches = ["auto"] if args.no_always else ["auto", "always"]
    started = time.monotonic()
    try:
        check_prerequisites()
        with private_state_dir():
            seconds, notes = asyncio.run(run(args.mib, args.files, caches, git_image(MATCHLOCK)))
    except BenchError as exc:
        sys.exit(f"bench_virtiofs: {exc}")
    print(f"one VM, {args.mib} MiB bulk, {args.files} small files; times taken in the guest around each workload")
    print("ratios compare times: 2.00x = takes twice as long (for bulk, half the MiB/s)")
    print(table(seconds, args.mib, args.files))
    print("ownership and links (root in the guest: create; chown 1234:5678; chmod 640; symlink; hard link):")
    print("\n".join(f"  {line}" for line in notes))
    print(f"whole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
