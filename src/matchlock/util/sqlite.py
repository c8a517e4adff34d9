"""SQLite with WAL, a busy timeout and versioned migrations.

Each module (`state`, `image`, ...) declares an ordered list of migrations.
Opening a database applies the pending ones under an exclusive file lock;
before the first pending migration the database is copied with
`VACUUM INTO`, and if any migration fails the copy is put back, so a bad
upgrade never leaves a half-migrated database behind.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ..api.errors import MatchlockError
from .fs import file_lock

BUSY_TIMEOUT_MS = 15000


class MigrationError(MatchlockError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: str | Callable[[sqlite3.Connection], None]  # SQL script or a function


def utc_now(timespec: Literal["seconds", "microseconds"] = "microseconds") -> str:
    """RFC3339 in UTC with a `Z` suffix, e.g. `2026-01-02T03:04:05.123456Z`."""
    return datetime.now(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def open_database(path: Path, module: str, migrations: Sequence[Migration]) -> sqlite3.Connection:
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError(f"{module}: migration versions must be unique and increasing")
    # The whole first open (journal mode, schema table, migrations) happens under
    # one lock: processes racing to create a fresh database must not interleave.
    with file_lock(path.with_name(path.name + ".init.lock")):
        conn = connect(path)
        try:
            pending = _pending(conn, module, migrations)
            if pending:
                conn = _migrate(conn, path, module, pending)
        except BaseException:
            conn.close()
            raise
    return conn


def _pending(conn: sqlite3.Connection, module: str, migrations: Sequence[Migration]) -> list[Migration]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " module TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL, applied_at TEXT NOT NULL,"
        " PRIMARY KEY (module, version))"
    )
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations WHERE module = ?", (module,))}
    newest = max(applied, default=0)
    known = max((m.version for m in migrations), default=0)
    if newest > known:
        raise MigrationError(
            f"{module} schema version {newest} is newer than this matchlock understands ({known}); "
            "upgrade matchlock or move the state directory aside"
        )
    return [m for m in migrations if m.version not in applied]


def _migrate(conn: sqlite3.Connection, path: Path, module: str, pending: list[Migration]) -> sqlite3.Connection:
    backup = path.with_name(path.name + ".premigrate.bak")
    backup.unlink(missing_ok=True)
    conn.execute("VACUUM INTO ?", (str(backup),))
    for migration in pending:
        try:
            conn.execute("BEGIN IMMEDIATE")
            if isinstance(migration.apply, str):
                for statement in _statements(migration.apply):
                    conn.execute(statement)
            else:
                migration.apply(conn)
            conn.execute(
                "INSERT INTO schema_migrations (module, version, name, applied_at) VALUES (?, ?, ?, ?)",
                (module, migration.version, migration.name, utc_now()),
            )
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            _restore(path, backup)
            raise MigrationError(
                f"{module} migration {migration.version} ({migration.name}) failed: {exc}; "
                f"the database was restored from {backup.name}"
            ) from exc
    return conn


def _statements(script: str) -> list[str]:
    # executescript() would COMMIT our transaction; split on complete statements instead.
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):  # false when the ';' sits inside a string literal
            statements.append(current.strip())
            current = ""
    if current.strip(" \n\t;"):
        statements.append(current.strip())
    return [s for s in statements if s.strip(" \n\t;")]


def _restore(path: Path, backup: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    shutil.copyfile(backup, path)
    os.chmod(path, 0o600)
