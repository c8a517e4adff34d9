"""The boot-template cache: bounded, listed, cleared, and kept when a restore merely lost its QEMU (issue 10, 9-10)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from matchlock.api.errors import VMError
from matchlock.cli.image import image as image_cli
from matchlock.sandbox.sandbox import Sandbox, SandboxPaths
from matchlock.util.fs import file_lock
from matchlock.vm import checkpoint, snapshot
from matchlock.vm.snapshot import TemplateCache

MB = 1024 * 1024
STATE = b"QEVM\x00\x00\x00\x03" + b"\x00" * 100  # the start of a real migration stream
LOAD_ERROR = (
    "qemu-system-x86_64: Not a migration stream\nqemu-system-x86_64: load of migration failed: Invalid argument"
)


def make_template(root: Path, key: str, *, size: int = MB, age: float = 0, state: bool = True, inputs=None) -> Path:
    directory = root / key
    directory.mkdir(parents=True)
    (directory / "console.log").write_text("")
    if state:
        path = directory / "state"
        path.write_bytes(STATE + os.urandom(size - len(STATE)))  # random: no sparse or deduplicated blocks
        stamp = 1_700_000_000 - age
        os.utime(path, (stamp, stamp))
    if inputs is not None:
        (directory / snapshot.INPUTS_FILE).write_text(json.dumps(inputs))
    return directory


def keys(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


# --- which failed restores condemn the shared state ---------------------------------


def test_a_killed_qemu_does_not_condemn_the_template(tmp_path):
    state = tmp_path / "state"
    state.write_bytes(STATE)
    assert not snapshot.restore_proves_state_bad(state, -9, "")  # SIGKILL from outside
    assert not snapshot.restore_proves_state_bad(state, None, "")  # still running: a slow guest, a timeout
    assert not snapshot.restore_proves_state_bad(state, -9, LOAD_ERROR)  # a signal ended it, whatever it said


def test_qemu_load_errors_and_garbage_condemn_the_template(tmp_path):
    state = tmp_path / "state"
    state.write_bytes(STATE)
    assert snapshot.restore_proves_state_bad(state, 1, LOAD_ERROR)
    assert snapshot.restore_proves_state_bad(state, None, "qemu: Unknown savevm section or instance 'x' 0")
    state.write_bytes(b"not a migration stream")
    assert snapshot.restore_proves_state_bad(state, -9, "")
    assert not snapshot.restore_proves_state_bad(tmp_path / "gone", 1, LOAD_ERROR)  # nothing left to delete


class FakeMachine:
    def __init__(self, returncode: int | None, stderr: str) -> None:
        self.returncode, self._stderr = returncode, stderr

    def stderr_text(self) -> str:
        return self._stderr

    async def kill(self) -> None:
        if self.returncode is None:
            self.returncode = -9  # our own kill must not count as the cause


def boot_with_failed_restore(tmp_path, monkeypatch, machine: FakeMachine) -> tuple[Path, list[bool]]:
    """Drive Sandbox._boot through a restore that fails with `machine`, then a cold boot."""
    state = tmp_path / "templates" / "k" / "state"
    state.parent.mkdir(parents=True)
    state.write_bytes(STATE)
    with open(state.with_name(checkpoint.RAM_FILE), "wb") as ram:
        ram.truncate(1 << 20)

    async def ensure(self, spec, network_wrapper=None):
        return state

    monkeypatch.setattr(TemplateCache, "ensure", ensure)
    monkeypatch.delenv(snapshot.DISABLE_ENV, raising=False)
    box = Sandbox.__new__(Sandbox)
    box.paths = SandboxPaths(tmp_path / "vm")
    box.paths.console_log.parent.mkdir(parents=True)
    box.machine, box.channel = None, None
    wakes: list[bool] = []

    async def start_machine(spec, *, wake: bool) -> None:
        wakes.append(wake)
        if wake:
            box.machine = machine  # type: ignore[assignment]
            raise VMError("sandbox x failed to start: QEMU closed the QMP connection")

    box._start_machine = start_machine  # type: ignore[method-assign]
    spec = type("Spec", (), {"kernel_args": (), "memory_mb": 1})()
    monkeypatch.setattr(snapshot.dataclasses, "replace", lambda obj, **changes: obj)
    asyncio.run(box._boot(spec))  # type: ignore[arg-type]
    return state, wakes


def test_a_restore_cut_short_by_a_dying_qemu_keeps_the_template(tmp_path, monkeypatch):
    state, wakes = boot_with_failed_restore(tmp_path, monkeypatch, FakeMachine(-9, ""))
    assert wakes == [True, False]  # restore tried, then a cold boot
    assert state.exists()


def test_a_restore_that_qemu_cannot_load_removes_the_template(tmp_path, monkeypatch):
    state, wakes = boot_with_failed_restore(tmp_path, monkeypatch, FakeMachine(1, LOAD_ERROR))
    assert wakes == [True, False]
    assert not state.exists()


# --- bounds --------------------------------------------------------------------------


def test_prune_keeps_the_most_recent_within_the_count(tmp_path):
    for n in range(5):
        make_template(tmp_path, f"t{n}", age=n)
    removed = TemplateCache(tmp_path).prune(keep=3, max_bytes=1 << 40)
    assert keys(tmp_path) == {"t0", "t1", "t2"}
    assert {t.key for t in removed} == {"t3", "t4"}


def test_prune_bounds_total_bytes(tmp_path):
    for n in range(4):
        make_template(tmp_path, f"t{n}", size=2 * MB, age=n)
    TemplateCache(tmp_path).prune(keep=10, max_bytes=5 * MB)
    assert keys(tmp_path) == {"t0", "t1"}
    # The newest always stays, even when it alone is over the limit.
    TemplateCache(tmp_path).prune(keep=10, max_bytes=MB)
    assert keys(tmp_path) == {"t0"}


def test_prune_removes_unfinished_and_stale_but_not_builds_in_progress(tmp_path):
    runtime = tmp_path / "runtime.img"
    runtime.write_bytes(b"v1")
    inputs = {"files": {str(runtime): snapshot._identity(runtime)}, "shape": "512 MB, 1 CPU, network"}
    root = tmp_path / "templates"
    make_template(root, "current", inputs=inputs)
    make_template(root, "old-runtime", inputs={"files": {str(tmp_path / "gone.img"): "x:1:2"}, "shape": "?"})
    make_template(root, "crashed-build", state=False)
    make_template(root, "building", state=False)
    (root / "orphan.lock").touch()
    with file_lock(root / "building.lock"):
        statuses = {t.key: t.status for t in TemplateCache(root).templates()}
        assert statuses == {"current": "ready", "old-runtime": "stale", "crashed-build": "incomplete",
                            "building": "incomplete"}  # fmt: skip
        TemplateCache(root).prune()
    assert keys(root) == {"current", "building"}
    assert not (root / "orphan.lock").exists()


def test_ensure_prunes_after_a_build(tmp_path, monkeypatch):
    """KEEP_TEMPLATES is enforced by the cache itself, not only by gc."""
    for n in range(snapshot.KEEP_TEMPLATES + 2):
        make_template(tmp_path, f"t{n}", age=10 + n)
    monkeypatch.setattr(snapshot, "template_spec", lambda spec, root: spec)
    monkeypatch.setattr(snapshot, "template_key", lambda spec: "new")

    async def build(self, spec, state, network_wrapper):
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_bytes(STATE)

    monkeypatch.setattr(TemplateCache, "_build", build)
    asyncio.run(TemplateCache(tmp_path).ensure(object()))  # type: ignore[arg-type]
    assert len(keys(tmp_path)) == snapshot.KEEP_TEMPLATES and "new" in keys(tmp_path)


def _in_a_thread(coroutine_factory) -> object:
    """Run the coroutine's loop in a daemon thread: a loop blocked for good fails the test, not the run."""
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.append(asyncio.run(coroutine_factory())), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the event loop is blocked: a build waited on a lock its own process holds"
    return results[0]


