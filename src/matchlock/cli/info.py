"""`matchlock version` and `matchlock diagnose`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import click

from .. import __version__


def _git_commit() -> str:
    """The commit of a source checkout, read from .git without running git."""
    git = Path(__file__).resolve().parents[3] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = git / ref
            if ref_file.exists():
                return ref_file.read_text().strip()[:12]
            for line in (git / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
            return "unknown"
        return head[:12]
    except OSError:
        return "unknown"


@click.command()
def version() -> None:
    """Print the version."""
    click.echo(f"matchlock {__version__} (commit: {_git_commit()}, built: source)")


@dataclass
class Check:
    name: str
    status: Literal["pass", "fail", "warn"]
    message: str
    fix: str | None = None
    notes: tuple[str, ...] = ()  # further lines under the message
    details: dict[str, object] | None = None  # machine-readable facts, in --json only


def _tool_check(
    name: str, binary: str, package: str, *, required: bool = True, version_arg: str | None = None
) -> Check:
    path = shutil.which(binary)
    if path is None:
        return Check(name, "fail" if required else "warn", f"{binary} not found", f"apt-get install {package}")
    message = path
    if version_arg:
        out = subprocess.run([path, version_arg], capture_output=True, text=True)
        first = (out.stdout or out.stderr).strip().splitlines()
        message = first[0] if first else path
    return Check(name, "pass", message)


def _accelerator_check() -> Check:
    from ..vm.accel import choose_accelerator, host_tsc_khz

    choice = choose_accelerator()
    if choice.name == "kvm":
        return Check("accelerator", "pass", f"kvm: {choice.reason}")
    tsc = host_tsc_khz()
    message = f"tcg ({choice.reason}); host TSC {tsc} kHz" if tsc else f"tcg ({choice.reason})"
    return Check("accelerator", "warn", message, "VMs run under software emulation: expect slower boots")


def _kernel_check() -> Check:
    """Which kernel runs and why; on the fallback, what the tuned one would gain and where its build is."""
    from ..api.errors import MatchlockError
    from ..kernel import background, resolve

    build = background.status()
    details: dict[str, object] = {"tuned_build": build.as_json(), "tuned_gain": background.TUNED_GAIN}
    build_note = f"tuned kernel: {build.describe()}"
    try:
        kernel = resolve(build_fallback=False)
    except MatchlockError as exc:
        # The error carries its own "fix:" line; show it once, as this check's fix.
        reason, _, fix = str(exc).partition("\n  fix: ")
        return Check("kernel", "fail", reason, fix or "matchlock kernel build", (build_note,), details)
    details.update(kind=kernel.kind, version=kernel.version, path=str(kernel.path), reason=kernel.reason)
    message = f"{kernel.kind} {kernel.version} at {kernel.path}"
    if kernel.kind != "fallback":
        return Check("kernel", "pass", message, notes=(f"why: {kernel.reason}",), details=details)
    notes = (f"why: {kernel.reason}", build_note, f"the tuned kernel would gain: {background.TUNED_GAIN}")
    if build.state == "running":
        fix = "none needed: sandboxes switch to the tuned kernel once it is built (`matchlock kernel build` waits)"
    elif build.state in ("failed", "interrupted") and build.log is not None:
        fix = f"matchlock kernel build (the last attempt's log: {build.log})"
    else:
        fix = "matchlock kernel build"
    return Check("kernel", "warn", message, fix, notes, details)


def _runtime_check() -> Check:
    from ..api.errors import MatchlockError
    from ..api.paths import runtime_dir
    from ..image import runtime

    pointer = runtime_dir() / "python.current"
    if not pointer.exists():
        return Check("guest-runtime", "warn", "the guest Python runtime is not built yet", "matchlock setup")
    try:
        disk = runtime.runtime_disk_path()
    except MatchlockError as exc:
        return Check("guest-runtime", "fail", str(exc), "matchlock setup")
    if disk.exists():
        return Check("guest-runtime", "pass", str(disk))
    return Check("guest-runtime", "pass", f"{disk.name} will be built on the next run (guest code changed; <1 s)")


def collect_checks() -> list[Check]:
    checks = [
        _accelerator_check(),
        _tool_check("qemu", "qemu-system-x86_64", "qemu-system-x86", version_arg="--version"),
        _kernel_check(),
        _runtime_check(),
        _tool_check("e2fsprogs", "mke2fs", "e2fsprogs"),
        _tool_check("erofs-utils", "mkfs.erofs", "erofs-utils"),
        _tool_check("setpriv", "setpriv", "util-linux"),
        _tool_check("nftables", "nft", "nftables", required=False),
    ]
    from .setup_linux import rootless_checks  # what an ordinary user lacks, with the fix

    checks += [Check(*row) for row in rootless_checks()]
    return checks


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diagnose(as_json: bool) -> None:
    """Check that this host can run sandboxes, with a fix for each problem."""
    checks = collect_checks()
    ok = all(c.status != "fail" for c in checks)
    if as_json:
        click.echo(
            json.dumps(
                {"ok": ok, "checks": [{k: v for k, v in asdict(c).items() if v not in (None, ())} for c in checks]},
                indent=2,
            )
        )
    else:
        symbols = {"pass": "✓", "fail": "✗", "warn": "⚠"}
        for check in checks:
            click.echo(f"{symbols[check.status]} {check.name}: {check.message}")
            for note in check.notes:
                click.echo(f"  {note}")
            if check.fix and check.status != "pass":
                click.echo(f"  fix: {check.fix}")
    sys.exit(0 if ok else 1)
