"""Reconcile: remove what a sandbox left behind, from what its lifecycle recorded.

Every resource is recorded before it is created, so after a crash (owner
killed with -9, machine rebooted) this finds all of it. Each step is
recorded, and a step with nothing to do is not reported, so a second run
finds nothing left to clean.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..api.errors import MatchlockError
from . import lifecycle as phases
from .lifecycle import TransitionError
from .store import OWNER_RUNNING, StateStore, VMState, process_identity


class VMRunningError(MatchlockError):
    pass


@dataclass
class ReconcileResult:
    vm_id: str
    cleaned: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: str | None = None


def _kill_recorded_process(pid, identity) -> bool:
    if not pid or not identity or process_identity(int(pid)) != identity:
        return False
    os.kill(int(pid), signal.SIGKILL)
    if not wait_gone(int(pid), identity, 5):
        raise RuntimeError(f"process {pid} survived SIGKILL")
    return True


def _remove_file(path) -> bool:
    if not path or not os.path.lexists(path):
        return False
    os.unlink(path)
    return True


STEPS: list[tuple[str, Callable[[dict], bool]]] = [
    ("qemu_kill", lambda r: _kill_recorded_process(r.get("qemu_pid"), r.get("qemu_identity"))),
    ("exec_socket_remove", lambda r: _remove_file(r.get("exec_socket"))),
    ("upper_remove", lambda r: _remove_file(r.get("upper_disk"))),
]


OWNER_GRACE_SECONDS = 10.0


def stop_owner(vm: VMState, grace: float = OWNER_GRACE_SECONDS) -> bool:
    """SIGTERM the live owner of `vm` and wait for it to close the sandbox; SIGKILL after `grace` seconds.

    True if it had to be killed (its QEMU dies with it: parent-death signal).
    """
    try:
        os.kill(vm.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False  # it exited on its own meanwhile
    if wait_gone(vm.pid, vm.owner_start, grace):
        return False
    os.kill(vm.pid, signal.SIGKILL)
    if not wait_gone(vm.pid, vm.owner_start, 5):
        raise RuntimeError(f"owner {vm.pid} of {vm.id} survived SIGKILL")
    return True


def wait_gone(pid: int, identity: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_identity(pid) == identity:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def reconcile(store: StateStore, vm_id: str, *, force: bool = False) -> ReconcileResult:
    vm = store.require(vm_id)
    result = ReconcileResult(vm_id)
    if vm.status == OWNER_RUNNING and store.owner_alive(vm):
        if not force:
            result.skipped = "VM is running"
            return result
        # Forced: the owner closes the sandbox (or dies trying), so nothing is left shown as running.
        try:
            if stop_owner(vm):
                result.cleaned.append("owner_kill")
        except (OSError, RuntimeError) as exc:
            result.failed.append(("owner_stop", str(exc)))
            return result
        vm = store.require(vm_id)  # a killed owner now reads as crashed
    resources = store.ensure_lifecycle(vm_id).resources
    started = False
    for name, step in STEPS:
        try:
            did_something = step(resources)
        except Exception as exc:  # noqa: BLE001 - report every failure, keep going
            started = started or _begin(store, vm_id)
            store.mark_cleanup(vm_id, name, f"{type(exc).__name__}: {exc}")
            result.failed.append((name, str(exc)))
            continue
        if did_something:
            started = started or _begin(store, vm_id)
            store.mark_cleanup(vm_id, name)
            result.cleaned.append(name)
    if started:
        _move(store, vm_id, phases.CLEANUP_FAILED if result.failed else phases.CLEANED)
    return result


def _begin(store: StateStore, vm_id: str) -> bool:
    _move(store, vm_id, phases.CLEANING)
    return True


def _move(store: StateStore, vm_id: str, phase: str) -> None:
    # Every phase but `cleaned` may move to cleaning; a `cleaned` sandbox
    # that still had leftovers keeps its phase, and the refused move is
    # recorded as its last error next to the cleanup steps.
    try:
        store.transition(vm_id, phase)
    except TransitionError as exc:
        store.record_error(vm_id, f"reconcile: {exc}")


def remove(store: StateStore, vm: VMState) -> ReconcileResult:
    """Reconcile, then delete the sandbox's state and directory (`rm`, `prune`)."""
    result = reconcile(store, vm.id)
    if result.skipped:
        raise VMRunningError(f"VM {vm.id} is running (owner PID {vm.pid}); stop it first: matchlock kill {vm.id}")
    if result.failed:
        step, error = result.failed[0]
        raise MatchlockError(f"VM {vm.id}: cleanup step {step} failed: {error}; the VM was kept")
    directory = Path(store.vm_dir(vm.id))
    if directory.exists():
        shutil.rmtree(directory)
    store.remove(vm.id)
    return result
