"""Read `docker save` and OCI image-layout tarballs, verifying every digest they state.

The result is the image config plus one open tar per layer (lowest first);
compressed layers (gzip, zstd, bzip2, xz; detected by magic bytes) are
decompressed into the caller's work directory. Nothing here writes to the
image store, so a tarball that fails verification leaves nothing cached.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import platform
import posixpath
import re
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import zstandard

from ..api.errors import ImageError
from .media import INDEX_TYPES

_CHUNK = 1 << 20
_JSON_LIMIT = 64 << 20  # manifests and configs are small; refuse absurd ones
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def normalise(name: str, what: str) -> tuple[str, ...]:
    """Archive path -> components relative to the root; ImageError if it escapes."""
    if "\0" in name:
        raise ImageError(f"{what}: path {name!r} contains a NUL byte")
    stripped = name.lstrip("/")
    relative = posixpath.normpath(stripped) if stripped else "."
    if relative == ".." or relative.startswith("../"):
        raise ImageError(f"{what}: path {name!r} escapes the image root")
    return tuple(p for p in relative.split("/") if p and p != ".")


def _parse_digest(digest: object, what: str) -> str:
    if not isinstance(digest, str) or not digest.startswith("sha256:") or not _HEX64.match(digest[7:]):
        raise ImageError(f"{what}: unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return digest[7:]


def _sha256_of(src: BinaryIO) -> tuple[str, int]:
    h, total = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        total += len(chunk)
    return h.hexdigest(), total


class _Section(io.RawIOBase):
    """Seekable read-only window onto part of a file (a blob inside the outer tar)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._offset + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos


def compression(head: bytes) -> str:
    """The compression named by a blob's magic bytes, or '' for none."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return ""


class _Stream(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


# Decompressing readers over a compressed file object, by the name `compression()` gives.
_DECOMPRESSORS: dict[str, Callable[[BinaryIO], _Stream]] = {
    "gzip": lambda src: gzip.GzipFile(fileobj=src),
    "bzip2": bz2.BZ2File,
    "xz": lzma.LZMAFile,
    # Layers may be several concatenated frames (`zstd:chunked`); read them all.
    "zstd": lambda src: zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True),
}


def decompress_to(open_src: Callable[[], BinaryIO], name: str, dest: Path) -> tuple[str, bool]:
    """Write the uncompressed bytes of a blob to `dest`; returns (sha256 hex, was_compressed).

    Nothing is written when the blob is not compressed (the caller reads it in place).
    """
    with open_src() as probe:
        kind = compression(probe.read(6))
    if not kind:
        with open_src() as src:
            return _sha256_of(src)[0], False
    h = hashlib.sha256()
    try:
        with open(dest, "wb") as out, open_src() as src, contextlib.closing(_DECOMPRESSORS[kind](src)) as plain:
            while chunk := plain.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as exc:
        raise ImageError(f"{name}: corrupt {kind} data: {exc}") from None
    return h.hexdigest(), True


class _Outer:
    """The outer archive: a seekable tar whose members are addressed by normalised name."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        try:
            tar = tarfile.open(fileobj=self._file, mode="r:")
            members = tar.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            self._file.close()
            raise ImageError(f"not a tar archive ({exc}); expected a docker save or OCI-layout tarball") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            self.members["/".join(normalise(member.name, "archive"))] = member

    def close(self) -> None:
        self._file.close()

    def has(self, name: str) -> bool:
        return "/".join(normalise(name, "archive")) in self.members

    def _resolve(self, name: str) -> tarfile.TarInfo:
        name = "/".join(normalise(name, "archive"))
        for _ in range(16):  # old docker save symlinks duplicate layer.tar files
            member = self.members.get(name)
            if member is None:
                raise ImageError(f"archive has no {name!r}")
            if member.issym():
                name = "/".join(
                    normalise(posixpath.join(posixpath.dirname(name), member.linkname), f"archive link {name}")
                )
            elif member.islnk():
                name = "/".join(normalise(member.linkname, f"archive link {name}"))
            elif member.isreg() and not member.issparse():
                return member
            else:
                raise ImageError(f"archive member {name!r} is not a regular file")
        raise ImageError(f"archive member {name!r}: too many levels of links")

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        member = self._resolve(name)
        fd = self._file.fileno()
        return lambda: io.BufferedReader(_Section(fd, member.offset_data, member.size), _CHUNK)

    def read_bytes(self, name: str) -> bytes:
        if self._resolve(name).size > _JSON_LIMIT:
            raise ImageError(f"archive member {name!r} is implausibly large")
        with self.opener(name)() as f:
            return f.read()

    def read_json(self, name: str) -> object:
        return _json(self.read_bytes(name), name)


