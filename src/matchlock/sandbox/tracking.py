"""Lifecycle bookkeeping for one sandbox, a no-op when there is no state store.

In-process users (tests, benchmarks, the SDK's embedded mode) may run a
sandbox without persistent state; the CLI and the RPC server always pass a
store, so `list`, `inspect` and `gc` see every sandbox they start.
"""

from __future__ import annotations

import contextlib

from ..state import lifecycle as phases
from ..state.lifecycle import TransitionError
from ..state.store import STOPPED, StateStore, process_identity


class Tracker:
    def __init__(self, store: StateStore | None, vm_id: str) -> None:
        self.store = store
        self.vm_id = vm_id
        self.registered = False
        self.phase: str | None = None

    def register(self, image: str, config: dict) -> None:
        if self.store is not None:
            self.store.register(self.vm_id, image=image, config=config)
            self.registered = True
            self.phase = phases.CREATING

    def move(self, phase: str, error: str | None = None) -> None:
        """Advance the phase; a transition the state machine forbids is skipped, not fatal."""
        if not self.registered:
            return
        with contextlib.suppress(TransitionError):
            self.store.transition(self.vm_id, phase, error=error)
            self.phase = phase

    def resources(self, **resources) -> None:
        if self.registered:
            self.store.add_resources(self.vm_id, **resources)

    def record_process(self, name: str, pid: int) -> None:
        self.resources(**{f"{name}_pid": pid, f"{name}_identity": process_identity(pid)})

    def record(self, step: str, error: str | None = None) -> None:
        if self.registered:
            self.store.mark_cleanup(self.vm_id, step, error)

    def cleanup(self, step: str, action) -> bool:
        """Run one cleanup step and record its outcome; never raises."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - every step must run and be reported
            self.record(step, f"{type(exc).__name__}: {exc}")
            return False
        self.record(step)
        return True

    def finish(self, *, remove: bool, failed: bool) -> None:
        if not self.registered:
            return
        if remove:
            self.store.remove(self.vm_id)
            return
        self.move(phases.CLEANUP_FAILED if failed else phases.CLEANED)
        self.store.set_status(self.vm_id, STOPPED, pid=0)
