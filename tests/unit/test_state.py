"""State store, migrations, lifecycle and reconcile, on real SQLite and real processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from matchlock.api.config import REDACTED, SandboxConfig, public_config
from matchlock.api.errors import NotFoundError, UsageError
from matchlock.state import lifecycle as phases
from matchlock.state import reconcile as reconciler
from matchlock.state.lifecycle import TransitionError, check_transition
from matchlock.state.store import (
    MIGRATIONS,
    OWNER_CRASHED,
    OWNER_RUNNING,
    OWNER_STOPPED,
    StateStore,
    process_identity,
)
from matchlock.util.sqlite import Migration, MigrationError, open_database


@pytest.fixture
def store(tmp_path):
    store = StateStore(tmp_path / "state")
    yield store
    store.close()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_fresh_database_has_every_migration(store):
    versions = [r[0] for r in store.conn.execute("SELECT version FROM schema_migrations WHERE module='state'")]
    assert versions == [m.version for m in MIGRATIONS]
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert oct(os.stat(store.path).st_mode & 0o777) == "0o600"


def test_older_schema_migrates_and_keeps_rows(tmp_path):
    path = tmp_path / "state" / "state.db"
    old = open_database(path, "state", MIGRATIONS[:1])
    old.execute(
        "INSERT INTO vms (id, pid, status, image, config_json, created_at, updated_at)"
        " VALUES ('vm-0000abcd', 0, 'stopped', 'img', '{}', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')"
    )
    old.close()
    store = StateStore(tmp_path / "state")
    vm = store.get("vm-0000abcd")
    assert vm is not None and vm.status == OWNER_STOPPED and vm.owner_start == ""
    assert (path.parent / "state.db.premigrate.bak").exists()
    store.close()


def test_failed_migration_restores_the_backup(tmp_path):
    path = tmp_path / "db.sqlite"
    conn = open_database(
        path, "demo", [Migration(1, "create", "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")]
    )
    conn.close()
    broken = [
        Migration(1, "create", ""),
        Migration(2, "add column", "ALTER TABLE t ADD COLUMN y INTEGER;"),
        Migration(3, "broken", "INSERT INTO no_such_table VALUES (1);"),
    ]
    with pytest.raises(MigrationError, match="migration 3 .*restored"):
        open_database(path, "demo", broken)
    check = sqlite3.connect(path)
    assert [r[1] for r in check.execute("PRAGMA table_info(t)")] == ["x"]  # migration 2 was rolled back too
    assert check.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == 1
    check.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "db.sqlite"
    open_database(
        path, "demo", [Migration(1, "a", "CREATE TABLE a (x);"), Migration(2, "b", "CREATE TABLE b (x);")]
    ).close()
    with pytest.raises(MigrationError, match="newer than this matchlock"):
        open_database(path, "demo", [Migration(1, "a", "CREATE TABLE a (x);")])


def test_transitions():
    check_transition(None, phases.CREATING)
    check_transition(phases.RUNNING, phases.STOPPING)
    check_transition(phases.RUNNING, phases.RUNNING)  # self-transitions are always allowed
    for current, new in [(None, phases.RUNNING), (phases.CLEANED, phases.CLEANING), (phases.CREATING, phases.RUNNING),
                         (phases.STOPPED, phases.RUNNING), (phases.RUNNING, "bogus")]:  # fmt: skip
        with pytest.raises(TransitionError):
            check_transition(current, new)


def test_lifecycle_is_append_only(store):
    store.register("vm-00000001", image="img", config={})
    store.add_resources("vm-00000001", upper_disk="/x")
    store.transition("vm-00000001", phases.CREATED)
    store.mark_cleanup("vm-00000001", "upper_remove", "boom")
    with pytest.raises(TransitionError):
        store.transition("vm-00000001", phases.CLEANED)
    history = store.history("vm-00000001")
    assert [r.version for r in history] == [1, 2, 3, 4]
    assert [r.phase for r in history] == [phases.CREATING, phases.CREATING, phases.CREATED, phases.CREATED]
    latest = store.lifecycle("vm-00000001")
    assert latest.resources["upper_disk"] == "/x" and latest.cleanup["upper_remove"].error == "boom"
    assert latest.last_error == "boom"
    assert history[0].resources == {"state_dir": str(store.vm_dir("vm-00000001"))}


def test_process_identity_detects_death_zombies_and_reuse():
    assert process_identity(os.getpid())
    assert process_identity(_dead_pid()) == ""
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while " Z " not in open(f"/proc/{zombie.pid}/stat").read() and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until it has exited; nobody reaps it yet
    assert process_identity(zombie.pid) == ""
    zombie.wait()


def test_dead_owner_is_marked_crashed(store):
    store.register("vm-00000002", image="img", config={}, pid=_dead_pid())
    assert [vm.status for vm in store.list()] == [OWNER_CRASHED]
    raw = store.conn.execute("SELECT status FROM vms WHERE id='vm-00000002'").fetchone()[0]
    assert raw == OWNER_CRASHED  # persisted, not only shown
    store.register("vm-00000003", image="img", config={})
    assert store.get("vm-00000003").status == OWNER_RUNNING


def test_concurrent_writers_do_not_conflict(tmp_path):
    script = (
        "import sys; from matchlock.state.store import StateStore; from pathlib import Path\n"
        "s = StateStore(Path(sys.argv[1]))\n"
        "for i in range(25):\n"
        "    vm = f'vm-{int(sys.argv[2]):02d}{i:06d}'\n"
        "    s.register(vm, image='img', config={}); s.add_resources(vm, x=i); s.transition(vm, 'created')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "s"), str(n)]) for n in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    store = StateStore(tmp_path / "s")
    assert len(store.list()) == 100
    assert all(len(store.history(vm.id)) == 3 for vm in store.list())
    store.close()


def test_public_config_hides_values():
    config = SandboxConfig(image="img", env={"API_KEY": "sk-live-123", "MODE": "x"})
    public = public_config(config)
    assert public["env"] == {"API_KEY": REDACTED, "MODE": REDACTED}
    assert "sk-live-123" not in json.dumps(public)


def test_reconcile_removes_recorded_leftovers_once(store, tmp_path):
    upper = tmp_path / "upper.ext4"
    upper.write_bytes(b"disk")
    leftover = subprocess.Popen(["sleep", "600"])
    store.register("vm-00000004", image="img", config={}, pid=_dead_pid())
    store.add_resources("vm-00000004", upper_disk=str(upper), exec_socket=str(tmp_path / "exec.sock"),
                        qemu_pid=leftover.pid, qemu_identity=process_identity(leftover.pid))  # fmt: skip
    first = reconciler.reconcile(store, "vm-00000004")
    assert sorted(first.cleaned) == ["qemu_kill", "upper_remove"] and not first.failed
    assert leftover.wait(timeout=10) == -9 and not upper.exists()
    assert store.lifecycle("vm-00000004").phase == phases.CLEANED
    second = reconciler.reconcile(store, "vm-00000004")
    assert second.cleaned == [] and second.failed == []


def test_reconcile_never_kills_a_recycled_pid(store):
    innocent = subprocess.Popen(["sleep", "600"])
    try:
        store.register("vm-00000005", image="img", config={}, pid=_dead_pid())
        store.add_resources("vm-00000005", qemu_pid=innocent.pid, qemu_identity="another-boot:123")
        assert reconciler.reconcile(store, "vm-00000005").cleaned == []
        assert innocent.poll() is None
    finally:
        innocent.kill()
        innocent.wait()


def test_running_sandbox_is_skipped_unless_forced(store, tmp_path):
    upper = tmp_path / "upper"
    upper.write_bytes(b"x")
    store.register("vm-00000006", image="img", config={})  # owned by this live process
    store.add_resources("vm-00000006", upper_disk=str(upper))
    assert reconciler.reconcile(store, "vm-00000006").skipped == "VM is running"
    assert upper.exists()
    with pytest.raises(reconciler.VMRunningError, match="kill vm-00000006"):
        reconciler.remove(store, store.get("vm-00000006"))
    owner = subprocess.Popen(["sleep", "60"])  # a live owner that a forced reconcile may stop
    try:
        store.set_status("vm-00000006", "running", pid=owner.pid)
        assert reconciler.reconcile(store, "vm-00000006", force=True).cleaned == ["upper_remove"]
        assert owner.wait(timeout=5) == -signal.SIGTERM  # asked to close, not killed
    finally:
        owner.kill()
    # Nothing is left shown as running (issue 10, item 8).
    assert store.get("vm-00000006").status == "crashed"


def test_forced_reconcile_kills_an_owner_that_ignores_sigterm(store):
    owner = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"], stdout=subprocess.PIPE
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline() == b"ready\n"  # the trap is in place
        store.register("vm-0000000b", image="img", config={}, pid=owner.pid)
        assert reconciler.stop_owner(store.get("vm-0000000b"), grace=0.5) is True
        assert owner.wait(timeout=5) == -signal.SIGKILL
    finally:
        owner.kill()


def test_remove_deletes_state_and_directory(store):
    store.register("vm-00000007", image="img", config={}, pid=_dead_pid())
    directory = store.vm_dir("vm-00000007")
    (directory / "logs").mkdir(parents=True)
    reconciler.remove(store, store.get("vm-00000007"))
    assert not directory.exists() and store.get("vm-00000007") is None and store.history("vm-00000007") == []


def test_a_refused_transition_is_recorded_not_swallowed(store):
    from matchlock.sandbox.tracking import Tracker

    tracker = Tracker(store, "vm-00000008")
    tracker.register("img", {})
    tracker.move(phases.CLEANED, error="boot failed")  # creating -> cleaned is not a transition
    latest = store.lifecycle("vm-00000008")
    assert latest.phase == tracker.phase == phases.CREATING
    assert latest.last_error == "lifecycle cannot go from 'creating' to 'cleaned' (after: boot failed)"


def test_reconcile_records_leftovers_of_a_cleaned_sandbox(store, tmp_path):
    upper = tmp_path / "upper.ext4"
    upper.write_bytes(b"disk")
    store.register("vm-00000009", image="img", config={}, pid=_dead_pid())
    for phase in (phases.CLEANING, phases.CLEANED):
        store.transition("vm-00000009", phase)
    store.add_resources("vm-00000009", upper_disk=str(upper))
    assert reconciler.reconcile(store, "vm-00000009").cleaned == ["upper_remove"]
    latest = store.lifecycle("vm-00000009")
    assert latest.phase == phases.CLEANED and not upper.exists()
    assert latest.last_error == "reconcile: lifecycle cannot go from 'cleaned' to 'cleaning'"


def test_ids_are_taken_by_unique_prefix(store):
    for vm_id in ("vm-abc00001", "vm-abc00002", "vm-def00003"):
        store.register(vm_id, image="img", config={}, pid=_dead_pid())
    assert store.require("vm-def").id == "vm-def00003"
    assert store.require("def").id == "vm-def00003"  # the vm- may be left off
    assert store.require("vm-abc00002").id == "vm-abc00002"
    with pytest.raises(UsageError, match="ambiguous: it matches vm-abc00001, vm-abc00002"):
        store.require("abc")
    with pytest.raises(NotFoundError, match="VM vm-zzz not found"):
        store.require("vm-zzz")
