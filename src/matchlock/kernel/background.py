"""The tuned kernel built in the background, while sandboxes run on the fallback.

`matchlock setup` prepares Debian's cloud kernel (seconds) and calls `start()`,
which runs `matchlock kernel build --install-deps` detached, at the lowest CPU
and I/O priority, logging to `kernel-build/background-<hash12>.log` in the
cache. Building it in the foreground would cost a new user 5-9 minutes before
the first sandbox; boot templates hide most of the fallback's slower boot.

One build at a time: every build holds `kernel-build/.lock-<hash12>` (flock)
for its whole run, so "running" means "the lock is held", which ends with the
process however it dies. A second `start()` joins the running build instead of
starting one, and a foreground `matchlock kernel build` waits on the lock. Each
build records its state in `kernel-build/status-<hash12>.json` (running, then
failed with the error, or removed once the kernel is published), which
`matchlock diagnose` reads. Everything is keyed by the config hash, like the
kernels themselves.

This module is imported by `diagnose` and the test session: no dpkg or apt
calls here, only the cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..api.paths import cache_dir
from ..util.fs import file_lock, try_file_lock
from .resolve import find_tuned, tuned_config_hash

BuildState = Literal["built", "running", "failed", "interrupted", "not-started"]

# What `matchlock diagnose` says the tuned kernel gains over the fallback: `matchlock run -- true`,
# medians of 5 cold / 4 template runs, the kernels interleaved, TCG on 2 shared cores, 2026-12-01
# (docs/architecture.md, Kernel).
TUNED_GAIN = (
    "cold boots in ~5.8 s instead of ~9.2 s (a new --memory/--cpus shape, extra disks, each template build); "
    "runs from a boot template take about the same (~2.7 s vs ~3.0 s)"
)


def build_root() -> Path:
    return cache_dir() / "kernel-build"


def lock_path() -> Path:
    """Held by the one build of the current config for its whole run."""
    return build_root() / f".lock-{tuned_config_hash()[:12]}"


def status_path() -> Path:
    return build_root() / f"status-{tuned_config_hash()[:12]}.json"


def log_path() -> Path:
    return build_root() / f"background-{tuned_config_hash()[:12]}.log"


@dataclass(frozen=True)
class BuildStatus:
    state: BuildState
    log: Path | None = None  # the background build's log, when there is one
    pid: int | None = None
    error: str | None = None  # the failed build's error (its first lines)
    started: float | None = None  # time.time() when the build started
    kernel: Path | None = None  # the published vmlinux, once built

    def describe(self) -> str:
        """One line for `diagnose` and `setup`."""
        log = f"; log: {self.log}" if self.log else ""
        if self.state == "built":
            return f"built: {self.kernel}"
        if self.state == "running":
            since = f" for {time.time() - self.started:.0f} s" if self.started else ""
            return f"a background build is running{since} (pid {self.pid}){log}"
        if self.state == "failed":
            first = (self.error or "unknown error").splitlines()[0]
            return f"the last build failed: {first}{log}"
        if self.state == "interrupted":
            return f"the last build stopped before it finished (pid {self.pid} is gone){log}"
        return "not built, and no build is running"

    def as_json(self) -> dict[str, Any]:
        record = {"state": self.state, "log": self.log, "pid": self.pid, "error": self.error, "kernel": self.kernel}
        return {k: str(v) if isinstance(v, Path) else v for k, v in record.items() if v is not None}


def _read_record() -> dict[str, Any]:
    try:
        record = json.loads(status_path().read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def record(state: Literal["running", "failed"], **fields: Any) -> None:
    """Write the status record atomically; a build's log path is kept while its pid stays the same."""
    path = status_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _read_record()
    new: dict[str, Any] = {"state": state, "pid": os.getpid(), "started": time.time()}
    if old.get("pid") == fields.get("pid", os.getpid()):
        new.update({k: v for k, v in old.items() if k in ("log", "started")})
    new.update(fields)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(new, indent=1) + "\n")
    os.replace(tmp, path)


def clear_record() -> None:
    status_path().unlink(missing_ok=True)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _locked() -> bool:
    """Whether a build holds the lock now (without waiting for it)."""
    with try_file_lock(lock_path()) as acquired:
        return not acquired


def status() -> BuildStatus:
    tuned = find_tuned()
    if tuned is not None:
        return BuildStatus("built", kernel=tuned)
    rec = _read_record()
    log = Path(rec["log"]) if isinstance(rec.get("log"), str) else None
    pid = rec.get("pid") if isinstance(rec.get("pid"), int) else None
    started = rec.get("started") if isinstance(rec.get("started"), (int, float)) else None
    # A just-spawned build may not hold the lock yet; its live pid in a "running" record counts,
    # except to that build itself (`start()` wrote its pid before it took the lock).
    if _locked() or (rec.get("state") == "running" and pid != os.getpid() and _alive(pid)):
        return BuildStatus("running", log=log, pid=pid, started=started)
    if rec.get("state") == "failed":
        return BuildStatus("failed", log=log, pid=pid, error=str(rec.get("error", "unknown error")), started=started)
    if rec.get("state") == "running":
        return BuildStatus("interrupted", log=log, pid=pid, started=started)
    return BuildStatus("not-started")


def build_command(jobs: int | None = None) -> list[str]:
    """`matchlock kernel build --install-deps` at the lowest CPU and I/O priority."""
    argv = [sys.executable, "-m", "matchlock", "kernel", "build", "--install-deps"]
    if jobs is not None:
        argv += ["--jobs", str(jobs)]
    prefix = []
    if shutil.which("nice"):
        prefix += ["nice", "-n", "19"]
    if shutil.which("ionice"):
        prefix += ["ionice", "-c", "3"]  # idle class: disk time only when nobody else wants it
    return prefix + argv


def start(jobs: int | None = None) -> BuildStatus:
    """Start the background build unless the kernel is built or a build is running (then join that one)."""
    current = status()
    if current.state in ("built", "running"):
        return current
    log = log_path()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} background tuned kernel build\n".encode())
        out.flush()
        # A new session: the build outlives `setup`, and Ctrl-C at the terminal does not reach it.
        proc = subprocess.Popen(
            build_command(jobs),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    # nice and ionice exec the next program, so this pid is the build's own.
    record("running", pid=proc.pid, log=str(log))
    return BuildStatus("running", log=log, pid=proc.pid, started=time.time())


def wait(log: Callable[[str], None] = print) -> BuildStatus:
    """Wait for a running build to end (the lock frees), then return the outcome."""
    current = status()
    if current.state != "running":
        return current
    log(f"waiting for the tuned kernel: {current.describe()}")
    deadline = time.monotonic() + 30
    # A just-spawned build takes the lock within a second or two; until then poll its pid.
    while not _locked() and _alive(current.pid) and find_tuned() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    with file_lock(lock_path()):
        pass
    return status()
