"""resolve(): override, tuned cache, fallback cache, errors; config hash."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from matchlock.api.errors import KernelError
from matchlock.kernel import KernelImage, fallback, resolve, tuned_config_hash
from matchlock.kernel.resolve import CONFIG_FRAGMENT, TUNED_CMDLINE, tuned_dir_name
from support.kernels import fake_fallback, fake_tuned


@pytest.fixture(autouse=True)
def no_kernel_override(cache_dir, monkeypatch) -> None:
    """Every test resolves from its own empty cache, with no MATCHLOCK_KERNEL(_INITRD) from the caller."""
    monkeypatch.delenv("MATCHLOCK_KERNEL", raising=False)
    monkeypatch.delenv("MATCHLOCK_KERNEL_INITRD", raising=False)


# --------------------------------------------------------------------------- config hash


def test_config_hash_is_sha256_of_fragment_bytes():
    digest = hashlib.sha256(CONFIG_FRAGMENT.read_bytes()).hexdigest()
    assert tuned_config_hash() == digest
    tuned_config_hash.cache_clear()
    assert tuned_config_hash() == digest  # stable across recomputation
    assert tuned_dir_name("6.1.192-3") == f"6.1.192-3-{digest[:12]}"


def test_fragment_has_the_measured_edits():
    from matchlock.kernel.build import parse_config

    values = parse_config(CONFIG_FRAGMENT.read_text())
    # Kconfig enables the CMOS RTC by default on x86, so it must be switched off explicitly.
    for off in ("CONFIG_RTC_HCTOSYS", "CONFIG_RTC_DRV_CMOS", "CONFIG_PCI", "CONFIG_VIRTIO_PCI"):
        assert values[off] == "n", off
    assert values["CONFIG_BLK_DEV_LOOP_MIN_COUNT"] == "0"
    for on in (
        "CONFIG_PVH",
        "CONFIG_VIRTIO_MMIO",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_EROFS_FS",
        "CONFIG_VIRTIO_BLK",
    ):
        assert values[on] == "y", on


# --------------------------------------------------------------------------- order


def test_override_is_used_first(tmp_path, cache_dir, monkeypatch):
    fake_tuned(cache_dir)
    kernel = tmp_path / "my-vmlinux"
    kernel.write_bytes(b"x")
    monkeypatch.setenv("MATCHLOCK_KERNEL", str(kernel))
    image = resolve()
    assert image == KernelImage(
        path=kernel.resolve(),
        kind="override",
        version="custom",
        initrd=None,
        cmdline=TUNED_CMDLINE,
        acpi=False,
        reason=image.reason,
    )
    assert "MATCHLOCK_KERNEL" in image.reason


def test_override_reads_version_from_build_json(cache_dir, monkeypatch):
    vmlinux = fake_tuned(cache_dir)
    (vmlinux.parent / "build.json").write_text('{"version": "6.1.192-3-abc"}')
    monkeypatch.setenv("MATCHLOCK_KERNEL", str(vmlinux))
    assert resolve().version == "6.1.192-3-abc"


def test_override_missing_file_names_path_and_fix(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "vmlinux"
    monkeypatch.setenv("MATCHLOCK_KERNEL", str(missing))
    with pytest.raises(KernelError) as info:
        resolve()
    assert str(missing) in str(info.value)
    assert "fix:" in str(info.value)


def test_override_with_initrd_boots_like_fallback(tmp_path, monkeypatch):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.cpio"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    monkeypatch.setenv("MATCHLOCK_KERNEL", str(kernel))
    monkeypatch.setenv("MATCHLOCK_KERNEL_INITRD", str(initrd))
    image = resolve()
    assert image.kind == "override"
    assert image.initrd == initrd.resolve()
    assert image.acpi is True
    assert image.cmdline == fallback.FALLBACK_CMDLINE


def test_override_initrd_missing(tmp_path, monkeypatch):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    monkeypatch.setenv("MATCHLOCK_KERNEL", str(kernel))
    monkeypatch.setenv("MATCHLOCK_KERNEL_INITRD", str(tmp_path / "absent.cpio"))
    with pytest.raises(KernelError, match="absent.cpio"):
        resolve()


def test_tuned_kernel_from_cache(cache_dir):
    vmlinux = fake_tuned(cache_dir)
    fake_fallback(cache_dir)  # the tuned kernel wins over a cached fallback
    image = resolve(build_fallback=False)
    assert image.kind == "tuned"
    assert image.path == vmlinux
    assert image.version == f"6.1.192-3-{tuned_config_hash()[:12]}"
    assert image.initrd is None
    assert image.cmdline == ("root=/dev/vda", "rootfstype=erofs", "ro", "init=/init")
    assert image.acpi is False


def test_newest_tuned_kernel_wins(cache_dir):
    fake_tuned(cache_dir, "6.1.100-1", mtime=1_000_000)
    newer = fake_tuned(cache_dir, "6.1.192-3", mtime=2_000_000)
    assert resolve(build_fallback=False).path == newer


def test_tuned_kernel_for_another_config_is_ignored(cache_dir):
    other = cache_dir / "kernels" / "6.1.192-3-000000000000" / "vmlinux"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"x")
    staging = cache_dir / "kernels" / f".tmp-6.1.192-3-{tuned_config_hash()[:12]}" / "vmlinux"
    staging.parent.mkdir(parents=True)
    staging.write_bytes(b"x")
    with pytest.raises(KernelError) as info:
        resolve(build_fallback=False)
    message = str(info.value)
    assert "matchlock kernel build" in message
    assert "fix:" in message


def test_cached_fallback(cache_dir):
    directory = fake_fallback(cache_dir)
    image = resolve(build_fallback=False)
    assert image.kind == "fallback"
    assert image.path == directory / "vmlinuz"
    assert image.initrd == directory / "initrd.cpio"
    assert image.version == "6.1.0-56-cloud-amd64"
    assert image.cmdline[0] == "rdinit=/init"
    assert image.acpi is True
    assert "matchlock kernel build" in image.reason


def test_incomplete_fallback_is_ignored(cache_dir):
    directory = fake_fallback(cache_dir)
    (directory / "initrd.cpio").unlink()
    with pytest.raises(KernelError):
        resolve(build_fallback=False)


def test_resolve_runs_no_subprocess_when_cached(cache_dir, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError(f"resolve() ran a subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    fake_fallback(cache_dir)
    assert resolve().kind == "fallback"
    fake_tuned(cache_dir)
    assert resolve().kind == "tuned"
