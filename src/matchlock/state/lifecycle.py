"""The sandbox lifecycle: phases, the transitions allowed between them, and records.

A record is appended for every change (never updated in place), so the
history of a sandbox shows what happened and in what order, and which
cleanup steps succeeded, even after its owning process died.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..api.errors import MatchlockError

CREATING = "creating"
CREATED = "created"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"
CLEANING = "cleaning"
CLEANED = "cleaned"
CREATE_FAILED = "create_failed"
START_FAILED = "start_failed"
STOP_FAILED = "stop_failed"
CLEANUP_FAILED = "cleanup_failed"

TRANSITIONS: dict[str, frozenset[str]] = {
    CREATING: frozenset({CREATED, CREATE_FAILED, CLEANING}),
    CREATED: frozenset({STARTING, STOPPING, CLEANING}),
    STARTING: frozenset({RUNNING, START_FAILED, STOPPING, CLEANING}),
    RUNNING: frozenset({STOPPING, CLEANING}),
    STOPPING: frozenset({STOPPED, STOP_FAILED, CLEANING}),
    STOPPED: frozenset({CLEANING, CLEANED}),
    CLEANING: frozenset({CLEANED, CLEANUP_FAILED}),
    CREATE_FAILED: frozenset({CLEANING, CLEANUP_FAILED}),
    START_FAILED: frozenset({STOPPING, CLEANING, CLEANUP_FAILED}),
    STOP_FAILED: frozenset({CLEANING, CLEANUP_FAILED}),
    CLEANUP_FAILED: frozenset({CLEANING, CLEANED}),
    CLEANED: frozenset(),
}


class TransitionError(MatchlockError):
    pass


def check_transition(current: str | None, new: str) -> None:
    if new not in TRANSITIONS:
        raise TransitionError(f"unknown lifecycle phase {new!r}")
    if current is None:
        if new != CREATING:
            raise TransitionError(f"a lifecycle starts in {CREATING!r}, not {new!r}")
        return
    if new != current and new not in TRANSITIONS[current]:
        raise TransitionError(f"lifecycle cannot go from {current!r} to {new!r}")


@dataclass(frozen=True)
class CleanupStep:
    status: str  # "ok" | "error"
    updated_at: str
    error: str = ""

    def to_json(self) -> dict:
        out = {"status": self.status, "updated_at": self.updated_at}
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class LifecycleRecord:
    vm_id: str
    version: int
    phase: str
    updated_at: str
    backend: str = "qemu"
    last_error: str = ""
    resources: dict = field(default_factory=dict)
    cleanup: dict[str, CleanupStep] = field(default_factory=dict)

    def evolve(self, **changes) -> LifecycleRecord:
        return replace(self, **changes)

    def to_json(self) -> dict:
        out = {
            "version": self.version,
            "vm_id": self.vm_id,
            "backend": self.backend,
            "phase": self.phase,
            "updated_at": self.updated_at,
            "resources": dict(self.resources),
            "cleanup": {name: step.to_json() for name, step in self.cleanup.items()},
        }
        if self.last_error:
            out["last_error"] = self.last_error
        return out
