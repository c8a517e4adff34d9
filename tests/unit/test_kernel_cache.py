"""`image gc` removes kernels no current input selects, and never one in use or being built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from matchlock.cli.image import image
from matchlock.kernel import cache
from matchlock.kernel.fallback import cached_fallback, input_hash
from matchlock.kernel.resolve import find_tuned, tuned_config_hash
from matchlock.util.fs import file_lock

OLD, OTHER = "0123456789ab", "ba9876543210"


def _kernel(path: Path, *files: str, mtime: int | None = None) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_bytes(b"k" * 100)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_stale_kernels_and_builds_go_and_the_current_ones_stay(cache_dir, monkeypatch):
    monkeypatch.delenv("MATCHLOCK_KERNEL", raising=False)
    kernels, builds = cache_dir / "kernels", cache_dir / "kernel-build"
    tuned, inputs = tuned_config_hash()[:12], input_hash()[:12]
    keep = [
        _kernel(kernels / f"6.1.192-3-{tuned}", "vmlinux"),
        _kernel(kernels / f"fallback-6.1.0-57-cloud-amd64-{inputs}", "vmlinuz", "initrd.cpio", mtime=2_000_000_000),
        _kernel(kernels / "oci" / "sha256" / ("a" * 64), "kernel"),
        _kernel(kernels / f".tmp-6.1.192-3-{tuned}-x1"),  # a build publishing
        _kernel(builds / f"6.1.192-3-{tuned}", ".config"),  # the current build, running or resumable
        _kernel(kernels / f"6.1.191-1-{OTHER}", "vmlinux"),  # another config, but its build holds the lock
        _kernel(kernels / "notes"),  # nothing the cache names: not ours to judge
    ]
    (builds / f"status-{tuned}.json").write_text("{}")
    keep.append(builds / f"status-{tuned}.json")
    running = _kernel(kernels / f"6.1.100-1-{OLD}", "vmlinux")  # another config, but a sandbox boots it
    keep.append(running)
    stale = {
        _kernel(kernels / f"6.1.150-1-{OLD}", "vmlinux"): "a tuned kernel built from another config fragment",
        _kernel(kernels / f"fallback-6.1.0-56-cloud-amd64-{inputs}", "vmlinuz", "initrd.cpio", mtime=1_000_000_000): (
            f"a fallback superseded by fallback-6.1.0-57-cloud-amd64-{inputs}"
        ),
        _kernel(kernels / f"fallback-6.1.0-57-cloud-amd64-{OLD}", "vmlinuz"): (
            "a fallback built from other initramfs inputs"
        ),
        _kernel(builds / f"6.1.150-1-{OLD}", ".config"): "a tuned build of another config fragment",
        _kernel(builds / "fallback-k2j3"): "the scratch directory of a fallback build that was killed",
    }
    for record in (f"status-{OLD}.json", f"background-{OLD}.log", f".lock-{OLD}"):
        (builds / record).write_text("x")
        stale[builds / record] = "a tuned build of another config fragment"
    assert find_tuned() == keep[0] / "vmlinux" and cached_fallback().vmlinuz == keep[1] / "vmlinuz"
    sandbox = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-kernel", str(running / "vmlinux")]
    )
    try:
        with file_lock(builds / f".lock-{OTHER}"):
            result = CliRunner().invoke(image, ["gc"])
    finally:
        sandbox.kill()
        sandbox.wait()
    assert result.exit_code == 0, result.output
    assert [path for path in keep if not path.exists()] == []
    assert [path for path in stale if path.exists()] == []
    for path, why in stale.items():
        assert f"Removed {path}: {why} (" in result.output, result.output
    again = CliRunner().invoke(image, ["gc"])  # the sandbox and the build ended: their kernels go now
    assert again.exit_code == 0, again.output
    assert again.output.count("Removed /") == 3 and not running.exists(), again.output  # and the lock file
    assert not (kernels / f"6.1.191-1-{OTHER}").exists()


def test_a_running_fallback_build_keeps_every_fallback(cache_dir):
    kernels = cache_dir / "kernels"
    old = _kernel(kernels / f"fallback-6.1.0-57-cloud-amd64-{OLD}", "vmlinuz")
    scratch = _kernel(cache_dir / "kernel-build" / "fallback-a1b2")
    with file_lock(kernels / cache.FALLBACK_LOCK):
        assert cache.remove_stale() == []
    assert old.exists() and scratch.exists()
    assert {r.path for r in cache.remove_stale()} == {old, scratch}
