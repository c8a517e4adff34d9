"""Stand-in kernels in a cache directory, laid out the way resolve() looks for them."""

from __future__ import annotations

import os
from pathlib import Path

from matchlock.kernel import fallback
from matchlock.kernel.resolve import tuned_config_hash


def fake_tuned(cache: Path, source_version: str = "6.1.192-3", mtime: float | None = None) -> Path:
    """kernels/<linux-source version>-<config hash[:12]>/vmlinux; `mtime` dates the vmlinux."""
    vmlinux = cache / "kernels" / f"{source_version}-{tuned_config_hash()[:12]}" / "vmlinux"
    vmlinux.parent.mkdir(parents=True)
    vmlinux.write_bytes(b"\x7fELF fake")
    if mtime is not None:
        os.utime(vmlinux, (mtime, mtime))
    return vmlinux


def fake_fallback(cache: Path, release: str = "6.1.0-56-cloud-amd64", mtime: float | None = None) -> Path:
    """kernels/fallback-<release>-<input hash[:12]>/ with vmlinuz and initrd.cpio; `mtime` dates the directory."""
    directory = cache / "kernels" / f"fallback-{release}-{fallback.input_hash()[:12]}"
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"bzImage")
    (directory / "initrd.cpio").write_bytes(b"070701")
    if mtime is not None:
        os.utime(directory, (mtime, mtime))
    return directory
