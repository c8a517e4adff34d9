"""Choose the guest kernel for a VM.

Order: `MATCHLOCK_KERNEL` (override), then the tuned kernel built by
`matchlock kernel build` (which `matchlock setup` runs in the background),
then Debian's cloud kernel with a small initramfs (the fallback, built on
demand). A tuned kernel published while sandboxes run is used from the next
one; boot templates are keyed by the kernel file, so none is reused across kernels. This runs on every `matchlock run`, so the
cached cases only glob the cache directory: no apt, dpkg or subprocess calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from ..api.errors import KernelError
from ..api.paths import kernels_dir

CONFIG_FRAGMENT = Path(__file__).with_name("x86_64.config")

# The tuned kernel mounts the runtime disk (the first virtio-blk device) as its root.
TUNED_CMDLINE: tuple[str, ...] = ("root=/dev/vda", "rootfstype=erofs", "ro", "init=/init")

ENV_KERNEL = "MATCHLOCK_KERNEL"
ENV_INITRD = "MATCHLOCK_KERNEL_INITRD"

# override: MATCHLOCK_KERNEL; tuned: built by `matchlock kernel build`; fallback: Debian's cloud kernel.
KernelKind = Literal["tuned", "fallback", "override"]


@dataclass(frozen=True)
class KernelImage:
    path: Path  # what QEMU gets as -kernel
    kind: KernelKind
    version: str  # e.g. "6.1.192-3-<confighash12>" or the Debian kernel release
    initrd: Path | None  # fallback (and override with MATCHLOCK_KERNEL_INITRD) only
    cmdline: tuple[str, ...]  # kernel-specific arguments; the VM layer adds the generic ones
    acpi: bool  # whether QEMU must keep ACPI on (-M microvm without acpi=off)
    reason: str  # one line: why this kernel was chosen, for `matchlock diagnose`


@lru_cache(maxsize=1)
def tuned_config_hash() -> str:
    """sha256 (hex) of the config fragment's bytes; names use the first 12 characters."""
    return hashlib.sha256(CONFIG_FRAGMENT.read_bytes()).hexdigest()


def tuned_dir_name(source_version: str) -> str:
    """Cache directory name of the tuned kernel built from `linux-source` `source_version`."""
    return f"{source_version}-{tuned_config_hash()[:12]}"


def find_tuned() -> Path | None:
    """The newest cached tuned `vmlinux` for the current config fragment, if any."""
    root = kernels_dir()
    suffix = tuned_config_hash()[:12]
    candidates = []
    for vmlinux in root.glob(f"*-{suffix}/vmlinux"):
        name = vmlinux.parent.name
        if name.startswith((".", "fallback-")):
            continue
        try:
            candidates.append((vmlinux.stat().st_mtime, vmlinux))
        except OSError:
            continue
    if not candidates:
        return None
    return max(candidates)[1]


def resolve(*, build_fallback: bool = True, kernel_path: Path | None = None) -> KernelImage:
    """`kernel_path` is a caller's explicit kernel (rpc `kernel.ref`): it wins over MATCHLOCK_KERNEL."""
    override = str(kernel_path) if kernel_path is not None else os.environ.get(ENV_KERNEL)
    if override:
        return _override(override)
    tuned = find_tuned()
    if tuned is not None:
        return KernelImage(
            path=tuned,
            kind="tuned",
            version=tuned.parent.name,
            initrd=None,
            cmdline=TUNED_CMDLINE,
            acpi=False,
            reason=f"tuned kernel built for this config ({tuned.parent})",
        )
    return _fallback(build_fallback)


def _override(value: str) -> KernelImage:
    path = Path(value).expanduser()
    if not path.is_file():
        raise KernelError(
            f"{ENV_KERNEL}={value}: no such file\n"
            f"  fix: point {ENV_KERNEL} at a kernel image (a PVH vmlinux), or unset it to use "
            "the tuned kernel (`matchlock kernel build`)"
        )
    path = path.resolve()
    version = _override_version(path)
    initrd_value = os.environ.get(ENV_INITRD)
    if not initrd_value:
        return KernelImage(
            path=path,
            kind="override",
            version=version,
            initrd=None,
            cmdline=TUNED_CMDLINE,
            acpi=False,
            reason=f"{ENV_KERNEL} is set (booted like the tuned kernel: everything built in, no initrd)",
        )
    from .fallback import FALLBACK_CMDLINE

    initrd = Path(initrd_value).expanduser()
    if not initrd.is_file():
        raise KernelError(
            f"{ENV_INITRD}={initrd_value}: no such file\n"
            f"  fix: point {ENV_INITRD} at an initramfs (cpio) for {path}, or unset it"
        )
    return KernelImage(
        path=path,
        kind="override",
        version=version,
        initrd=initrd.resolve(),
        cmdline=FALLBACK_CMDLINE,
        acpi=True,
        reason=f"{ENV_KERNEL} and {ENV_INITRD} are set (booted like the fallback: modules from the initramfs, ACPI on)",
    )


def _override_version(path: Path) -> str:
    """The version recorded by `matchlock kernel build` beside the file, else "custom"."""
    try:
        return str(json.loads((path.parent / "build.json").read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return "custom"


def _not_built_reason() -> str:
    return (
        f"the tuned kernel is not built (no {kernels_dir()}/*-{tuned_config_hash()[:12]}/vmlinux); "
        "`matchlock setup` builds it in the background, `matchlock kernel build` in the foreground (5-9 min once) "
        "for cold boots about a third faster"
    )


def _fallback(build: bool) -> KernelImage:
    from . import fallback

    found = fallback.cached_fallback()
    if found is None:
        if not build:
            raise KernelError(
                f"no guest kernel is available: {_not_built_reason()}\n"
                "  fix: run `matchlock kernel build` (or set MATCHLOCK_KERNEL=/path/to/vmlinux)"
            )
        found = fallback.build_fallback(log=lambda message: print(message, file=sys.stderr, flush=True))
    return KernelImage(
        path=found.vmlinuz,
        kind="fallback",
        version=found.release,
        initrd=found.initrd,
        cmdline=fallback.FALLBACK_CMDLINE,
        acpi=True,
        reason=f"Debian cloud kernel {found.release} with an initramfs: {_not_built_reason()}",
    )