def test_concurrent_creates_in_one_process_build_a_missing_template_once(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "template_spec", lambda spec, root: spec)
    monkeypatch.setattr(snapshot, "template_key", lambda spec: "shared")
    builds = []

    async def build(self, spec, state, network_wrapper):
        builds.append(state)
        await asyncio.sleep(0.05)  # a real build awaits QEMU: the other creates run meanwhile
        state.parent.mkdir(parents=True, exist_ok=True)
        state.with_name(checkpoint.RAM_FILE).write_bytes(b"ram")
        state.write_bytes(STATE)

    monkeypatch.setattr(TemplateCache, "_build", build)

    async def four_creates():
        cache = TemplateCache(tmp_path)
        return await asyncio.gather(*(cache.ensure(object()) for _ in range(4)))  # type: ignore[arg-type]

    states = _in_a_thread(four_creates)
    assert states == [tmp_path / "shared" / "state"] * 4 and len(builds) == 1


def test_a_create_waits_for_another_process_building_without_stopping_its_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "template_spec", lambda spec, root: spec)
    monkeypatch.setattr(snapshot, "template_key", lambda spec: "theirs")

    async def build(self, spec, state, network_wrapper):
        raise AssertionError("the other process built it")

    monkeypatch.setattr(TemplateCache, "_build", build)
    state = tmp_path / "theirs" / "state"

    async def wait_for_theirs():
        with file_lock(tmp_path / "theirs.lock"):  # another open file: to flock, another process
            waiting = asyncio.create_task(TemplateCache(tmp_path).ensure(object()))  # type: ignore[arg-type]
            for _ in range(5):  # the loop still runs while ensure waits
                await asyncio.sleep(0.02)
            assert not waiting.done()
            state.parent.mkdir(parents=True)
            state.with_name(checkpoint.RAM_FILE).write_bytes(b"ram")
            state.write_bytes(STATE)
        return await waiting

    assert _in_a_thread(wait_for_theirs) == state


