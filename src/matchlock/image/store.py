"""The local image store: content-addressed blobs plus SQLite metadata.

Layout under `<images_dir>` (default `~/.cache/matchlock/images`):
- `blobs/sha256_<key>.erofs`: one squashed read-only lower disk per distinct
  layer list (the runtime boots exactly one per image);
- `layers/sha256/<hex>`: registry layer blobs exactly as served, verified
  against their digest, shared by every image and tag that lists them;
- `metadata.db`: `images` rows in two scopes, `local` (imports, `-t` aliases,
  the built-in image) and `registry` (pull cache keyed by the normalised
  reference), and `image_layers` linking rows to layer blobs.

Locks, always taken in this order: `.pull.lock` (shared by every running
pull, exclusive for pruning layer blobs, so gc never deletes a blob a pull has
just fetched but not yet recorded), then `.lock` for every blob or row write.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from ..api.errors import ImageError, NotFoundError, UsageError
from ..api.fsutil import file_lock, try_file_lock
from ..api.image import ImageConfig
from ..api.paths import images_dir
from ..state.db import Migration, open_database
from . import archive, layers
from .reference import try_parse

DEFAULT_IMAGE = "matchlock/busybox:builtin"
LOCAL = "local"
REGISTRY = "registry"
_MAX_TAG = 255
MIGRATIONS = [
    Migration(
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
    Migration(
        2,
        "image_layers",
        """CREATE TABLE IF NOT EXISTS image_layers (
            scope TEXT NOT NULL,
            tag TEXT NOT NULL,
            ordinal INTEGER NOT NULL,
            digest TEXT NOT NULL,
            media_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            diff_id TEXT NOT NULL,
            PRIMARY KEY (scope, tag, ordinal)
        );
        CREATE INDEX IF NOT EXISTS image_layers_by_digest ON image_layers (digest)""",
    ),
]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    source: str  # builtin | import | tag | registry
    created_at: str  # RFC3339, UTC
    layers: int
    scope: str = LOCAL
    platform: str = ""  # os/architecture[/variant] from the image config


@dataclass(frozen=True)
class LayerRecord:
    """A registry layer blob an image row references (kept for dedupe and gc)."""

    digest: str
    media_type: str
    size: int
    diff_id: str


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else images_dir()
        self.blobs = self.root / "blobs"
        self.layers = self.root / "layers"
        self._tmp = self.root / "tmp"

    # -- database -------------------------------------------------------

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = open_database(self.root / "metadata.db", "image", MIGRATIONS)
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _info(row: tuple) -> ImageInfo:
        scope, tag, digest, size, created_at, source, rootfs_path, oci_json = row
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
            scope=scope,
            platform="/".join(p for p in (meta.get("os"), meta.get("architecture"), meta.get("variant")) if p),
        )

    _COLUMNS = "scope, tag, digest, size, created_at, source, rootfs_path, oci_json"

    # -- queries --------------------------------------------------------

    def get(self, tag: str, scope: str = LOCAL) -> ImageInfo | None:
        with self._db() as conn:
            row = conn.execute(
                f"SELECT {self._COLUMNS} FROM images WHERE scope = ? AND tag = ?", (scope, tag)
            ).fetchone()
        return self._info(row) if row else None

    def lookup(self, name: str) -> ImageInfo | None:
        """Local tag first, then the registry cache by the exact and the normalised reference."""
        info = self.get(name) or self.get(name, REGISTRY)
        ref = try_parse(name)
        if info is None and ref is not None:
            info = self.get(ref.canonical, REGISTRY)
        return info

    def list(self) -> list[ImageInfo]:
        with self._db() as conn:
            rows = conn.execute(f"SELECT {self._COLUMNS} FROM images ORDER BY scope = ?, tag", (REGISTRY,)).fetchall()
        return [self._info(row) for row in rows]

    def layer_records(self, info: ImageInfo) -> list[LayerRecord]:
        with self._db() as conn:
            rows = conn.execute(
                "SELECT digest, media_type, size, diff_id FROM image_layers WHERE scope = ? AND tag = ? ORDER BY ordinal",
                (info.scope, info.tag),
            ).fetchall()
        return [LayerRecord(*row) for row in rows]

    @staticmethod
    def usable(info: ImageInfo | None) -> bool:
        return info is not None and info.lower_path.is_file() and info.lower_path.stat().st_size > 0

    def resolve(self, tag: str) -> ImageInfo:
        """The image to boot; the built-in default is built on first use. Never touches the network."""
        validate_tag(tag)
        info = self.lookup(tag)
        if self.usable(info):
            assert info is not None
            return info
        if tag == DEFAULT_IMAGE:
            return self._install_builtin()
        if info is not None:
            raise ImageError(f'image "{tag}" is damaged: {info.lower_path} is missing; pull or import it again')
        raise NotFoundError(
            f'image "{tag}" not found locally; pull it with: matchlock pull {tag}, '
            f"or import it with: docker save {tag} | matchlock image import {tag}"
        )

    def layer_path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        return self.layers / algorithm / hexdigest

    def has_lower(self, diff_ids: list[str]) -> bool:
        lower = layers.blob_path(self.blobs, layers.squash_digest(diff_ids))
        return lower.is_file() and lower.stat().st_size > 0

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
        from . import (
            builtin,  # needs apt; only imported when the default image is missing
        )

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

    @contextlib.contextmanager
    def pulling(self) -> Iterator[Path]:
        """A pull's scope: layer blobs it fetches survive gc until it has saved its rows."""
        with file_lock(self.root / ".pull.lock", shared=True), self._workdir("pull") as work:
            yield work

    def blob_lock(self, digest: str):
        """Serialises downloads of one blob across concurrent pulls."""
        return file_lock(self.root / "locks" / (digest.replace(":", "_") + ".lock"))

    def save_pulled(
        self, ref: str, digest: str, tars: list, diff_ids: list[str], meta: dict, records: list[LayerRecord], work: Path
    ) -> ImageInfo:
        """Record a pulled image in the registry scope (call inside `pulling()`)."""
        return self._install(ref, "registry", tars, diff_ids, digest, meta, work, scope=REGISTRY, records=records)

    def tag(self, alias: str, info: ImageInfo) -> ImageInfo:
        """A local alias sharing the image's blobs: a new row, no new bytes."""
        validate_tag(alias)
        stamp = now_rfc3339()
        with file_lock(self.root / ".lock"), self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            self._upsert(conn, LOCAL, alias, info.digest, info.size, "tag", str(info.lower_path), stamp, conn.execute(
                "SELECT oci_json FROM images WHERE scope = ? AND tag = ?", (info.scope, info.tag)).fetchone()[0])  # fmt: skip
            conn.execute("DELETE FROM image_layers WHERE scope = ? AND tag = ?", (LOCAL, alias))
            conn.execute(
                "INSERT INTO image_layers (scope, tag, ordinal, digest, media_type, size, diff_id)"
                " SELECT ?, ?, ordinal, digest, media_type, size, diff_id FROM image_layers WHERE scope = ? AND tag = ?",
                (LOCAL, alias, info.scope, info.tag),
            )
            conn.execute("COMMIT")
            self._prune_locked(conn)  # the alias may have replaced another image
        found = self.get(alias)
        assert found is not None
        return found

    @staticmethod
    def _upsert(conn, scope, tag, digest, size, source, rootfs, stamp, oci_json) -> None:
        conn.execute(
            "INSERT INTO images (scope, tag, digest, size, created_at, source, rootfs_path, oci_json, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (scope, tag) DO UPDATE SET digest = excluded.digest, size = excluded.size,"
            " created_at = excluded.created_at, source = excluded.source, rootfs_path = excluded.rootfs_path,"
            " oci_json = excluded.oci_json, updated_at = excluded.updated_at",
            (scope, tag, digest, size, stamp, source, rootfs, oci_json, stamp),
        )

    def _install(
        self, tag: str, source: str, tars: list, diff_ids: list[str], digest: str, meta: dict, work: Path,
        *, scope: str = LOCAL, records: list[LayerRecord] | None = None,
    ) -> ImageInfo:  # fmt: skip
        with file_lock(self.root / ".lock"):
            lower = layers.build_lower(tars, diff_ids, self.blobs, work)
            with self._db() as conn:
                conn.execute("BEGIN IMMEDIATE")
                self._upsert(conn, scope, tag, digest, lower.stat().st_size, source, str(lower), now_rfc3339(),
                             json.dumps(meta, sort_keys=True))  # fmt: skip
                conn.execute("DELETE FROM image_layers WHERE scope = ? AND tag = ?", (scope, tag))
                conn.executemany(
                    "INSERT INTO image_layers (scope, tag, ordinal, digest, media_type, size, diff_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(scope, tag, i, r.digest, r.media_type, r.size, r.diff_id) for i, r in enumerate(records or [])],
                )
                conn.execute("COMMIT")
                self._prune_locked(conn)  # a re-imported tag may have orphaned its old blob
        info = self.get(tag, scope)
        assert info is not None
        return info

    def remove(self, tag: str) -> None:
        """Remove a local tag, else a registry-cache entry (exact, then normalised reference)."""
        ref = try_parse(tag)
        candidates = [(LOCAL, tag), (REGISTRY, tag)] + ([(REGISTRY, ref.canonical)] if ref else [])
        # Layer blobs are pruned only when no pull is running (see the module docstring).
        with try_file_lock(self.root / ".pull.lock") as no_pulls, file_lock(self.root / ".lock"), self._db() as conn:
            for scope, name in candidates:
                conn.execute("BEGIN IMMEDIATE")
                deleted = conn.execute("DELETE FROM images WHERE scope = ? AND tag = ?", (scope, name)).rowcount
                conn.execute("DELETE FROM image_layers WHERE scope = ? AND tag = ?", (scope, name))
                conn.execute("COMMIT")
                if deleted:
                    self._prune_locked(conn, layer_blobs=no_pulls)
                    return
        raise NotFoundError(f"image not found: {tag}")

    def gc(self) -> int:
        """Delete blobs no image references (and leftovers of dead pulls and imports); returns the blob count."""
        with file_lock(self.root / ".pull.lock"), file_lock(self.root / ".lock"), self._db() as conn:
            removed = self._prune_locked(conn, layer_blobs=True)
            shutil.rmtree(self.root / "locks", ignore_errors=True)  # no pull holds one now
        self._clean_tmp()
        return removed

    def _prune_locked(self, conn: sqlite3.Connection, layer_blobs: bool = False) -> int:
        referenced = {Path(p).name for (p,) in conn.execute("SELECT rootfs_path FROM images")}
        removed = 0
        if self.blobs.is_dir():
            for entry in self.blobs.iterdir():
                # Under the lock no build is running, so stray *.tmp files are dead too.
                if entry.name not in referenced and (entry.is_file() or entry.is_symlink()):
                    entry.unlink(missing_ok=True)
                    removed += 1
        if layer_blobs and self.layers.is_dir():
            used = {digest for (digest,) in conn.execute("SELECT DISTINCT digest FROM image_layers")}
            for algorithm in self.layers.iterdir():
                for entry in algorithm.iterdir() if algorithm.is_dir() else ():
                    if f"{algorithm.name}:{entry.name}" not in used:
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
