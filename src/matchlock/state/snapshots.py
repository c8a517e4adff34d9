"""Snapshot records in the state database, and the `paused` mark of a sandbox.

A snapshot is a directory under `<state>/snapshots/<name>` (the saved memory
for a full one, a copy of the upper disk, `meta.json`) and a row here. The
row is written first, as `creating`, and becomes `ready` only after every
file is complete: a snapshot whose creator died half way is never listed as
usable, and `gc` (`partial_snapshots`) finds its pieces.

Nothing here holds a secret value: the metadata names the secrets the
sandbox's policy used (so a restore can insist on them) and their
placeholders, which the guest already knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..api.errors import MatchlockError, NotFoundError, UsageError
from ..util.fs import try_directory_lock
from ..util.sqlite import Migration, utc_now

if TYPE_CHECKING:
    from .store import StateStore

MODES = ("full", "filesystem")
CREATING, READY = "creating", "ready"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

MIGRATION = Migration(
    3,
    "snapshots and paused",
    """
    ALTER TABLE vms ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE snapshots (
        name TEXT PRIMARY KEY,
        source_vm TEXT NOT NULL,
        mode TEXT NOT NULL,
        status TEXT NOT NULL,
        size INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        meta_json TEXT NOT NULL DEFAULT '{}'
    );
    """,
)


class RestoreMismatch(UsageError):
    """A setting of a restore that its snapshot cannot take (raised by `sandbox.snapshots.Restore.prepare`).

    Each front end names the setting its own way: `field` as RPC `create` does (`network.secrets.API_KEY`),
    `flag` as `run --from-snapshot` does (`--secret API_KEY`). `problem` follows either name, and
    `fixes["cli"]` / `fixes["rpc"]` say what to do there. The message is the CLI's.
    """

    def __init__(self, field: str, flag: str, problem: str, *, cli: str, rpc: str) -> None:
        self.field, self.flag, self.problem = field, flag, problem
        self.fixes = {"cli": cli, "rpc": rpc}
        super().__init__(self.explain("cli"))

    def explain(self, front: str) -> str:
        """`front` is "cli" or "rpc"."""
        subject = self.flag if front == "cli" else self.field
        return f"{subject} {self.problem}; fix: {self.fixes[front]}"


def validate_name(name: str) -> str:
    if not NAME.match(name):
        raise UsageError(
            f"invalid snapshot name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def validate_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"invalid snapshot mode {mode!r}: use full (memory and disks) or filesystem (disks only)")
    return mode


@dataclass(frozen=True)
class SnapshotRecord:
    name: str
    source_vm: str
    mode: str
    status: str
    size: int
    created_at: str
    meta: dict

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "source_vm": self.source_vm,
            "mode": self.mode,
            "status": self.status,
            "size": self.size,
            "created_at": self.created_at,
            "image": self.meta.get("image", ""),
            "secrets": sorted(self.meta.get("secrets", {})),
        }


def snapshots_dir(store: StateStore) -> Path:
    return store.root / "snapshots"


def snapshot_dir(store: StateStore, name: str) -> Path:
    return snapshots_dir(store) / validate_name(name)


class NameTaken(UsageError):
    """`begin` found a snapshot of that name (ready, or still being made)."""


def name_taken(name: str) -> NameTaken:
    return NameTaken(f"a snapshot named {name!r} already exists; fix: pick another --name or `snapshot rm {name}`")


def begin(store: StateStore, name: str, source_vm: str, mode: str) -> Path:
    """Claim `name` (a clash is an error naming it) and return its empty directory."""
    validate_name(name)
    validate_mode(mode)
    with store._transaction():
        if store.conn.execute("SELECT 1 FROM snapshots WHERE name = ?", (name,)).fetchone():
            raise name_taken(name)
        store.conn.execute(
            "INSERT INTO snapshots (name, source_vm, mode, status, created_at) VALUES (?, ?, ?, ?, ?)",
            (name, source_vm, mode, CREATING, utc_now()),
        )
    directory = snapshot_dir(store, name)
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    return directory


def default_name(vm_id: str) -> str:
    return f"{vm_id}-{time.strftime('%Y%m%d-%H%M%S')}"


DEFAULT_NAME_TRIES = 100


def begin_named(store: StateStore, name: str, source_vm: str, mode: str) -> tuple[str, Path]:
    """`begin` with `name`, or without one the first free of `<id>-<time>`, `<id>-<time>-2`, ... (a
    second snapshot in the same second must not fail on a name nobody chose). Returns (name, directory)."""
    if name:
        return name, begin(store, name, source_vm, mode)
    base = default_name(source_vm)
    for attempt in range(1, DEFAULT_NAME_TRIES + 1):
        candidate = base if attempt == 1 else f"{base}-{attempt}"
        try:
            return candidate, begin(store, candidate, source_vm, mode)
        except NameTaken:
            continue
    raise name_taken(base)


def complete(store: StateStore, name: str, meta: dict) -> SnapshotRecord:
    """Mark `name` ready; its size counts only its own files (hard links to kernels and images are shared)."""
    directory = snapshot_dir(store, name)
    # Hard links to kernels and images are shared; the saved VFS state (vfs/) is all the snapshot's own.
    size = sum(st.st_blocks * 512 for st in (entry.lstat() for entry in directory.iterdir()) if st.st_nlink == 1)
    for root, _, names in os.walk(directory / "vfs"):
        size += sum(os.lstat(os.path.join(root, n)).st_blocks * 512 for n in names)
    with store._transaction():
        store.conn.execute(
            "UPDATE snapshots SET status = ?, size = ?, meta_json = ? WHERE name = ?",
            (READY, size, json.dumps(meta), name),
        )
    return require(store, name)


def _record(row) -> SnapshotRecord:
    return SnapshotRecord(
        row["name"], row["source_vm"], row["mode"], row["status"], row["size"], row["created_at"],
        json.loads(row["meta_json"]),
    )  # fmt: skip


def get(store: StateStore, name: str) -> SnapshotRecord | None:
    row = store.conn.execute("SELECT * FROM snapshots WHERE name = ?", (name,)).fetchone()
    return _record(row) if row else None


def require(store: StateStore, name: str) -> SnapshotRecord:
    """A ready snapshot; an unknown or unfinished name is a NotFoundError that says so."""
    record = get(store, name)
    if record is None or record.status != READY:
        raise NotFoundError(f"snapshot {name!r} not found (see `matchlock snapshot ls`)")
    return record


def ready(store: StateStore) -> list[SnapshotRecord]:
    rows = store.conn.execute("SELECT * FROM snapshots WHERE status = ? ORDER BY created_at", (READY,))
    return [_record(row) for row in rows]


def partial(store: StateStore) -> list[SnapshotRecord]:
    """Snapshots still `creating` (being made, or their maker died)."""
    rows = store.conn.execute("SELECT * FROM snapshots WHERE status = ? ORDER BY created_at", (CREATING,))
    return [_record(row) for row in rows]


class SnapshotInUse(MatchlockError):
    """`remove` of a snapshot that a sandbox is still being restored from (`reading`)."""


REMOVE_WAIT_SECONDS = 30.0  # a restore holds its snapshot for about a second
REMOVE_POLL_SECONDS = 0.05


def remove(store: StateStore, name: str, *, wait: float = REMOVE_WAIT_SECONDS) -> None:
    """Forget a snapshot and delete its files (running clones keep their open copies).

    A snapshot a sandbox is being restored from (`reading`) goes once that restore has what it needs,
    waited for up to `wait` seconds (then SnapshotInUse): removed under it, its files would vanish while
    they are read, failing that start half way."""
    import shutil

    if get(store, name) is None:
        raise NotFoundError(f"snapshot {name!r} not found (see `matchlock snapshot ls`)")
    directory = snapshot_dir(store, name)
    deadline = time.monotonic() + wait
    while True:
        with try_directory_lock(directory) as locked:
            if locked is not False:
                shutil.rmtree(directory, ignore_errors=True)
                with store._transaction():
                    store.conn.execute("DELETE FROM snapshots WHERE name = ?", (name,))
                return
        if time.monotonic() >= deadline:
            raise SnapshotInUse(
                f"snapshot {name!r} is in use: a sandbox is still being restored from it; "
                f"fix: try again once it is up (`matchlock list`); it keeps running after the removal"
            )
        time.sleep(REMOVE_POLL_SECONDS)


@contextlib.contextmanager
def reading(directory: Path, name: str) -> Iterator[None]:
    """Hold snapshot `name` (its `directory`) for a restore: `remove` refuses it until the block ends."""
    gone = NotFoundError(
        f"snapshot {name!r} was removed before this restore could read it (see `matchlock snapshot ls`)"
    )
    with try_directory_lock(directory, shared=True) as locked:
        if not locked or not directory.is_dir():  # a removal holds it, or is done
            raise gone
        yield


def remove_abandoned(store: StateStore) -> list[str]:
    """Remove snapshots whose maker (the source sandbox's owner) died before finishing them, and
    directories no record names. Returns their names."""
    import shutil

    removed = []
    for record in partial(store):
        vm = store.get(record.source_vm)
        if vm is None or not store.owner_alive(vm):
            remove(store, record.name)
            removed.append(record.name)
    # The directories first, then the names: `begin` records a name before it makes the directory, so one
    # begun between the two reads is known; read the other way round, it was removed while being made.
    root = snapshots_dir(store)
    directories = list(root.iterdir()) if root.is_dir() else []
    known = {row["name"] for row in store.conn.execute("SELECT name FROM snapshots")}
    for directory in directories:
        if directory.name not in known:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
    return removed


def set_paused(store: StateStore, vm_id: str, paused: bool) -> None:
    with store._transaction():
        store.conn.execute("UPDATE vms SET paused = ?, updated_at = ? WHERE id = ?", (int(paused), utc_now(), vm_id))


def is_paused(store: StateStore, vm_id: str) -> bool:
    row = store.conn.execute("SELECT paused FROM vms WHERE id = ?", (vm_id,)).fetchone()
    return bool(row and row["paused"])
