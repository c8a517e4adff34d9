"""Kernel OCI artifacts made from kernel bytes, laid out as upstream publishes them: one layer holding
the kernel (tar.gz or plain tar with a file named `kernel` / `kernel-arm64`, or the raw binary)."""

from __future__ import annotations

import gzip
import json
import os
import struct

from support.images import OCI_CONFIG, OCI_MANIFEST, Image, sha256
from support.tarballs import tar_layer

LAYER_TYPES = {
    "tar.gz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "raw": "application/octet-stream",
}
_ELF_MACHINES = {"amd64": 62, "arm64": 183}


def fake_kernel(arch: str, size: int = 64 << 10) -> bytes:
    """A little-endian 64-bit ELF header for `arch` followed by random bytes: passes the magic check only."""
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HH", 2, _ELF_MACHINES[arch])
    return header + os.urandom(size - len(header))


def pack(kernel: bytes, form: str, arch: str) -> bytes:
    """The layer bytes of `kernel` in `form`: tar.gz, tar or raw."""
    if form == "raw":
        return kernel
    name = "kernel-arm64" if arch == "arm64" else "kernel"
    tar = tar_layer({name: kernel}, modes={name: 0o644})
    return gzip.compress(tar, compresslevel=1, mtime=0) if form == "tar.gz" else tar


def kernel_artifact(layer: bytes, form: str, arch: str) -> Image:
    """An OCI manifest whose first (only) layer is `layer`, with a small image config as crane writes."""
    config = json.dumps({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": LAYER_TYPES[form], "digest": sha256(layer), "size": len(layer)}],
        }
    ).encode()
    return Image(manifest, OCI_MANIFEST, {sha256(config): config, sha256(layer): layer}, [sha256(layer)])
