"""Container images made from layer bytes: configs, `docker save` archives, OCI manifests,
indexes and layouts (as a tarball for `image import`, as a directory for skopeo)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from support.tarballs import add, entry

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
    "docker-gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
DEFAULT_CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["sh"]}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(layers: list[bytes], *, arch: str = "amd64", config: dict | None = None) -> bytes:
    """The image config blob: `config` is the runtime part (Env, Cmd, WorkingDir, User)."""
    return json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": config if config is not None else DEFAULT_CONFIG,
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
        }
    ).encode()


def docker_save(layers: list[bytes], config: bytes, *, tag: str = "test/img:1", gzip_layers: bool = False) -> bytes:
    """What `docker save` writes: manifest.json, the config named by its digest, one layer.tar per layer."""
    buf = io.BytesIO()
    names = [f"{index:064x}/layer.tar" for index in range(len(layers))]
    config_name = sha256(config).removeprefix("sha256:") + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": names}]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar, [entry(name, data=gzip.compress(data, mtime=0) if gzip_layers else data)
                  for name, data in zip(names, layers, strict=True)])  # fmt: skip
        add(tar, [entry(config_name, data=config), entry("manifest.json", data=json.dumps(manifest).encode())])
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind in ("gzip", "docker-gzip"):
        return gzip.compress(data, compresslevel=1, mtime=0)
    if kind == "zstd":
        return subprocess.run(["zstd", "-q", "-1", "-c"], input=data, capture_output=True, check=True).stdout
    return data


@dataclass
class Image:
    """One platform's manifest with its blobs (digest -> bytes)."""

    manifest: bytes
    media_type: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    layer_digests: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def make_image(layers: list[bytes], *, arch: str = "amd64", kind: str = "gzip", config: dict | None = None,
               docker: bool = False) -> Image:  # fmt: skip
    """An OCI (or Docker schema 2) image; `kind` is the layer compression: gzip, zstd, none, docker-gzip."""
    blobs: dict[str, bytes] = {}
    descriptors = []
    for layer in layers:
        packed = compress(layer, kind)
        blobs[sha256(packed)] = packed
        descriptors.append({"mediaType": LAYER_TYPES[kind], "digest": sha256(packed), "size": len(packed)})
    config_blob = image_config(layers, arch=arch, config=config)
    blobs[sha256(config_blob)] = config_blob
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "digest": sha256(config_blob),
                   "size": len(config_blob)},
        "layers": descriptors,
    }).encode()  # fmt: skip
    return Image(manifest, DOCKER_MANIFEST if docker else OCI_MANIFEST, blobs, [d["digest"] for d in descriptors])


def make_index(images: dict[str, Image]) -> bytes:
    """An OCI index over per-architecture images (keys: amd64, arm64, ...)."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": img.media_type, "digest": img.digest, "size": len(img.manifest),
             "platform": {"os": "linux", "architecture": arch, **({"variant": "v8"} if arch == "arm64" else {})}}
            for arch, img in images.items()
        ],
    }).encode()  # fmt: skip


def oci_archive(images: dict[str, Image]) -> bytes:
    """An OCI layout as one tarball (what `matchlock image import` reads), indexed by architecture."""
    blobs = {
        digest: data for img in images.values() for digest, data in [*img.blobs.items(), (img.digest, img.manifest)]
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(
            tar,
            [entry("oci-layout", data=b'{"imageLayoutVersion":"1.0.0"}'), entry("index.json", data=make_index(images))],
        )
        add(tar, [entry(f"blobs/sha256/{digest.removeprefix('sha256:')}", data=data) for digest, data in blobs.items()])
    return buf.getvalue()


def write_oci_layout(directory: Path, image: Image, tag: str) -> Path:
    """An OCI image layout directory (what `skopeo copy oci:<dir>:<tag>` reads)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, data in [*image.blobs.items(), (image.digest, image.manifest)]:
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}  # fmt: skip
    (directory / "index.json").write_text(json.dumps(index))
    return directory