# --- the commands ----------------------------------------------------------------------


def test_image_templates_lists_and_clears(cache_dir):
    root = snapshot.templates_dir()
    make_template(root, "aaaa", inputs={"files": {}, "shape": "1024 MB, 2 CPU, no network"})
    make_template(root, "bbbb", state=False)
    listing = CliRunner().invoke(image_cli, ["templates"])
    assert listing.exit_code == 0, listing.output
    header, *rows = listing.output.splitlines()
    assert header.split() == ["TEMPLATE", "MACHINE", "STATUS", "SIZE", "LAST", "USED"]
    by_key = {row.split()[0]: row for row in rows}
    assert "1024 MB, 2 CPU, no network" in by_key["aaaa"] and "ready" in by_key["aaaa"]
    assert "incomplete" in by_key["bbbb"] and set(by_key) == {"aaaa", "bbbb"}
    cleared = CliRunner().invoke(image_cli, ["templates", "--clear"])
    assert cleared.exit_code == 0 and "Removed 2 boot templates (1.0 MB freed)" in cleared.output, cleared.output
    assert keys(root) == set()


def test_image_gc_prunes_templates_and_says_what_it_freed(cache_dir):
    root = snapshot.templates_dir()
    make_template(root, "kept")
    make_template(root, "crashed", state=False)
    result = CliRunner().invoke(image_cli, ["gc"])
    assert result.exit_code == 0, result.output
    assert "Removed 1 boot templates" in result.output
    assert keys(root) == {"kept"}


@pytest.mark.parametrize("count", [0, 1])
def test_an_empty_or_missing_cache_is_fine(tmp_path, count):
    root = tmp_path / "templates"
    if count:
        root.mkdir()
    assert TemplateCache(root).templates() == [] and TemplateCache(root).prune() == []
