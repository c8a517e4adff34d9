"""`matchlock fork` preloads what its forked owners import (cli/launcher.py OWNER_MODULES): a module an
owner imports itself costs every clone its import time and private memory. The real `fork` and `run
--from-snapshot -d` run in a fresh interpreter up to QEMU's start (fork_owner_imports.py), no VM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from matchlock.state import snapshots as records
from matchlock.state.store import StateStore

pytestmark = pytest.mark.timeout(120)
PROBE = Path(__file__).with_name("fork_owner_imports.py")
SNAPSHOT = "snap-preload"


def _fake_snapshot(state: Path, files: Path) -> None:
    """A full snapshot of a sandbox with a network and a secret (so its restore starts a CA and the proxy)."""
    files.mkdir()
    for name in ("kernel", "runtime.img", "lower.img"):
        (files / name).write_bytes(b"x")
    meta = {
        "version": 1, "mode": "full", "source_vm": "vm-00000001", "image": "matchlock/busybox:builtin",
        "config": {"network": {}}, "secrets": {"API_KEY": "SANDBOX_SECRET_ab12"},
        "allowed_hosts": ["api.example.com"], "cpus": 1.0, "memory_mb": 256, "disk_size_mb": 512,
        "network": True, "kernel_args": ["console=hvc0"], "acpi": False, "tsc_khz": None,
        "files": {"kernel": str(files / "kernel"), "initrd": "", "runtime": str(files / "runtime.img"),
                  "lower": str(files / "lower.img")},
        "upper": str(files / "upper.img"),
    }  # fmt: skip
    store = StateStore(state)
    try:
        store.register("vm-00000001", image=meta["image"], config={})
        directory = records.begin(store, SNAPSHOT, "vm-00000001", "full")
        for name in ("upper.img", "memory", "kernel", "runtime.img", "lower.img"):
            (directory / name).write_bytes(b"x")
        records.complete(store, SNAPSHOT, meta)
    finally:
        store.close()


def _probe(tmp_path: Path, *extra: str) -> dict:
    state, files = tmp_path / "state", tmp_path / "files"
    if not state.exists():
        _fake_snapshot(state, files)
    env = {**os.environ, "MATCHLOCK_STATE_DIR": str(state), "MATCHLOCK_CACHE_DIR": str(tmp_path / "cache"),
           "FAKE_FILES": str(files)}  # fmt: skip
    env.pop("MATCHLOCK_DEBUG_TIMING", None)
    proc = subprocess.run(
        [sys.executable, str(PROBE), SNAPSHOT, *extra], capture_output=True, text=True, env=env, timeout=100
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["args"][:4] == ["run", "--from-snapshot", found["args"][2], "-d"]
    assert found["reached"], f"the owner never reached QEMU's start: {proc.stderr[-3000:]}"
    return found


def test_a_forked_owner_imports_nothing_that_fork_did_not_preload(tmp_path: Path) -> None:
    missing = _probe(tmp_path)["missing"]
    ours = [name for name in missing if name.split(".")[0] == "matchlock"]
    assert not missing, (
        f"forked owners import {len(missing)} module(s) that `fork` did not preload; add them (or a module "
        f"that imports them) to OWNER_MODULES in src/matchlock/cli/launcher.py: matchlock: {ours}; "
        f"others: {[name for name in missing if name not in ours]}"
    )


def test_a_module_left_out_of_the_preload_is_named(tmp_path: Path) -> None:
    missing = _probe(tmp_path, "--drop", "matchlock.net.intercept")["missing"]
    assert "matchlock.net.intercept" in missing and "h2.connection" in missing