def _json(data: bytes, name: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{name} is not valid JSON: {exc}") from None


@dataclass
class LoadedImage:
    """A verified image: its config blob and one open tar per layer, lowest first."""

    format: Literal["docker-save", "oci-layout"]
    digest: str  # OCI: manifest digest; docker save: config digest (the image ID)
    config: dict
    diff_ids: list[str]
    layers: list[tarfile.TarFile] = field(default_factory=list)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()
        self._closers.clear()

    def __enter__(self) -> LoadedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_archive(path: Path, workdir: Path, tag: str | None = None) -> LoadedImage:
    """Parse and fully verify a docker-save or OCI-layout tarball (uncompressed, seekable)."""
    outer = _Outer(path)
    try:
        if outer.has("oci-layout") and outer.has("index.json"):
            image = _load_oci(outer, workdir, tag)
        elif outer.has("manifest.json"):
            image = _load_docker(outer, workdir, tag)
        else:
            raise ImageError("tarball has neither manifest.json (docker save) nor oci-layout + index.json (OCI layout)")
    except BaseException:
        outer.close()
        raise
    image._closers.insert(0, outer.close)
    return image


def _check_config(config: object, name: str) -> tuple[dict, list[str]]:
    if not isinstance(config, dict):
        raise ImageError(f"image config {name} is not a JSON object")
    os_name, arch = config.get("os"), config.get("architecture")
    if (os_name and os_name != "linux") or (arch and arch != host_arch()):
        raise ImageError(f"image is for {os_name}/{arch}; this host runs linux/{host_arch()}")
    rootfs = config.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError(f"image config {name} has no rootfs.diff_ids")
    for diff_id in diff_ids:
        _parse_digest(diff_id, f"config {name} diff_id")
    return config, diff_ids


def _open_layer(image: LoadedImage, opener: Callable[[], BinaryIO], name: str, diff_id: str, workdir: Path) -> None:
    """Decompress if needed, check the diff_id, and open the layer as a tar."""
    handle, scratch_name = tempfile.mkstemp(prefix="layer-", suffix=".tar", dir=workdir)
    os.close(handle)
    scratch = Path(scratch_name)
    actual, compressed = decompress_to(opener, name, scratch)
    if actual != _parse_digest(diff_id, name):
        raise ImageError(f"layer {name}: uncompressed digest sha256:{actual} does not match diff_id {diff_id}")
    src: BinaryIO = open(scratch, "rb") if compressed else opener()
    if not compressed:
        scratch.unlink()
    image._closers.append(src.close)
    try:
        image.layers.append(tarfile.open(fileobj=src, mode="r:"))
    except (tarfile.TarError, EOFError) as exc:
        raise ImageError(f"layer {name} is not a tar archive: {exc}") from None


def _load_docker(outer: _Outer, workdir: Path, tag: str | None) -> LoadedImage:
    manifest = outer.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest or not all(isinstance(e, dict) for e in manifest):
        raise ImageError("manifest.json is not a non-empty list of images")
    entries = manifest
    if len(entries) > 1:
        entries = [e for e in manifest if tag and tag in (e.get("RepoTags") or [])]
        if len(entries) != 1:
            tags = sorted(t for e in manifest for t in e.get("RepoTags") or [])
            raise ImageError(
                f"tarball holds {len(manifest)} images ({', '.join(tags) or 'untagged'}); save one image at a time"
            )
    entry = entries[0]
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ImageError("manifest.json entry lacks Config or Layers")
    config_bytes = outer.read_bytes(config_name)
    actual = hashlib.sha256(config_bytes).hexdigest()
    # The config is named by its digest: "<hex>.json" (classic) or "blobs/sha256/<hex>".
    expected = posixpath.basename(config_name).removesuffix(".json")
    if _HEX64.match(expected) and actual != expected:
        raise ImageError(f"config blob {config_name}: sha256 {actual} does not match its name")
    config, diff_ids = _check_config(_json(config_bytes, config_name), config_name)
    if len(diff_ids) != len(layer_names):
        raise ImageError(f"manifest lists {len(layer_names)} layers but the config has {len(diff_ids)} diff_ids")
    image = LoadedImage("docker-save", "sha256:" + actual, config, list(diff_ids))
    try:
        for name, diff_id in zip(layer_names, diff_ids):
            opener = outer.opener(str(name))
            parts = str(name).split("/")
            if len(parts) >= 2 and parts[-2] == "sha256" and _HEX64.match(parts[-1]):
                _verify_blob(opener, str(name), parts[-1], None)
            _open_layer(image, opener, str(name), diff_id, workdir)
    except BaseException:
        image.close()
        raise
    return image


def _verify_blob(opener: Callable[[], BinaryIO], name: str, expected_hex: str, size: int | None) -> None:
    with opener() as src:
        actual, actual_size = _sha256_of(src)
    if actual != expected_hex:
        raise ImageError(f"blob {name}: sha256 {actual} does not match its digest sha256:{expected_hex}")
    if size is not None and size != actual_size:
        raise ImageError(f"blob {name}: size {actual_size} does not match its descriptor ({size})")


def _oci_blob(outer: _Outer, desc: object, what: str) -> tuple[str, Callable[[], BinaryIO]]:
    if not isinstance(desc, dict):
        raise ImageError(f"{what}: descriptor is not a JSON object")
    hexdigest = _parse_digest(desc.get("digest"), what)
    name = f"blobs/sha256/{hexdigest}"
    if not outer.has(name):
        raise ImageError(f"{what}: blob {name} is missing from the tarball")
    opener = outer.opener(name)
    size = desc.get("size")
    _verify_blob(opener, name, hexdigest, size if isinstance(size, int) else None)
    return name, opener


def _oci_json(outer: _Outer, desc: object, what: str) -> object:
    name, opener = _oci_blob(outer, desc, what)
    with opener() as f:
        return _json(f.read(_JSON_LIMIT + 1), name)


def _select_manifest(outer: _Outer, index: object, tag: str | None) -> dict:
    candidates: list[dict] = []

    def collect(idx: object, depth: int) -> None:
        if not isinstance(idx, dict) or not isinstance(idx.get("manifests"), list):
            raise ImageError("OCI index has no manifests list")
        for desc in idx["manifests"]:
            if not isinstance(desc, dict):
                continue
            if desc.get("mediaType") in INDEX_TYPES:
                if depth >= 4:
                    raise ImageError("OCI indexes are nested too deeply")
                collect(_oci_json(outer, desc, "nested index"), depth + 1)
                continue
            annotations = desc.get("annotations") or {}
            plat = desc.get("platform") or {}
            # buildx stores provenance attestations as pseudo-platform manifests.
            if annotations.get("vnd.docker.reference.type") == "attestation-manifest" or plat.get("os") == "unknown":
                continue
            candidates.append(desc)

    collect(index, 0)
    if len(candidates) > 1 and tag:
        named = [
            d
            for d in candidates
            if tag
            in {
                (d.get("annotations") or {}).get(k)
                for k in ("io.containerd.image.name", "org.opencontainers.image.ref.name")
            }
        ]
        candidates = named or candidates
    if not candidates:
        raise ImageError("OCI index lists no image manifests")

    def platform_of(d: dict) -> str:
        plat = d.get("platform") or {}
        return f"{plat.get('os', '?')}/{plat.get('architecture', '?')}" if plat else "unspecified"

    wanted = f"linux/{host_arch()}"
    if len(candidates) == 1:
        found = platform_of(candidates[0])
        if found not in ("unspecified", wanted):
            raise ImageError(f"image is for {found}; this host runs {wanted}")
        return candidates[0]
    matching = [d for d in candidates if platform_of(d) == wanted]
    if not matching:
        found = ", ".join(sorted({platform_of(d) for d in candidates}))
        raise ImageError(f"OCI index has no {wanted} manifest (found: {found})")
    return matching[0]


def _load_oci(outer: _Outer, workdir: Path, tag: str | None) -> LoadedImage:
    desc = _select_manifest(outer, outer.read_json("index.json"), tag)
    manifest = _oci_json(outer, desc, "manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise ImageError("OCI manifest has no layers list")
    config_name, config_open = _oci_blob(outer, manifest.get("config"), "config")
    with config_open() as f:
        config, diff_ids = _check_config(_json(f.read(_JSON_LIMIT + 1), config_name), config_name)
    if len(diff_ids) != len(manifest["layers"]):
        raise ImageError(f"manifest lists {len(manifest['layers'])} layers but the config has {len(diff_ids)} diff_ids")
    image = LoadedImage("oci-layout", str(desc["digest"]), config, list(diff_ids))
    try:
        for layer_desc, diff_id in zip(manifest["layers"], diff_ids):
            name, opener = _oci_blob(outer, layer_desc, "layer")
            _open_layer(image, opener, name, diff_id, workdir)
    except BaseException:
        image.close()
        raise
    return image
