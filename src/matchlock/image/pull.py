"""Pull an image from a registry into the content-addressed store.

Manifest (or index -> the platform's manifest) -> config -> layers. Layers
download concurrently, each into the pull's own scratch directory, and are
renamed into `layers/sha256/` only after their digest matched; a layer the
store already holds is not downloaded again, whichever image brought it.
Each layer is then decompressed (gzip, zstd or none) with its diff_id
checked, and the layers are squashed into the image's single erofs lower.
Any failure leaves the store as it was, apart from verified blobs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..api.errors import ImageError, NotFoundError, UsageError
from ..api.image import DEFAULT_IMAGE
from . import archive
from .media import INDEX_TYPES, MANIFEST_TYPES
from .progress import PullProgress
from .reference import Reference, is_builtin, parse
from .store import LOCAL, REGISTRY, ImageInfo, ImageStore, LayerRecord

if TYPE_CHECKING:  # imported by pull(): `run` of a cached image never loads httpx
    from .registry import RegistryClient

MAX_PARALLEL_LAYERS = 4
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "",  # some old pushers leave it out; the blob's magic bytes decide
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid --platform {text!r}: use os/arch[/variant], e.g. linux/arm64")
        return cls(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        return cls("linux", archive.host_arch())

    def matches(self, os_name: str, architecture: str, variant: str) -> bool:
        if (os_name, architecture) != (self.os, self.architecture):
            return False
        # arm64 images usually say v8 or nothing; a requested variant must match otherwise.
        default = "v8" if architecture == "arm64" else ""
        return not self.variant or (variant or default) == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def select_manifest(index: dict, platform: Platform) -> dict:
    """The index entry for `platform`, skipping attestation pseudo-manifests."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError("image index has no manifests list")
    found = []
    for desc in entries:
        if not isinstance(desc, dict):
            continue
        plat = desc.get("platform") or {}
        if (desc.get("annotations") or {}).get("vnd.docker.reference.type") == "attestation-manifest":
            continue
        found.append(str(Platform(plat.get("os", "?"), plat.get("architecture", "?"), plat.get("variant", ""))))
        if platform.matches(plat.get("os", ""), plat.get("architecture", ""), plat.get("variant", "")):
            return desc
    raise ImageError(
        f"the image has no {platform} variant (it has: {', '.join(found) or 'none'}); choose one with --platform"
    )


def _json(body: bytes, what: str) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ImageError(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ImageError(f"{what} is not a JSON object")
    return data


def _descriptor(desc: object, what: str) -> tuple[str, int, str]:
    if not isinstance(desc, dict) or not isinstance(desc.get("size"), int) or desc["size"] < 0:
        raise ImageError(f"{what}: malformed descriptor")
    digest = desc.get("digest")
    archive._parse_digest(digest, what)  # sha256 only: that is all we can verify
    return str(digest), int(desc["size"]), str(desc.get("mediaType") or "")


class _Puller:
    def __init__(self, ref: Reference, store: ImageStore, client: RegistryClient, progress: PullProgress, work: Path):
        self.ref, self.store, self.client, self.progress, self.work = ref, store, client, progress, work

    def manifest(self, platform: Platform) -> tuple[dict, str, str]:
        body, media_type, digest = self.client.manifest(self.ref.manifest_ref)
        if media_type in INDEX_TYPES:
            desc = select_manifest(_json(body, "image index"), platform)
            body, media_type, digest = self.client.manifest(_descriptor(desc, "index entry")[0])
        if media_type not in MANIFEST_TYPES:
            if "v1+" in media_type or "prettyjws" in media_type:
                raise ImageError(f"{self.ref}: Docker schema 1 manifests are not supported; re-push the image")
            raise ImageError(f"{self.ref}: unsupported manifest media type {media_type!r}")
        manifest = _json(body, "image manifest")
        if not isinstance(manifest.get("layers"), list):
            raise ImageError(f"{self.ref}: manifest has no layers list")
        return manifest, media_type, digest

    def config(self, manifest: dict, platform: Platform, explicit: bool) -> tuple[dict, list[str]]:
        digest, _, _ = _descriptor(manifest.get("config"), "config")
        config = _json(self.client.blob_bytes(digest), "image config")
        os_name, arch = str(config.get("os", "")), str(config.get("architecture", ""))
        if (os_name or arch) and not platform.matches(os_name, arch, str(config.get("variant", ""))):
            hint = "" if explicit else "; choose another with --platform"
            raise ImageError(f"{self.ref} is for {os_name}/{arch}, not {platform}{hint}")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest["layers"]):
            raise ImageError(
                f"{self.ref}: config diff_ids do not match the manifest's {len(manifest['layers'])} layers"
            )
        for diff_id in diff_ids:
            archive._parse_digest(diff_id, "config diff_id")
        return config, diff_ids

    def fetch(self, record: LayerRecord) -> Path:
        """The verified blob in the store, downloading it unless it is already there."""
        dest = self.store.layer_path(record.digest)
        if dest.is_file() and dest.stat().st_size == record.size:
            self.progress.layer(record.digest, record.size)
            self.progress.done(record.digest, "exists")
            return dest
        with self.store.blob_lock(record.digest):  # a concurrent pull may be fetching it right now
            if not (dest.is_file() and dest.stat().st_size == record.size):
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.work / (record.digest.replace(":", "_") + ".part")
                self.client.download_blob(
                    record.digest, record.size, dest, tmp, self.progress.layer(record.digest, record.size)
                )
                fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)  # the rename must survive a crash before the DB row does
                finally:
                    os.close(fd)
        self.progress.done(record.digest)
        return dest

    def unpack(self, record: LayerRecord, blob: Path) -> Path:
        """An uncompressed tar of the layer whose sha256 equals its diff_id."""
        plain = self.work / (record.digest.replace(":", "_") + ".tar")
        actual, compressed = archive.decompress_to(lambda: open(blob, "rb"), f"layer {record.digest}", plain)
        if "sha256:" + actual != record.diff_id:
            plain.unlink(missing_ok=True)
            raise ImageError(
                f"layer {record.digest}: uncompressed content is sha256:{actual}, not diff_id {record.diff_id}"
            )
        return plain if compressed else blob


