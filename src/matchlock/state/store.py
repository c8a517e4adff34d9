"""Persistent sandbox state in `~/.matchlock/state.db`.

`vms` holds one row per sandbox: its owner (the `run` or `rpc` process that
supervises it), status and public config. The owner is identified by PID
*and* process start time, so a recycled PID never makes a dead sandbox look
alive. `vm_lifecycle` is the append-only history of each sandbox, with the
resources it created (recorded before they are created) and the result of
every cleanup step.

Config is stored without secrets: environment values are replaced by a
marker and secret values are never written.
"""

from __future__ import annotations

import builtins
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import NotFoundError
from ..api.paths import match_vm_id, state_dir
from ..util.sqlite import Migration, open_database, utc_now
from .lifecycle import CLEANUP_FAILED, CREATING, CleanupStep, LifecycleRecord, check_transition
from .snapshots import MIGRATION as SNAPSHOTS_MIGRATION

# Whether the owner of a sandbox is alive (`vms.status`); not the lifecycle phase, which says
# what the sandbox itself is doing. The values are stored and shown as they are.
OWNER_RUNNING, OWNER_STOPPED, OWNER_CRASHED = "running", "stopped", "crashed"
STATUSES = (OWNER_RUNNING, OWNER_STOPPED, OWNER_CRASHED)

MIGRATIONS = [
    Migration(
        1,
        "vms and lifecycle",
        """
        CREATE TABLE vms (
            id TEXT PRIMARY KEY,
            pid INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL,
            image TEXT NOT NULL,
            config_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE vm_lifecycle (
            vm_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            backend TEXT NOT NULL,
            phase TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            last_error TEXT NOT NULL DEFAULT '',
            resources_json TEXT NOT NULL,
            cleanup_json TEXT NOT NULL,
            PRIMARY KEY (vm_id, version)
        );
        """,
    ),
    Migration(
        2,
        "owner start time",
        """
        ALTER TABLE vms ADD COLUMN owner_start TEXT NOT NULL DEFAULT '';
        CREATE INDEX vms_status ON vms (status);
        """,
    ),
    SNAPSHOTS_MIGRATION,
]


def process_identity(pid: int) -> str:
    """`<boot id>:<start ticks>` of a live process, or "" if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie is dead; only its parent has not noticed yet
        return ""
    return f"{boot_id}:{fields[19]}"


@dataclass(frozen=True)
class VMState:
    id: str
    pid: int
    status: str
    image: str
    created_at: str
    config: dict
    owner_start: str = ""
    paused: bool = False  # vCPUs stopped by `matchlock pause`; meaningful while the owner runs

    @property
    def shown_status(self) -> str:
        """The `list` table's STATUS: `paused` for a running sandbox whose vCPUs are stopped."""
        return "paused" if self.is_paused else self.status

    @property
    def is_paused(self) -> bool:
        return self.paused and self.status == OWNER_RUNNING

    def to_json(self) -> dict:
        """`get`, `inspect` and `list --json`: `status` stays the owner's (running, stopped, crashed, as the
        contracts have it; `list --running` selects on it), and `paused`, in every object, says whether the
        vCPUs are stopped, so every sandbox has the same keys."""
        return {
            "id": self.id,
            "pid": self.pid,
            "status": self.status,
            "paused": self.is_paused,
            "image": self.image,
            "created_at": self.created_at,
            "config": self.config,
        }


class StateStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.root / "state.db"
        self.conn = open_database(self.path, "state", MIGRATIONS)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        self.conn.close()

    def vm_dir(self, vm_id: str) -> Path:
        return self.root / "vms" / vm_id

    # --- vms ------------------------------------------------------------------

    def register(self, vm_id: str, *, image: str, config: dict, pid: int | None = None) -> LifecycleRecord:
        """Record a new sandbox owned by this process, in phase `creating`."""
        pid = os.getpid() if pid is None else pid
        now = utc_now()
        record = LifecycleRecord(vm_id, 1, CREATING, now, resources={"state_dir": str(self.vm_dir(vm_id))})
        with self._transaction():
            self.conn.execute(
                "INSERT INTO vms (id, pid, owner_start, status, image, config_json, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (vm_id, pid, process_identity(pid), OWNER_RUNNING, image, json.dumps(config), now, now),
            )
            self._insert_record(record)
        return record

    def get(self, vm_id: str) -> VMState | None:
        row = self.conn.execute("SELECT * FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return self._detect_crash(self._state(row)) if row else None

    def require(self, vm_id: str) -> VMState:
        """The sandbox `vm_id` names: its ID or a unique prefix of it."""
        vm = self.get(vm_id)
        if vm is None:
            ids = [row[0] for row in self.conn.execute("SELECT id FROM vms")]
            match = match_vm_id(vm_id, ids)
            vm = self.get(match) if match else None
        if vm is None:
            raise NotFoundError(f"VM {vm_id} not found (see `matchlock list`)")
        return vm

    def list(self) -> list[VMState]:
        rows = self.conn.execute("SELECT * FROM vms ORDER BY created_at").fetchall()
        return [self._detect_crash(self._state(row)) for row in rows]

    def set_status(self, vm_id: str, status: str, *, pid: int | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._transaction():
            if pid is None:
                self.conn.execute("UPDATE vms SET status = ?, updated_at = ? WHERE id = ?", (status, utc_now(), vm_id))
            else:
                self.conn.execute(
                    "UPDATE vms SET status = ?, pid = ?, owner_start = ?, updated_at = ? WHERE id = ?",
                    (status, pid, process_identity(pid) if pid else "", utc_now(), vm_id),
                )

    def remove(self, vm_id: str) -> None:
        with self._transaction():
            self.conn.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
            self.conn.execute("DELETE FROM vm_lifecycle WHERE vm_id = ?", (vm_id,))

    def owner_alive(self, vm: VMState) -> bool:
        return vm.pid > 0 and bool(vm.owner_start) and process_identity(vm.pid) == vm.owner_start

    def _detect_crash(self, vm: VMState) -> VMState:
        if vm.status != OWNER_RUNNING or self.owner_alive(vm):
            return vm
        self.conn.execute(
            "UPDATE vms SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
            (OWNER_CRASHED, utc_now(), vm.id, OWNER_RUNNING),
        )
        return VMState(vm.id, vm.pid, OWNER_CRASHED, vm.image, vm.created_at, vm.config, vm.owner_start)

    @staticmethod
    def _state(row) -> VMState:
        return VMState(
            id=row["id"], pid=row["pid"], status=row["status"], image=row["image"],
            created_at=row["created_at"], config=json.loads(row["config_json"]), owner_start=row["owner_start"],
            paused=bool(row["paused"]),
        )  # fmt: skip

    # --- lifecycle ---------------------------------------------------------------

    def lifecycle(self, vm_id: str) -> LifecycleRecord | None:
        row = self.conn.execute(
            "SELECT * FROM vm_lifecycle WHERE vm_id = ? ORDER BY version DESC LIMIT 1", (vm_id,)
        ).fetchone()
        return self._record(row) if row else None

    def history(self, vm_id: str) -> builtins.list[LifecycleRecord]:  # `list` is a method here
        rows = self.conn.execute("SELECT * FROM vm_lifecycle WHERE vm_id = ? ORDER BY version", (vm_id,))
        return [self._record(row) for row in rows]

    def transition(self, vm_id: str, phase: str, *, error: str | None = None) -> LifecycleRecord:
        def change(record: LifecycleRecord) -> LifecycleRecord:
            check_transition(record.phase, phase)
            return record.evolve(phase=phase, last_error=error if error is not None else record.last_error)

        return self._append(vm_id, change)

    def record_error(self, vm_id: str, error: str) -> LifecycleRecord:
        """Note a problem (a refused transition, say) as the latest record's `last_error`; the phase stays."""
        return self._append(vm_id, lambda r: r.evolve(last_error=error))

    def add_resources(self, vm_id: str, **resources) -> LifecycleRecord:
        """Record resources *before* creating them, so cleanup can always find them."""
        return self._append(vm_id, lambda r: r.evolve(resources={**r.resources, **resources}))

    def mark_cleanup(self, vm_id: str, step: str, error: str | None = None) -> LifecycleRecord:
        entry = CleanupStep("error" if error else "ok", utc_now(), error or "")

        def change(record: LifecycleRecord) -> LifecycleRecord:
            changed = record.evolve(cleanup={**record.cleanup, step: entry})
            return changed.evolve(last_error=error) if error else changed

        return self._append(vm_id, change)

    def ensure_lifecycle(self, vm_id: str, backend: str = "unknown") -> LifecycleRecord:
        """A record for a sandbox that has none (created by an older version, say)."""
        record = self.lifecycle(vm_id)
        if record is not None:
            return record
        record = LifecycleRecord(vm_id, 1, CLEANUP_FAILED, utc_now(), backend=backend)
        with self._transaction():
            self._insert_record(record)
        return record

    def _append(self, vm_id: str, change) -> LifecycleRecord:
        with self._transaction():
            current = self.lifecycle(vm_id)
            if current is None:
                raise NotFoundError(f"VM {vm_id} has no lifecycle record")
            record = change(current).evolve(version=current.version + 1, updated_at=utc_now())
            self._insert_record(record)
        return record

    def _insert_record(self, record: LifecycleRecord) -> None:
        self.conn.execute(
            "INSERT INTO vm_lifecycle (vm_id, version, backend, phase, updated_at, last_error, resources_json,"
            " cleanup_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.vm_id, record.version, record.backend, record.phase, record.updated_at, record.last_error,
                json.dumps(record.resources), json.dumps({k: v.to_json() for k, v in record.cleanup.items()}),
            ),
        )  # fmt: skip

    @staticmethod
    def _record(row) -> LifecycleRecord:
        cleanup = {
            name: CleanupStep(step["status"], step["updated_at"], step.get("error", ""))
            for name, step in json.loads(row["cleanup_json"]).items()
        }
        return LifecycleRecord(
            vm_id=row["vm_id"], version=row["version"], phase=row["phase"], updated_at=row["updated_at"],
            backend=row["backend"], last_error=row["last_error"], resources=json.loads(row["resources_json"]),
            cleanup=cleanup,
        )  # fmt: skip

    def _transaction(self):
        return _Transaction(self.conn)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, re-entrant (nested blocks join the outer one)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.outer = False

    def __enter__(self):
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.outer:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
