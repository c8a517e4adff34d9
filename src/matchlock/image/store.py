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
from pathlib import Path
from typing import BinaryIO, Final, Literal, TypeGuard

from ..api.errors import ImageError, NotFoundError
from ..api.image import DEFAULT_IMAGE, ImageConfig
from ..api.paths import images_dir
from ..util.fs import file_lock, try_file_lock
from ..util.sqlite import Migration, open_database, utc_now
from . import archive, layers
from .reference import close_matches, try_parse, validate_new_tag, validate_tag

# `local`: imports, tag aliases and the built-in image; `registry`: the pull cache, by normalised reference.
ImageScope = Literal["local", "registry"]
LOCAL: Final = "local"
REGISTRY: Final = "registry"
# How an image row came to be: the built-in image, `image import`, `pull -t`/tag alias, or a registry pull.
ImageSource = Literal["builtin", "import", "tag", "registry", "build"]
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


@dataclass(frozen=True)
class ImageInfo:
    tag: str
    digest: str
    lower_path: Path
    lower_fstype: str
    size: int  # bytes of the erofs blob
    config: ImageConfig
    source: ImageSource
    created_at: str  # RFC3339 in UTC, whole seconds (as Go matchlock writes it)
    layers: int
    scope: ImageScope = LOCAL
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

    def get(self, tag: str, scope: ImageScope = LOCAL) -> ImageInfo | None:
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

    def images(self) -> list[ImageInfo]:
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

    def meta(self, info: ImageInfo) -> dict:
        """The row's stored metadata (the OCI `config` object, diff_ids, platform; build history)."""
        with self._db() as conn:
            row = conn.execute(
                "SELECT oci_json FROM images WHERE scope = ? AND tag = ?", (info.scope, info.tag)
            ).fetchone()
        return json.loads(row[0]) if row else {}

    @staticmethod
    def usable(info: ImageInfo | None) -> TypeGuard[ImageInfo]:
        return info is not None and info.lower_path.is_file() and info.lower_path.stat().st_size > 0

    def resolve(self, tag: str) -> ImageInfo:
        """The image to boot; the built-in default is built on first use. Never touches the network."""
        validate_tag(tag)
        if tag == DEFAULT_IMAGE:
            return self.ensure_builtin()[0]
        info = self.lookup(tag)
        if self.usable(info):
            return info
        if info is not None:
            raise ImageError(f'image "{tag}" is damaged: {info.lower_path} is missing; pull or import it again')
        raise NotFoundError(
            f'image "{tag}" not found locally{self.close_note(tag)}; pull it with: matchlock pull {tag}, '
            f"or import it with: docker save {tag} | matchlock image import {tag}"
        )

    def close_note(self, name: str) -> str:
        """' (close local images: a, b)' naming what a typo of `name` probably meant, else ''."""
        close = close_matches(name, [i.tag for i in self.images()])
        return f" (close local images: {', '.join(close)})" if close else ""

    def ensure_builtin(self) -> tuple[ImageInfo, str]:
        """The built-in image, rebuilt when its entry is missing, replaced or damaged; also says what was wrong."""
        found = ""
        for rebuilds in range(3):  # a second rebuild covers a damaged blob the first one found in place
            info = self.get(DEFAULT_IMAGE)
            problem = _builtin_problem(info)
            if info is not None and not problem:
                return info, found
            if rebuilds == 2:
                break
            found = found or problem
            if info is not None and info.source == "builtin":
                with file_lock(self.root / ".lock"):
                    if _builtin_problem(self.get(DEFAULT_IMAGE)):  # not repaired by another process meanwhile
                        info.lower_path.unlink(missing_ok=True)  # build_lower reuses any blob it finds
            self._install_builtin()
        raise ImageError(f"the built-in image {DEFAULT_IMAGE} is still damaged after a rebuild: {problem}")

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
        validate_new_tag(tag)
        with self._workdir("import") as work:
            spool = work / "spool.tar"
            with open(spool, "wb") as out:  # tar needs seeking; stdin cannot seek
                shutil.copyfileobj(stream, out, 1 << 20)
            with open(spool, "rb") as f:
                packed = archive.compression(f.read(6))
            if packed:  # `docker save | gzip` and friends
                plain = work / "image.tar"
                archive.decompress_to(lambda: open(spool, "rb"), "tarball", plain)
                spool.unlink()
                spool = plain
            with archive.load_archive(spool, work, tag) as image:
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

    def save_built(
        self, tag: str, tars: list, diff_ids: list[str], digest: str, meta: dict, records: list[LayerRecord], work: Path
    ) -> ImageInfo:
        """Record an image `matchlock build` made (call inside `pulling()`, its layer blobs already in place)."""
        validate_new_tag(tag)
        return self._install(tag, "build", tars, diff_ids, digest, meta, work, records=records)

    def tag(self, alias: str, info: ImageInfo) -> ImageInfo:
        """A local alias sharing the image's blobs: a new row, no new bytes."""
        validate_new_tag(alias)
        stamp = utc_now("seconds")
        with file_lock(self.root / ".lock"), self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            oci_json = conn.execute(
                "SELECT oci_json FROM images WHERE scope = ? AND tag = ?", (info.scope, info.tag)
            ).fetchone()[0]
            self._upsert(conn, LOCAL, alias, info.digest, info.size, "tag", str(info.lower_path), stamp, oci_json)
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
        self,
        tag: str,
        source: ImageSource,
        tars: list,
        diff_ids: list[str],
        digest: str,
        meta: dict,
        work: Path,
        *,
        scope: ImageScope = LOCAL,
        records: list[LayerRecord] | None = None,
    ) -> ImageInfo:
        with file_lock(self.root / ".lock"):
            lower = layers.build_lower(tars, diff_ids, self.blobs, work)
            with self._db() as conn:
                conn.execute("BEGIN IMMEDIATE")
                self._upsert(
                    conn,
                    scope,
                    tag,
                    digest,
                    lower.stat().st_size,
                    source,
                    str(lower),
                    utc_now("seconds"),
                    json.dumps(meta, sort_keys=True),
                )
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


_EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")  # at byte 1024 of every erofs image


def _builtin_problem(info: ImageInfo | None) -> str:
    """Why the built-in entry cannot be booted as the built-in image, or '' when it looks intact."""
    if info is None:
        return "it was missing"
    if info.source != "builtin":
        return f"it was replaced by a {info.source} image ({info.digest})"
    try:
        with open(info.lower_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(1024)
            magic = f.read(4)
    except OSError as exc:
        return f"its disk {info.lower_path} cannot be read ({exc.strerror})"
    if size != info.size:
        return f"its disk {info.lower_path} is {size} bytes, not the {info.size} it was built with"
    if magic != _EROFS_MAGIC:
        return f"its disk {info.lower_path} is not an erofs image"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
