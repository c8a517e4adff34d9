"""Memory density (issue 14): what an idle sandbox costs, per process and per mapping, old settings against new.

For each setting (old: matchlock's defaults; new: a candidate, by default a TCG translation buffer capped
at --tb-size MiB through $MATCHLOCK_TCG_BUFFER_MB, or the environment given by --candidate), in one run:
(a) one idle sandbox from the boot template (`matchlock run -d`): PSS of QEMU, of the owner process and
    of any helper process (the owner's other children); before its first exec, and after the timed ones;
(b) `matchlock fork ID -n N` of that sandbox: PSS of every process, and the PSS the N idle clones added
    (the sum over all processes after, less before, divided by N);
and, as the floor, bare `qemu-system-x86_64` booting the same kernel into a busybox that only sleeps.
QEMU's PSS is broken down by mapping (guest RAM, TCG code buffer, heap, other anonymous memory, the
binary and libraries). Guest RAM is split into pages the guest wrote (private to this QEMU) and pages it
only read from a template's or snapshot's RAM file (shared with every sandbox mapping the same file).
The binary's and libraries' PSS falls as more QEMUs run on the machine (anyone's): compare within a run.
Guest RAM in a memfd can hold pages that no process maps (filled from the template but not yet
touched): PSS misses them, so they are printed apart ("memfd unmapped").
Also timed: `run -- true` from the template and `exec -- true` (a small buffer is refilled more often).
With --ksm, only the old setting runs, and each measurement is repeated with the host's KSM on (QEMU marks
guest RAM mergeable): merged pages, ksmd's CPU, and `exec -- true` meanwhile. KSM is host-wide, so it is
on only for those measurements, then unmerged and set back (needs root).

Usage: .venv/bin/python benchmarks/bench_density.py [--forks N] [--runs N] [--tb-size MiB] [--settle S]
       [--candidate NAME=VALUE ...] [--ksm]  (e.g. --candidate MALLOC_ARENA_MAX=1; it replaces the --tb-size candidate)
(at most 1 + N VMs at once; the machine has 2 cores: keep N <= 4).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench_vm import _busybox_root, _raw_spec
from benchstate import private_state_dir
from timing import median_ms, smaps_rollup, timed

from matchlock.vm.machine import TCG_BUFFER_ENV, build_argv

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")
KSM = Path("/sys/kernel/mm/ksm")
CATEGORIES = ("guest RAM written", "guest RAM read", "TCG code buffer", "heap", "anon other", "binary+libs", "other")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def _category(size: int, perms: str, name: str, ram_bytes: int) -> str:
    if size == ram_bytes or name.startswith("/memfd:") or name.endswith("/ram"):
        return "guest RAM"
    if perms.startswith("rwx") and not name:
        return "TCG code buffer"  # the only anonymous mapping QEMU makes executable
    if name == "[heap]":
        return "heap"
    if not name or name.startswith("[stack"):
        return "anon other"  # thread stacks, glib/TCG tables, malloc arenas
    if name.startswith("/"):
        return "binary+libs"
    return "other"


def mappings_pss(pid: int, ram_mb: int = 512) -> dict[str, int]:
    """PSS in KiB per mapping category, from /proc/PID/smaps; guest RAM split into written and read."""
    totals: collections.Counter[str] = collections.Counter()
    category = "other"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            match = _MAPPING.match(line)
            if match:
                size = int(match.group(2), 16) - int(match.group(1), 16)
                category = _category(size, match.group(3), match.group(4).strip(), ram_mb << 20)
            elif line.startswith("Pss:"):
                totals["guest RAM read" if category == "guest RAM" else category] += int(line.split()[1])
            elif category == "guest RAM" and line.startswith("Private_Dirty:"):
                # Copied on write: this QEMU's alone. The rest of its PSS is clean pages of the RAM file.
                written = int(line.split()[1])
                totals["guest RAM written"] += written
                totals["guest RAM read"] -= written
    return dict(totals)


def memfd_unmapped_kib(pid: int) -> int:
    """Resident guest RAM in QEMU's memfds that its mappings do not show (PSS cannot see it)."""
    files = {}  # QEMU opens its inherited memfd again through /proc/self/fd: count each file once
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("/memfd:"):
                stat = os.stat(fd)
                files[stat.st_dev, stat.st_ino] = stat.st_blocks // 2
        except OSError:
            continue
    resident = sum(files.values())
    mapped = 0
    with open(f"/proc/{pid}/smaps") as f:
        inside = False
        for line in f:
            match = _MAPPING.match(line)
            if match:
                inside = match.group(4).startswith("/memfd:")
            elif inside and line.startswith("Rss:"):
                mapped += int(line.split()[1])
    return max(0, resident - mapped)


