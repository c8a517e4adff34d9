"""Lifecycle bookkeeping for one sandbox, a no-op when there is no state store.

In-process users (tests, benchmarks, the SDK's embedded mode) may run a
sandbox without persistent state; the CLI and the RPC server always pass a
store, so `list`, `inspect` and `gc` see every sandbox they start.
"""

from __future__ import annotations

from ..state import lifecycle as phases
from ..state.lifecycle import TransitionError
from ..state.store import OWNER_CRASHED, OWNER_STOPPED, StateStore, process_identity


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
        """Advance the phase. A transition the state machine forbids is a bug: it is recorded
        as the sandbox's `last_error` (with the error that came with it), not raised, so the
        cleanup that is usually under way goes on."""
        store = self._store()
        if store is None:
            return
        try:
            store.transition(self.vm_id, phase, error=error)
        except TransitionError as exc:
            store.record_error(self.vm_id, str(exc) if error is None else f"{exc} (after: {error})")
            return
        self.phase = phase

    def _store(self) -> StateStore | None:
        return self.store if self.registered else None

    def resources(self, **resources) -> None:
        if (store := self._store()) is not None:
            store.add_resources(self.vm_id, **resources)

    def record_process(self, name: str, pid: int) -> None:
        self.resources(**{f"{name}_pid": pid, f"{name}_identity": process_identity(pid)})

    def record(self, step: str, error: str | None = None) -> None:
        if (store := self._store()) is not None:
            store.mark_cleanup(self.vm_id, step, error)

    def cleanup(self, step: str, action) -> bool:
        """Run one cleanup step and record its outcome; never raises."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - every step must run and be reported
            self.record(step, f"{type(exc).__name__}: {exc}")
            return False
        self.record(step)
        return True

    def finish(self, *, remove: bool, failed: bool, crashed: bool = False) -> None:
        """The last record: removed, or kept as `stopped` (`crashed` when the VM died under its owner)."""
        store = self._store()
        if store is None:
            return
        if remove:
            store.remove(self.vm_id)
            return
        self.move(phases.CLEANUP_FAILED if failed else phases.CLEANED)
        store.set_status(self.vm_id, OWNER_CRASHED if crashed else OWNER_STOPPED, pid=0)
