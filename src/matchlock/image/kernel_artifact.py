"""Guest kernels distributed as OCI artifacts (upstream publishes `ghcr.io/jingkaihe/matchlock/kernel:<ver>`).

The host platform's manifest (picked from an index when there is one) carries the kernel in its first
layer, which is downloaded and verified against its digest. As upstream does, the layer is tried as a
tar.gz, then as a plain tar (holding a file named `kernel`, `kernel-arm64` on arm64), then as the raw
binary. What comes out must look like a kernel for this host (an ELF vmlinux for its machine, or a
bzImage / arm64 Image), else nothing is cached.

Layout under `<kernels_dir>/oci/`:
- `sha256/<layer hex>/kernel`: the kernel extracted from that layer (content-addressed: every
  reference that resolves to the layer shares it);
- `refs/<hash of reference and platform>.json`: the layer a reference resolved to, so a cached
  reference boots without asking the registry again (as cached image tags do);
- `locks/` (one flock per reference: concurrent pulls of it wait for the first) and `tmp/`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol, cast

from ..api.errors import ImageError
from ..api.paths import kernels_dir
from ..util.fs import file_lock
from .archive import host_arch, normalise
from .media import INDEX_TYPES, MANIFEST_TYPES
from .pull import Platform, _descriptor, _json, select_manifest
from .reference import Reference, parse
from .registry import RegistryClient

MAX_LAYER = 512 << 20  # kernels are tens of MB; refuse absurd layers before downloading them
MAX_KERNEL = 256 << 20  # bounds what a compressed layer may expand to
_ELF_MACHINES = {"amd64": 62, "arm64": 183}  # EM_X86_64, EM_AARCH64
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def kernel_file_name(arch: str | None = None) -> str:
    """The file a kernel tar layer holds, as upstream names it."""
    return "kernel-arm64" if (arch or host_arch()) == "arm64" else "kernel"


def artifact_root() -> Path:
    return kernels_dir() / "oci"


def pull_kernel(text: str) -> Path:
    """The cached kernel of OCI reference `text` for this host, pulling it first when it is not cached."""
    ref = parse(text)
    platform = Platform.host()
    root = artifact_root()
    key = hashlib.sha256(f"{ref.canonical} {platform}".encode()).hexdigest()[:32]
    record = root / "refs" / f"{key}.json"
    cached = _cached(record, root)
    if cached is not None:
        return cached
    with file_lock(root / "locks" / f"{key}.lock"):
        cached = _cached(record, root)  # a concurrent pull of the same reference may have finished it
        if cached is not None:
            return cached
        with RegistryClient(ref) as client, _workdir(root) as work:
            manifest_digest, layer, size = _first_layer(client, ref, platform)
            dest = _kernel_path(root, layer)
            if not dest.is_file():
                blob = work / "layer"
                client.download_blob(layer, size, blob, work / "layer.part", lambda _n: None)
                what = f"layer {layer} of {ref}"
                kernel = _extract(blob, work, what)
                check_kernel(kernel, what)
                _publish(kernel, dest)
            entry = {"reference": ref.canonical, "platform": str(platform), "manifest": manifest_digest, "layer": layer}
            _write_atomic(record, json.dumps(entry).encode(), work)
    return dest


def _kernel_path(root: Path, layer: str) -> Path:
    return root / "sha256" / layer.removeprefix("sha256:") / kernel_file_name()


def _cached(record: Path, root: Path) -> Path | None:
    try:
        layer = json.loads(record.read_text()).get("layer")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(layer, str) or not layer.startswith("sha256:") or not _HEX64.match(layer[7:]):
        return None  # a damaged record is pulled again
    path = _kernel_path(root, layer)
    return path if path.is_file() else None


@contextlib.contextmanager
def _workdir(root: Path) -> Iterator[Path]:
    """Scratch space beside the cache, so publishing is a rename on one filesystem."""
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for stale in tmp.glob("pull-*-*"):
        if not _alive(stale.name.split("-")[1]):  # left by a pull that was killed midway
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"pull-{os.getpid()}-", dir=tmp))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _first_layer(client: RegistryClient, ref: Reference, platform: Platform) -> tuple[str, str, int]:
    """(manifest digest, first layer digest, its size) for `platform`."""
    body, media_type, digest = client.manifest(ref.manifest_ref)
    if media_type in INDEX_TYPES:
        entry = select_manifest(_json(body, f"index of {ref}"), platform)
        body, media_type, digest = client.manifest(_descriptor(entry, f"index entry of {ref}")[0])
    if media_type not in MANIFEST_TYPES:
        raise ImageError(f"{ref}: unsupported manifest media type {media_type!r} for a kernel artifact")
    layers = _json(body, f"manifest of {ref}").get("layers")
    if not isinstance(layers, list) or not layers:
        raise ImageError(f"{ref} has no layers: a kernel artifact carries the kernel in its first layer")
    layer, size, _ = _descriptor(layers[0], f"first layer of {ref}")
    if size > MAX_LAYER:
        raise ImageError(f"{ref}: its first layer is {size} bytes, over the {MAX_LAYER >> 20} MiB a kernel may take")
    return digest, layer, size


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Bounded:
    """A read-only stream that fails once more than `limit` bytes came out (a gzip bomb stops here)."""

    def __init__(self, inner: _Readable, limit: int, what: str) -> None:
        self.inner, self.limit, self.left, self.what = inner, limit, limit, what

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size if size >= 0 else self.left + 1)
        self.left -= len(data)
        if self.left < 0:
            raise ImageError(f"{self.what} expands to more than {self.limit >> 20} MiB; it is not a kernel")
        return data


def _extract(blob: Path, work: Path, what: str) -> Path:
    """The kernel file out of the layer: tar.gz, then plain tar, then the layer itself."""
    with open(blob, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    out = work / "kernel"
    with gzip.open(blob, "rb") if gzipped else open(blob, "rb") as raw:
        found = _from_tar(raw, out, what)
    return found if found is not None else blob


def _from_tar(raw: _Readable, out: Path, what: str) -> Path | None:
    """The kernel member copied to `out`; None when the stream is not a tar at all."""
    name = kernel_file_name()
    seen: list[str] = []
    stream = cast(IO[bytes], _Bounded(raw, MAX_KERNEL * 2, what))
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                parts = normalise(member.name, what)
                seen.append("/".join(parts))
                if not parts or parts[-1] != name or not member.isreg():
                    continue
                if member.size > MAX_KERNEL:
                    raise ImageError(f"{what}: {member.name} is {member.size} bytes, over {MAX_KERNEL >> 20} MiB")
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has data
                with open(out, "wb") as dest:
                    shutil.copyfileobj(source, dest, _CHUNK)
                return out
    except (tarfile.ReadError, EOFError, OSError, zlib.error) as exc:
        if not seen:
            return None  # not a tar archive: the next form is tried
        raise ImageError(f"{what}: the tar archive is corrupt ({exc})") from None
    listed = ", ".join(seen[:10]) + (", ..." if len(seen) > 10 else "")
    raise ImageError(
        f"{what} is a tar archive without a regular file named {name} (it has: {listed or 'nothing'}); "
        f"publish the kernel as {name} in the layer's root, or as the raw layer"
    )


def check_kernel(path: Path, what: str) -> None:
    """ImageError unless `path` looks like a kernel QEMU can boot on this host."""
    arch = host_arch()
    with open(path, "rb") as f:
        head = f.read(0x240)
    if head[:4] == b"\x7fELF":
        if len(head) < 20 or head[5] != 1:
            raise ImageError(f"{what} is an ELF file but not a little-endian one; it is not a kernel for {arch}")
        machine = struct.unpack_from("<H", head, 18)[0]
        if machine != _ELF_MACHINES.get(arch):
            raise ImageError(f"{what} is an ELF file for machine {machine}, not a kernel for this {arch} host")
        return
    if arch == "amd64" and head[0x1FE:0x200] == b"\x55\xaa" and head[0x202:0x206] == b"HdrS":
        return  # bzImage: boot sector signature and the setup header magic
    if arch == "arm64" and head[0x38:0x3C] == b"ARM\x64":
        return  # arm64 Image header magic
    raise ImageError(
        f"{what} is not a kernel: it is {path.stat().st_size} bytes starting with {head[:8].hex(' ') or 'nothing'}; "
        "expected an ELF vmlinux or a bzImage (as a tar.gz or tar holding a file named "
        f"{kernel_file_name()}, or the raw binary as the layer)"
    )


def _publish(kernel: Path, dest: Path) -> None:
    """Move a checked kernel into the cache with an atomic rename, after fsync."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(kernel, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(kernel, 0o644)
    os.rename(kernel, dest)


def _write_atomic(path: Path, data: bytes, work: Path) -> None:
    tmp = work / path.name
    tmp.write_bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, path)
