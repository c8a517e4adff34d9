"""`image export`: an image as a tarball that `docker load` and skopeo read.

The archive is both a docker-save archive (`manifest.json`) and an OCI image
layout (`oci-layout`, `index.json`), sharing one set of uncompressed blobs
under `blobs/sha256/`, as Docker 25+ writes it. Images that `matchlock build`
made keep their layers; any other image is exported as one flattened layer,
read back from its erofs lower disk. Everything is written in a fixed order
with fixed metadata, so the same image gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import BinaryIO

from ..api.errors import ImageError, SetupError
from .store import ImageInfo, ImageStore

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _walk(root: Path, relative: str = ""):
    """Every path under `root` in sorted pre-order (a directory just before its contents), not following links."""
    for name in sorted(os.listdir(root / relative if relative else root)):
        rel = f"{relative}/{name}" if relative else name
        st = os.lstat(root / rel)
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, rel)


def tar_directory(root: Path, out: Path) -> str:
    """A deterministic layer tar of `root` (sorted, owners and modes kept, names dropped); returns its diff_id."""
    seen: dict[tuple[int, int], str] = {}  # (dev, ino) -> first path, for hardlinks
    with open(out, "wb") as raw, tarfile.open(fileobj=raw, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for rel, st in _walk(root):
            info = tarfile.TarInfo(rel)
            info.mode, info.uid, info.gid, info.mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)
            data: BinaryIO | None = None
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(root / rel)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    info.type, info.linkname = tarfile.LNKTYPE, seen[key]
                else:
                    seen[key] = rel
                    info.size = st.st_size
                    data = open(root / rel, "rb")
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue  # sockets cannot live in a layer
            try:
                tar.addfile(info, data)
            finally:
                if data is not None:
                    data.close()
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def flatten_lower(lower: Path, work: Path) -> tuple[str, Path]:
    """The whole filesystem of an erofs lower disk as one layer tar in `work`: (diff_id, path)."""
    extracted = work / "extracted"
    shutil.rmtree(extracted, ignore_errors=True)
    try:
        proc = subprocess.run(
            ["fsck.erofs", f"--extract={extracted}", "--preserve", str(lower)], capture_output=True, text=True
        )
    except FileNotFoundError:
        raise SetupError("fsck.erofs is not installed; fix: apt-get install erofs-utils") from None
    if proc.returncode != 0:
        raise ImageError(f"cannot read the image disk {lower}: {(proc.stderr or proc.stdout).strip()}")
    out = work / "flat.tar"
    try:
        diff_id = tar_directory(extracted, out)
    finally:
        shutil.rmtree(extracted, ignore_errors=True)
    return diff_id, out


def image_layers(store: ImageStore, info: ImageInfo, work: Path) -> list[tuple[str, Path]]:
    """(diff_id, uncompressed tar) per layer: the recorded ones when all are plain tars at hand, else one flat layer."""
    records = store.layer_records(info)
    paths = [store.layer_path(r.digest) for r in records]
    if records and all(r.media_type == LAYER_MEDIA_TYPE and p.is_file() for r, p in zip(records, paths)):
        return [(r.diff_id, p) for r, p in zip(records, paths)]
    return [flatten_lower(info.lower_path, work)]


def image_config(store: ImageStore, info: ImageInfo, diff_ids: list[str]) -> bytes:
    meta = store.meta(info)
    arch = info.platform.split("/")[1] if "/" in info.platform else "amd64"
    config = {
        "architecture": arch,
        "os": "linux",
        "created": meta.get("created", "1970-01-01T00:00:00Z"),
        "config": meta.get("config") or {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if meta.get("history"):
        config["history"] = meta["history"]
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def write_archive(out: BinaryIO, tag: str, config: bytes, layers: list[tuple[str, Path]]) -> None:
    """Stream the docker-save + OCI-layout tarball to `out` (it need not be seekable)."""
    config_hex = hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": "sha256:" + config_hex, "size": len(config)},
            "layers": [
                {"mediaType": LAYER_MEDIA_TYPE, "digest": diff_id, "size": path.stat().st_size}
                for diff_id, path in layers
            ],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    manifest_hex = hashlib.sha256(manifest).hexdigest()
    ref = tag.rsplit(":", 1)[1] if ":" in tag.rsplit("/", 1)[-1] else "latest"
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": MANIFEST_MEDIA_TYPE, "digest": "sha256:" + manifest_hex, "size": len(manifest),
        "annotations": {"io.containerd.image.name": tag, "org.opencontainers.image.ref.name": ref},
    }]}, sort_keys=True).encode()  # fmt: skip
    docker_manifest = json.dumps(
        [{"Config": f"blobs/sha256/{config_hex}", "RepoTags": [tag],
          "Layers": [f"blobs/sha256/{diff_id.split(':', 1)[1]}" for diff_id, _ in layers]}]
    ).encode()  # fmt: skip
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _dir(tar, "blobs")
        _dir(tar, "blobs/sha256")
        _bytes(tar, f"blobs/sha256/{config_hex}", config)
        written: set[str] = set()
        for diff_id, path in layers:
            hexdigest = diff_id.split(":", 1)[1]
            if hexdigest in written:
                continue  # a layer repeated in one image is stored once
            written.add(hexdigest)
            info = tarfile.TarInfo(f"blobs/sha256/{hexdigest}")
            info.size, info.mode = path.stat().st_size, 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
        _bytes(tar, f"blobs/sha256/{manifest_hex}", manifest)
        _bytes(tar, "index.json", index)
        _bytes(tar, "manifest.json", docker_manifest)
        _bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')


def _dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(info)


def _bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def export(store: ImageStore, info: ImageInfo, out: BinaryIO, work: Path) -> None:
    layers = image_layers(store, info, work)
    write_archive(out, info.tag, image_config(store, info, [d for d, _ in layers]), layers)