def _qemu_of(vm_id: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"qemu-system-x86_64") and f"process=matchlock-{vm_id}".encode() in b" ".join(argv):
                return int(entry.name)
    raise RuntimeError(f"no QEMU found for {vm_id}")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def sandbox_processes(vm_id: str) -> dict[str, int]:
    """QEMU, its owner (QEMU's parent: setpriv execs into QEMU) and the owner's other descendants."""
    qemu = _qemu_of(vm_id)
    owner = _ppid(qemu)
    found = {"qemu": qemu, "owner": owner}
    pending = [c for c in _children(owner) if c != qemu] + _children(qemu)
    while pending:
        pid = pending.pop()
        found[f"helper {pid}"] = pid
        pending += _children(pid)
    return found


def _mib(kib: float) -> str:
    return f"{kib / 1024:6.1f}"


def _matchlock(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([MATCHLOCK, *args], capture_output=True, text=True, timeout=180, env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"matchlock {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _timed(runs: int, *args: str, env: dict[str, str]) -> float:
    """Median ms of `runs` runs of `matchlock ARGS`."""
    return median_ms(timed(runs, lambda: _matchlock(*args, env=env)))


def _print_qemu(label: str, pid: int) -> tuple[int, int]:
    parts = mappings_pss(pid)
    total = sum(parts.values())
    detail = "  ".join(f"{name} {_mib(parts.get(name, 0)).strip()}" for name in CATEGORIES if parts.get(name))
    unmapped = memfd_unmapped_kib(pid)
    extra = f"  (+ memfd unmapped {_mib(unmapped).strip()})" if unmapped else ""
    print(f"    {label:14s} PSS {_mib(total)} MiB = {detail}{extra}")
    return total, unmapped


def _measure(vm_ids: list[str]) -> tuple[int, int]:
    """Print every process of these sandboxes; the sum of their PSS, and of the unmapped memfd pages, in KiB."""
    total = hidden = 0
    for vm_id in vm_ids:
        print(f"  {vm_id}")
        for role, pid in sandbox_processes(vm_id).items():
            if role == "qemu":
                pss, unmapped = _print_qemu("QEMU", pid)
                total, hidden = total + pss, hidden + unmapped
            else:
                # Private_Dirty: what this process alone holds (a forked owner's copies of its parent's pages).
                rollup = smaps_rollup(pid)
                total += rollup["Pss"]
                print(
                    f"    {role:14s} PSS {_mib(rollup['Pss'])} MiB, private dirty {_mib(rollup['Private_Dirty']).strip()}"
                )
    return total, hidden


def _ksm(name: str) -> int:
    return int((KSM / name).read_text())


def _ksmd_cpu_s() -> float:
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "ksmd":
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    raise RuntimeError("no ksmd thread: the host kernel has no KSM")


@contextlib.contextmanager
def ksm_on(pages_to_scan: int = 1000) -> Iterator[None]:
    """Host-wide KSM for one measurement; after it, every page unmerged (run=2) and the old settings back."""
    saved = {name: _ksm(name) for name in ("run", "pages_to_scan", "use_zero_pages")}
    try:
        (KSM / "use_zero_pages").write_text("1")  # zero pages merge with the kernel's zero page, unshared
        (KSM / "pages_to_scan").write_text(str(pages_to_scan))
        (KSM / "run").write_text("1")
        yield
    finally:
        (KSM / "run").write_text("2")  # returns when all is unmerged
        for name, value in saved.items():
            (KSM / name).write_text(str(value))


def ksm_settle(scans: int = 3, timeout: float = 60.0) -> None:
    """Wait for `scans` full KSM scans (a page merges on the scan after the one that saw it unchanged)."""
    first, cpu, started = _ksm("full_scans"), _ksmd_cpu_s(), time.monotonic()
    while _ksm("full_scans") < first + scans and time.monotonic() < started + timeout:
        time.sleep(0.2)
    wall, spent = time.monotonic() - started, _ksmd_cpu_s() - cpu
    print(
        f"    KSM: {_ksm('full_scans') - first} full scans in {wall:.1f} s, ksmd CPU {spent:.2f} s "
        f"({100 * spent / wall:.0f}% of a core); pages_sharing {_ksm('pages_sharing')}, "
        f"pages_shared {_ksm('pages_shared')}, zero pages {_ksm('ksm_zero_pages')}"
    )


def _measure_ksm(vm_ids: list[str], runs: int, env: dict[str, str]) -> tuple[int, float]:
    """The same sandboxes again with KSM on: their PSS sum (KiB) and `exec -- true` (ms) meanwhile."""
    with ksm_on():
        ksm_settle()
        total, _ = _measure(vm_ids)
        exec_ms = _timed(runs, "exec", vm_ids[0], "--", "true", env=env)
        print(f"    with KSM: total PSS {_mib(total)} MiB, exec -- true {exec_ms:.0f} ms")
        return total, exec_ms


def bench_setting(
    label: str, env: dict[str, str], forks: int, runs: int, settle: float, ksm: bool = False
) -> dict[str, float]:
    _matchlock("run", "--", "true", env=env)  # builds this setting's template (its key covers QEMU's argv)
    run_ms = _timed(runs, "run", "--", "true", env=env)
    vm_id = _matchlock("run", "-d", env=env).strip()
    clones: list[str] = []
    try:
        time.sleep(settle)
        print(f"{label}: (a0) the sandbox before its first exec (what the wake and handshake wrote)")
        _measure([vm_id])
        exec_ms = _timed(runs, "exec", vm_id, "--", "true", env=env)
        print(f"{label}: run -- true {run_ms:.0f} ms, exec -- true {exec_ms:.0f} ms (medians of {runs})")
        time.sleep(settle)
        print(" (a) one idle sandbox from the template")
        one, one_hidden = _measure([vm_id])
        print(f"    total PSS {_mib(one)} MiB (+ {_mib(one_hidden).strip()} MiB in no process's mappings)")
        extra: dict[str, float] = {}
        if ksm:
            extra["one ksm"], extra["exec ksm"] = _measure_ksm([vm_id], runs, env)
        clones = _matchlock("fork", vm_id, "-n", str(forks), env=env).split()
        time.sleep(settle)
        print(f" (b) {forks} idle forks of it")
        every, every_hidden = _measure([vm_id, *clones])
        added = (every - one) / forks
        print(
            f"    total PSS {_mib(every)} MiB (+ {_mib(every_hidden).strip()} unmapped); added per fork {_mib(added)} MiB"
        )
        if ksm:
            every_ksm, _ = _measure_ksm([vm_id, *clones], runs, env)
            extra["added ksm"] = (every_ksm - extra["one ksm"]) / forks
        return {"run": run_ms, "exec": exec_ms, "one": one, "one+unmapped": one + one_hidden, "added": added, **extra}
    finally:
        for vm in [*clones, vm_id]:
            subprocess.run([MATCHLOCK, "kill", vm], capture_output=True, timeout=60)
            subprocess.run([MATCHLOCK, "rm", vm], capture_output=True, timeout=60)


def bench_bare(work: Path, settle: float, settings: dict[str, dict[str, str]]) -> None:
    """Bare QEMU, same kernel and machine, busybox `sleep` as init: the floor under any sandbox."""
    root = work / "bare"
    _busybox_root(root, "#!/bin/sh\nexec sleep 100000\n")
    os.symlink("busybox", root / "tree" / "bin" / "sleep")
    disk = work / "bare.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(disk), str(root / "tree")], check=True)
    print("bare QEMU, same kernel, init = sleep (no agent, no network, no template)")
    for label, env in settings.items():
        agent_host, agent_guest = socket.socketpair()
        qmp_host, qmp_guest = socket.socketpair()
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            argv = build_argv(_raw_spec(disk, work / "bare-console.log"), agent_guest.fileno(), qmp_guest.fileno())
        finally:
            os.environ.clear()
            os.environ.update(saved)
        proc = subprocess.Popen(  # the setting's environment is QEMU's too (e.g. glibc tunables)
            argv, pass_fds=(agent_guest.fileno(), qmp_guest.fileno()), stderr=subprocess.DEVNULL, env={**saved, **env}
        )
        try:
            time.sleep(settle + 2)  # boot, then idle
            _print_qemu(label, proc.pid)
        finally:
            proc.kill()
            proc.wait()
            for sock in (agent_host, agent_guest, qmp_host, qmp_guest):
                sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forks", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tb-size", type=int, default=32, help="the candidate's TCG buffer, MiB (see vm/machine.py)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring")
    parser.add_argument(
        "--candidate", action="append", default=[], metavar="NAME=VALUE", help="the new setting's environment"
    )
    parser.add_argument("--ksm", action="store_true", help="old setting only, each measurement again with KSM on")
    args = parser.parse_args()
    candidate = dict(item.split("=", 1) for item in args.candidate if "=" in item)
    if len(candidate) != len(args.candidate):
        sys.exit(f"--candidate takes NAME=VALUE, got {args.candidate}; fix: e.g. --candidate MALLOC_ARENA_MAX=1")
    if not shutil.which("mkfs.erofs"):
        sys.exit("mkfs.erofs is needed for the bare baseline; fix: apt-get install erofs-utils")
    settings: dict[str, dict[str, str]] = {"old": {}}
    if not args.ksm:
        settings["new"] = candidate or {TCG_BUFFER_ENV: str(args.tb_size)}
        print(f"new = {settings['new']}")
    with private_state_dir(), tempfile.TemporaryDirectory(prefix="bench-density-") as work:
        results = {
            label: bench_setting(label, env, args.forks, args.runs, args.settle, args.ksm)
            for label, env in settings.items()
        }
        bench_bare(Path(work), args.settle, settings)
    old = results["old"]
    if args.ksm:
        print("summary (targets: one sandbox <= 80 MiB total PSS; each fork adds <= 30 MiB)")
        for key, text in (("one", "one idle sandbox, total PSS MiB"), ("added", "PSS added per fork, MiB")):
            print(f"  {text:34s} KSM off {_mib(old[key])}  on {_mib(old[key + ' ksm'])}")
        print(f"  {'exec -- true, ms':34s} KSM off {old['exec']:6.0f}  on {old['exec ksm']:6.0f}")
        return
    new = results["new"]
    print("summary (targets: one sandbox <= 80 MiB total PSS; each fork adds <= 30 MiB)")
    for key, text in (
        ("one", "one idle sandbox, total PSS MiB"),
        ("one+unmapped", "  the same + unmapped memfd pages"),
        ("added", "PSS added per fork, MiB"),
    ):
        print(f"  {text:34s} old {_mib(old[key])}  new {_mib(new[key])}  = {new[key] / old[key]:.2f}x")
    for key, text in (("run", "run -- true, ms"), ("exec", "exec -- true, ms")):
        print(f"  {text:34s} old {old[key]:6.0f}  new {new[key]:6.0f}  = {new[key] / old[key]:.2f}x")


if __name__ == "__main__":
    main()
