"""SIGKILL at random points of pause, resume, snapshot, fork and restore: nothing may leak or wedge.

Not a timing: a bounded soak (issue 14's crash safety, beyond the one kill the VM tests make). A source
sandbox runs a counter, with a secret, an allow-list (so a CA) and an overlay mount. Each round runs one
operation through the real CLI and, after a random delay, SIGKILLs one process it involves: the CLI
process, the source's owner, a new sandbox's owner, or a QEMU. Then it checks, as a user would after a
crash:

- the CLI process ends (a hang is a finding) and `matchlock gc` succeeds;
- every sandbox `list` shows as running answers `exec` (after `resume` if paused); the others go with `rm`;
- no QEMU or owner process of this state directory is left that `list` does not show as running;
- `vms/` holds only listed sandboxes, `snapshots/` only what `snapshot ls` lists, and nothing half-made;
- the source's counter (when the source survived) still counts;
- the host directory behind the overlay mount is byte-for-byte unchanged.

A killed source is started again. Findings are printed as they happen and summed up at the end; the exit
status is 1 if there was any.

Usage: .venv/bin/python benchmarks/soak_kill9.py [--rounds N] [--seed S] [--max-delay SECONDS]
(at most 3 VMs at once: the source and two clones; runs in its own network namespace, with only loopback).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchstate import isolate, private_state_dir

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")
SECRET = "API_KEY=soak-" + "9c2e41f07b3d@api.example.com"
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done"
OPERATIONS = ("pause", "snapshot-full", "snapshot-filesystem", "fork", "restore", "rpc")
# `rpc`: a `matchlock rpc` session (what the SDKs start) creating a sandbox and running a command in it;
# its owner is the rpc process itself ("cli"), and "new-owner" finds none to kill.
RPC_REQUESTS = (
    {"jsonrpc": "2.0", "id": 1, "method": "create", "params": {"image": "matchlock/busybox:builtin"}},
    {"jsonrpc": "2.0", "id": 2, "method": "exec", "params": {"command": "sleep 5"}},
)
VICTIMS = ("cli", "source-owner", "new-owner", "qemu")
HANG_SECONDS = 120


def ml(*args: str, timeout: float = HANG_SECONDS) -> subprocess.CompletedProcess:
    return subprocess.run([MATCHLOCK, *args], capture_output=True, text=True, timeout=timeout)


def ok(*args: str, timeout: float = HANG_SECONDS) -> str:
    result = ml(*args, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"matchlock {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()[-400:]}")
    return result.stdout


def sandboxes() -> list[dict]:
    return json.loads(ok("list", "--json"))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest.update(f"{path.relative_to(root)} {stat.st_mode:o} {stat.st_size}\n".encode())
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def processes_of(state: Path) -> dict[int, str]:
    """pid -> 'qemu' or 'owner' for every process whose command line or environment names `state`."""
    found: dict[int, str] = {}
    marker = str(state).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if not cmdline:
            continue  # a zombie or a kernel thread
        if b"qemu-system" in cmdline.split(b"\0")[0] and marker in cmdline:
            found[int(entry.name)] = "qemu"
        elif b"MATCHLOCK_STATE_DIR=" + marker + b"\0" in environ and b"matchlock" in cmdline:
            found[int(entry.name)] = "owner"
    return found


def ancestry(pid: int) -> set[int]:
    """`pid` and its ancestors."""
    chain = set()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return chain


class Soak:
    def __init__(self, state: Path, mount: Path, rng: random.Random, max_delay: float) -> None:
        self.state, self.mount, self.rng, self.max_delay = state, mount, rng, max_delay
        self.mount_digest = tree_digest(mount)
        self.findings: list[str] = []
        self.source = ""
        self.snapshots: list[str] = []
        self.round = 0

    def finding(self, text: str) -> None:
        line = f"round {self.round}: {text}"
        self.findings.append(line)
        print(f"  FINDING {line}", flush=True)

    def start_source(self) -> None:
        self.source = ok("run", "-d", "--disk-size", "256", "--allow-host", "api.example.com", "--secret", SECRET,
                         "-v", f"{self.mount}:/work:overlay", "--", "sh", "-c", COUNTER).strip()  # fmt: skip
        ok("exec", self.source, "--", "sh", "-c", "echo upper > /root/upper-file; echo guest > /work/guest; sync")

    def count(self, vm: str) -> int:
        return int(ok("exec", vm, "--", "cat", "/tmp/count", timeout=60).strip() or 0)

    def command(self, operation: str) -> list[str]:
        if operation == "pause":
            return ["pause", self.source]
        if operation.startswith("snapshot-"):
            name = f"soak-{self.round}"
            return ["snapshot", "create", self.source, "--name", name, "--mode", operation.split("-", 1)[1]]
        if operation == "fork":
            return ["fork", self.source, "-n", "2", "--secret", SECRET]
        if operation == "rpc":
            return ["rpc"]
        name = self.rng.choice(self.snapshots)
        return ["run", "-d", "--from-snapshot", name, "--secret", SECRET]

    def victim_pid(self, victim: str, cli: subprocess.Popen, before: set[int]) -> tuple[str, int | None]:
        if victim == "cli":
            return victim, cli.pid
        listed = {vm["id"]: vm for vm in sandboxes()}
        if victim == "source-owner":
            return victim, listed.get(self.source, {}).get("pid")
        procs = processes_of(self.state)
        if victim == "new-owner":
            new = [pid for pid, kind in procs.items() if kind == "owner" and pid not in before and pid != cli.pid]
        else:
            new = [pid for pid, kind in procs.items() if kind == "qemu"]
        return victim, (self.rng.choice(new) if new else None)

    def one_round(self) -> None:
        self.round += 1
        operations = [op for op in OPERATIONS if op != "restore" or self.snapshots]
        operation, victim = self.rng.choice(operations), self.rng.choice(VICTIMS)
        delay = self.rng.uniform(0, self.max_delay)
        before_count = self.count(self.source)
        before = set(processes_of(self.state))
        cli = subprocess.Popen([MATCHLOCK, *self.command(operation)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True)  # fmt: skip
        assert cli.stdin is not None
        if operation == "rpc":
            cli.stdin.write("".join(json.dumps(request) + "\n" for request in RPC_REQUESTS))
            cli.stdin.flush()  # and stdin stays open: its end would close the session
        time.sleep(delay)
        victim, pid = self.victim_pid(victim, cli, before)
        killed = "nothing (not there)"
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                killed = f"pid {pid}"
            except ProcessLookupError:
                killed = f"pid {pid}, already gone"
        try:
            out, err = cli.communicate(timeout=HANG_SECONDS)
        except subprocess.TimeoutExpired:
            cli.kill()
            out, err = cli.communicate()
            self.finding(f"`{' '.join(cli.args[1:])}` hung for {HANG_SECONDS} s after the kill of {victim}")
        print(f"round {self.round}: {operation}, kill {victim} after {delay:.2f} s: {killed}; "
              f"exit {cli.returncode}{': ' + err.strip().splitlines()[-1][:160] if err.strip() else ''}", flush=True)  # fmt: skip
        if operation.startswith("snapshot-") and cli.returncode == 0:
            self.snapshots.append(f"soak-{self.round}")
        self.check(before_count)

    def settled_exec(self, vm: str) -> subprocess.CompletedProcess | None:
        """`exec` once the sandbox is neither starting nor stopping (up to a minute); None if it went."""
        deadline = time.monotonic() + 60
        while True:
            answer = ml("exec", vm, "--", "cat", "/root/upper-file", "/work/guest", timeout=60)
            if "still starting or stopping" not in answer.stderr or time.monotonic() > deadline:
                return answer
            time.sleep(0.5)
            if vm not in {v["id"] for v in sandboxes() if v["status"] == "running"}:
                return None

    def check(self, before_count: int) -> None:
        gc = ml("gc")
        if gc.returncode:
            self.finding(f"gc failed: {gc.stderr.strip()[-300:]}")
        listed = sandboxes()
        for vm in listed:
            if vm["status"] != "running":
                removed = ml("rm", vm["id"])
                if removed.returncode:
                    self.finding(f"rm {vm['id']} ({vm['status']}) failed: {removed.stderr.strip()[-300:]}")
                continue
            if vm.get("paused"):
                resumed = ml("resume", vm["id"])
                if resumed.returncode:
                    self.finding(f"resume {vm['id']} failed: {resumed.stderr.strip()[-300:]}")
            try:
                answer = self.settled_exec(vm["id"])
            except subprocess.TimeoutExpired:
                self.finding(f"exec in {vm['id']} hung")
                continue
            if answer is None:
                continue  # it was still starting and then went: an abandoned start (its caller was killed)
            if answer.returncode or answer.stdout != "upper\nguest\n":
                self.finding(f"{vm['id']} is running but exec gave {answer.returncode}: {answer.stderr.strip()[-300:]}")
        listed = sandboxes()
        running = {vm["id"]: vm for vm in listed if vm["status"] == "running"}
        owners = {vm["pid"] for vm in running.values()}
        for pid, kind in processes_of(self.state).items():
            if owners & ancestry(pid):
                continue  # a running sandbox's owner, its QEMU or a helper of it
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # it ended meanwhile
            self.finding(f"leaked {kind} process {pid}: {cmdline[:200]}")
        on_disk = {p.name for p in (self.state / "vms").iterdir()} if (self.state / "vms").exists() else set()
        if stray := on_disk - {vm["id"] for vm in listed}:
            self.finding(f"vms/ holds unlisted {sorted(stray)}")
        names = {s["name"] for s in json.loads(ok("snapshot", "ls", "--json"))}
        stored = (
            {p.name for p in (self.state / "snapshots").iterdir()} if (self.state / "snapshots").exists() else set()
        )
        if stored != names:
            self.finding(f"snapshots/ holds {sorted(stored)} but `snapshot ls` lists {sorted(names)}")
        self.snapshots = [name for name in self.snapshots if name in names]
        if tree_digest(self.mount) != self.mount_digest:
            self.finding("the overlay mount's host directory changed")
        for vm in running:
            if vm != self.source:
                ml("kill", vm)
                ml("rm", vm)
        if self.source in running:
            after = self.count(self.source)
            if after <= before_count:
                time.sleep(1)
                if self.count(self.source) <= before_count:
                    self.finding(f"the source's counter stopped at {after} (was {before_count} before the round)")
        else:
            print(f"round {self.round}: the source is gone; starting a new one", flush=True)
            self.start_source()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="operations, each with one SIGKILL (at most 200)")
    parser.add_argument("--seed", type=int, default=None, help="for a repeatable sequence (default: random)")
    parser.add_argument("--max-delay", type=float, default=2.0, help="the kill comes after 0..this many seconds")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 200:
        parser.error(f"--rounds {args.rounds}: must be 1..200 (the soak is bounded)")
    isolate("soak_kill9.py")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"seed {seed}", flush=True)
    with private_state_dir() as state, tempfile.TemporaryDirectory(prefix="soak-mount-") as mount:
        (Path(mount) / "host.txt").write_text("host\n")
        soak = Soak(state, Path(mount), random.Random(seed), args.max_delay)
        started = time.monotonic()
        try:
            soak.start_source()
            for _ in range(args.rounds):
                soak.one_round()
        finally:
            for vm in sandboxes():
                ml("kill", vm["id"])
                ml("rm", "-f", vm["id"])
            for name in soak.snapshots:
                ml("snapshot", "rm", name)
            ml("gc")
        print(f"{args.rounds} rounds in {time.monotonic() - started:.0f} s, seed {seed}: "
              f"{len(soak.findings)} finding(s)")  # fmt: skip
        for line in soak.findings:
            print(f"  {line}")
        sys.exit(1 if soak.findings else 0)


if __name__ == "__main__":
    main()