def pull(
    name: str,
    *,
    store: ImageStore | None = None,
    force: bool = False,
    platform: str | None = None,
    progress: PullProgress | None = None,
) -> tuple[ImageInfo, bool]:
    """Pull `name` into the registry cache; returns (image, whether it came from the cache).

    `progress` is started and stopped by the caller (the CLI), which owns the terminal.
    """
    if is_builtin(name):
        raise UsageError(
            f"{name} is the built-in image: it is built locally, never pulled; `matchlock setup` rebuilds it"
        )
    ref = parse(name)
    wanted = Platform.parse(platform) if platform else Platform.host()
    store = store or ImageStore()
    progress = progress or PullProgress()
    if not force:
        cached = store.get(ref.canonical, REGISTRY)
        if store.usable(cached) and cached.platform.count("/") >= 1 and wanted.matches(*_split(cached.platform)):
            return cached, True
    from .registry import RegistryClient

    with (
        RegistryClient(ref, on_retry=progress.retry) as client,
        store.pulling() as work,
        contextlib.ExitStack() as stack,
    ):
        puller = _Puller(ref, store, client, progress, work)
        manifest, media_type, digest = puller.manifest(wanted)
        config, diff_ids = puller.config(manifest, wanted, bool(platform))
        records = _layer_records(ref, manifest, diff_ids)
        squash = not store.has_lower(diff_ids)  # the same layers were squashed before: reuse that disk

        def one(record: LayerRecord) -> Path:
            blob = puller.fetch(record)
            return puller.unpack(record, blob) if squash else blob

        unique = list({r.digest: r for r in records}.values())
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_LAYERS, max(1, len(unique)))) as pool:
            paths = dict(zip((r.digest for r in unique), pool.map(one, unique)))
        tars = []
        if squash:
            for record in records:
                handle = stack.enter_context(open(paths[record.digest], "rb"))
                tars.append(tarfile.open(fileobj=handle, mode="r:"))
        meta = _metadata(ref, config, diff_ids, media_type)
        info = store.save_pulled(ref.canonical, digest, tars, diff_ids, meta, records, work)
    return info, False


def _layer_records(ref: Reference, manifest: dict, diff_ids: list[str]) -> list[LayerRecord]:
    records = []
    for desc, diff_id in zip(manifest["layers"], diff_ids):
        layer_digest, size, layer_type = _descriptor(desc, "layer")
        if layer_type not in _LAYER_TYPES:
            raise ImageError(f"{ref}: layer {layer_digest} has unsupported media type {layer_type!r}")
        records.append(LayerRecord(layer_digest, layer_type, size, diff_id))
    return records


def _metadata(ref: Reference, config: dict, diff_ids: list[str], media_type: str) -> dict:
    """What the store keeps of a pulled image (its `oci_json` column)."""
    return {
        "config": config.get("config") or {},
        "diff_ids": diff_ids,
        "os": config.get("os", ""),
        "architecture": config.get("architecture", ""),
        "variant": config.get("variant", ""),
        "format": "registry",
        "manifest_media_type": media_type,
        "reference": ref.canonical,
    }


def _split(platform: str) -> tuple[str, str, str]:
    parts = platform.split("/") + [""]
    return parts[0], parts[1], parts[2]


def resolve_or_pull(name: str, *, force_pull: bool = False, progress: PullProgress | None = None) -> ImageInfo:
    """What `run` boots: a cached image, else a pull; `force_pull` ignores the caches."""
    store = ImageStore()
    info = None if force_pull else store.lookup(name)
    if name == DEFAULT_IMAGE or store.usable(info) or (info is not None and info.scope == LOCAL):
        return store.resolve(name)  # the built-in image is never pulled; a damaged local one reports itself
    if force_pull or info is not None:  # asked for, or a damaged cache entry: pulling is the repair
        return pull(name, store=store, force=force_pull, progress=progress)[0]
    # A local typo must not read as a registry failure: say what missed and what is close.
    missed = f"no local image matched {name}{store.close_note(name)}"
    try:
        ref = parse(name)
    except UsageError as exc:
        raise UsageError(f"{missed}; {exc}") from None
    progress = progress or PullProgress()
    progress.note(f"{missed}; pulling {ref}")
    try:
        return pull(name, store=store, progress=progress)[0]
    except (ImageError, NotFoundError) as exc:
        failure = " ".join(str(exc).split())
        raise type(exc)(f"{missed}; pulling {ref} failed: {failure}") from exc
