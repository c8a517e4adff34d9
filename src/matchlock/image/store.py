"""The local image store: erofs blobs under `<images_dir>/blobs` plus SQLite metadata.

Blobs are content-addressed and immutable; rows map a tag to a blob. Every
write (blob or row) happens under `<images_dir>/.lock`, so concurrent
imports serialise their builds and the second one reuses the first's blob.
Verification and decompression run before the lock is taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from ..api.errors import ImageError, NotFoundError, UsageError
from ..api.fsutil import file_lock
from ..api.image import ImageConfig
from ..api.paths import images_dir
from . import archive, layers

DEFAULT_IMAGE = "matchlock/busybox:builtin"
LOCAL = "local"
_MAX_TAG = 255
_MIGRATIONS = [
    (
        1,
        "images",
        """CREATE TABLE IF NOT EXISTS images (
            scope TEXT NOT NULL,
            tag TEXT NOT NULL,
            digest TEXT NOT NULL,
            size INT NOT NULL,
            created_at TEXT NOT NULL,
            source TEXT NOT NULL,
            rootfs_path TEXT NOT NULL,
            oci_json TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (scope, tag)
        )""",
    ),
]


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_tag(tag: str) -> str:
    if not tag or len(tag) > _MAX_TAG or any(ch.isspace() for ch in tag):
        raise UsageError(f"invalid image tag {tag!r}: it must be 1-{_MAX_TAG} characters without whitespace")
    return tag


@dataclass(frozen=True)
class ImageInfo:
    tag: str
    digest: str
    lower_path: Path
    lower_fstype: str
    size: int  # bytes of the erofs blob
    config: ImageConfig
    source: str  # builtin | import | tag
    created_at: str  # RFC3339, UTC
    layers: int


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else images_dir()
        self.blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"

    # -- database -------------------------------------------------------

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.root / "metadata.db", timeout=15, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 15000")
            conn.execute("PRAGMA journal_mode = WAL")
            self._migrate(conn)
            yield conn
        finally:
            conn.close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " module TEXT NOT NULL, version INT NOT NULL, name TEXT NOT NULL, applied_at TEXT NOT NULL,"
            " PRIMARY KEY (module, version))"
        )
        done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations WHERE module = 'image'")}
        if all(version in done for version, _, _ in _MIGRATIONS):
            return
        conn.execute("BEGIN IMMEDIATE")  # re-check under the write lock: another process may have migrated
        try:
            done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations WHERE module = 'image'")}
            for version, name, sql in _MIGRATIONS:
                if version not in done:
                    conn.execute(sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (module, version, name, applied_at) VALUES ('image', ?, ?, ?)",
                        (version, name, now_rfc3339()),
                    )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _info(row: tuple) -> ImageInfo:
        tag, digest, size, created_at, source, rootfs_path, oci_json = row
        meta = json.loads(oci_json)
        return ImageInfo(
            tag=tag,
            digest=digest,
            lower_path=Path(rootfs_path),
            lower_fstype="erofs",
            size=int(size),
            config=ImageConfig.from_oci(meta.get("config") or {}),
            source=source,
            created_at=created_at,
            layers=len(meta.get("diff_ids") or []),
        )

    _COLUMNS = "tag, digest, size, created_at, source, rootfs_path, oci_json"

    # -- queries --------------------------------------------------------

    def get(self, tag: str) -> ImageInfo | None:
        with self._db() as conn:
            row = conn.execute(f"SELECT {self._COLUMNS} FROM images WHERE scope = ? AND tag = ?", (LOCAL, tag)).fetchone()
        return self._info(row) if row else None

    def list(self) -> list[ImageInfo]:
        with self._db() as conn:
            rows = conn.execute(f"SELECT {self._COLUMNS} FROM images WHERE scope = ? ORDER BY tag", (LOCAL,)).fetchall()
        return [self._info(row) for row in rows]

    def resolve(self, tag: str) -> ImageInfo:
        """The image to boot; the built-in default is built on first use."""
        validate_tag(tag)
        info = self.get(tag)
        if info is not None and info.lower_path.is_file() and info.lower_path.stat().st_size > 0:
            return info
        if tag == DEFAULT_IMAGE:
            return self._install_builtin()
        if info is not None:
            raise ImageError(f'image "{tag}" is damaged: {info.lower_path} is missing; import it again')
        raise NotFoundError(
            f'image "{tag}" not found locally; import it with: docker save {tag} | matchlock image import {tag}'
        )

    # -- writes ---------------------------------------------------------

    @contextlib.contextmanager
    def _workdir(self, purpose: str) -> Iterator[Path]:
        """Scratch space on the store's filesystem, named by pid so gc can spot leftovers."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{purpose}-{os.getpid()}-", dir=self._tmp))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def import_tarball(self, stream: BinaryIO, tag: str) -> ImageInfo:
        """Import a `docker save` or OCI-layout tarball (optionally gzip/zstd/xz/bzip2-compressed)."""
        validate_tag(tag)
        with self._workdir("import") as work:
            spool = work / "spool.tar"
            with open(spool, "wb") as out:  # tar needs seeking; stdin cannot seek
                shutil.copyfileobj(stream, out, 1 << 20)
            with open(spool, "rb") as f:
                packed = archive.compression(f.read(6))
            if packed:  # `docker save | gzip` and friends
                plain = work / "image.tar"
                archive.decompress_to(lambda path=spool: open(path, "rb"), "tarball", plain)
                spool.unlink()
                spool = plain
            with layers.load_archive(spool, work, tag) as image:
                meta = {
                    "config": image.config.get("config") or {},
                    "diff_ids": image.diff_ids,
                    "os": image.config.get("os", ""),
                    "architecture": image.config.get("architecture", ""),
                    "format": image.format,
                }
                return self._install(tag, "import", image.layers, image.diff_ids, image.digest, meta, work)

    def _install_builtin(self) -> ImageInfo:
        from . import builtin  # needs apt; only imported when the default image is missing

        with self._workdir("builtin") as work:
            prepared = builtin.prepare(work)
            with tarfile.open(fileobj=prepared.layer, mode="r:") as tar:
                meta = {
                    "config": prepared.config["config"],
                    "diff_ids": [prepared.diff_id],
                    "os": "linux",
                    "architecture": prepared.config["architecture"],
                    "busybox_version": prepared.version,
                }
                return self._install(DEFAULT_IMAGE, "builtin", [tar], [prepared.diff_id], prepared.digest, meta, work)

    def _install(
        self, tag: str, source: str, tars: list, diff_ids: list[str], digest: str, meta: dict, work: Path
    ) -> ImageInfo:
        with file_lock(self.root / ".lock"):
            lower = layers.build_lower(tars, diff_ids, self.blobs, work)
            stamp = now_rfc3339()
            with self._db() as conn:
                conn.execute(
                    "INSERT INTO images (scope, tag, digest, size, created_at, source, rootfs_path, oci_json, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (scope, tag) DO UPDATE SET digest = excluded.digest, size = excluded.size,"
                    " created_at = excluded.created_at, source = excluded.source, rootfs_path = excluded.rootfs_path,"
                    " oci_json = excluded.oci_json, updated_at = excluded.updated_at",
                    (LOCAL, tag, digest, lower.stat().st_size, stamp, source, str(lower), json.dumps(meta, sort_keys=True), stamp),
                )
                self._prune_locked(conn)  # a re-imported tag may have orphaned its old blob
        info = self.get(tag)
        assert info is not None
        return info

    def remove(self, tag: str) -> None:
        with file_lock(self.root / ".lock"), self._db() as conn:
            deleted = conn.execute("DELETE FROM images WHERE scope = ? AND tag = ?", (LOCAL, tag)).rowcount
            if not deleted:
                raise NotFoundError(f"image not found: {tag}")
            self._prune_locked(conn)

    def gc(self) -> int:
        """Delete blobs no image references (and leftovers of dead imports); returns the blob count."""
        with file_lock(self.root / ".lock"), self._db() as conn:
            removed = self._prune_locked(conn)
        self._clean_tmp()
        return removed

    def _prune_locked(self, conn: sqlite3.Connection) -> int:
        referenced = {Path(p).name for (p,) in conn.execute("SELECT rootfs_path FROM images")}
        removed = 0
        if self.blobs.is_dir():
            for entry in self.blobs.iterdir():
                # Under the lock no build is running, so stray *.tmp files are dead too.
                if entry.name not in referenced and (entry.is_file() or entry.is_symlink()):
                    entry.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _clean_tmp(self) -> None:
        if not self._tmp.is_dir():
            return
        for entry in self._tmp.iterdir():
            parts = entry.name.split("-")
            if len(parts) >= 3 and parts[1].isdigit() and not _alive(int(parts[1])):
                shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
