"""Accelerator choice and host timing facts for QEMU.

KVM is used only where the CPU really has hardware virtualization and the
vendor KVM module is loaded. `/dev/kvm` alone proves nothing: on our build
hosts it is backed by PVM (`kvm_pvm`), under which stock guest kernels hang.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import UsageError
from ..api.paths import cache_dir

ACCELERATORS = ("kvm", "tcg")


@dataclass(frozen=True)
class AccelChoice:
    name: str  # "kvm" | "tcg"
    reason: str


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def hardware_kvm_available() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    flags = _cpu_flags()
    if not flags & {"vmx", "svm"}:
        pvm = (
            " (/dev/kvm is backed by kvm_pvm, which cannot run stock guest kernels)"
            if os.path.isdir("/sys/module/kvm_pvm")
            else ""
        )
        return False, f"the CPU reports no vmx/svm flag{pvm}"
    if not (os.path.isdir("/sys/module/kvm_intel") or os.path.isdir("/sys/module/kvm_amd")):
        return False, "neither kvm_intel nor kvm_amd is loaded"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    return True, "hardware virtualization (vmx/svm) with kvm_intel/kvm_amd"


def choose_accelerator() -> AccelChoice:
    override = os.environ.get("MATCHLOCK_ACCEL", "").strip().lower()
    if override:
        if override not in ACCELERATORS:
            raise UsageError(f"MATCHLOCK_ACCEL={override!r} is not one of {', '.join(ACCELERATORS)}")
        return AccelChoice(override, f"MATCHLOCK_ACCEL={override}")
    ok, why = hardware_kvm_available()
    if ok:
        return AccelChoice("kvm", why)
    return AccelChoice("tcg", f"software emulation: {why}")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _tsc_from_kernel_log() -> int | None:
    """The kernel's own TSC calibration, in kHz, from /dev/kmsg."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = None
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE when records were overwritten; keep reading
                continue
            match = re.search(r"tsc: (?:Refined TSC clocksource calibration|Detected): ([0-9.]+) MHz", record)
            if match:
                found = int(float(match.group(1)) * 1000)
    finally:
        os.close(fd)
    return found


def _tsc_from_cpuinfo() -> int | None:
    try:
        match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return None
    return int(float(match.group(1)) * 1000) if match else None


def host_tsc_khz() -> int | None:
    """Host TSC frequency in kHz, cached per boot (reading the kernel log costs a few ms).

    Under TCG, microvm guests hang at random during TSC calibration unless
    the command line carries `tsc_early_khz=` with this value.
    """
    cache = cache_dir() / "host-tsc-khz"
    boot_id = _boot_id()
    try:
        cached_boot, value = cache.read_text().split()
        if cached_boot == boot_id:
            return int(value)
    except (OSError, ValueError):
        pass
    khz = _tsc_from_kernel_log() or _tsc_from_cpuinfo()
    if khz:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(f"{boot_id} {khz}\n")
        except OSError:
            pass
    return khz
