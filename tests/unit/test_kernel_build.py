"""Tuned-kernel build helpers: config verification, PVH note check, cache hit, CLI."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from matchlock.api.errors import KernelError, SetupError
from matchlock.cli.kernel import kernel as kernel_cli
from matchlock.kernel import build
from matchlock.kernel.resolve import CONFIG_FRAGMENT, tuned_config_hash
from support.kernels import fake_tuned

FRAGMENT = """\
# comment
CONFIG_64BIT=y
CONFIG_LOCALVERSION="-matchlock"
CONFIG_SERIAL_8250_NR_UARTS=1
CONFIG_BLK_DEV_LOOP_MIN_COUNT=0
# CONFIG_MODULES is not set
CONFIG_IP_VS=y
"""

GOOD_DOTCONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_64BIT=y
CONFIG_LOCALVERSION="-matchlock"
CONFIG_SERIAL_8250_NR_UARTS=1
CONFIG_BLK_DEV_LOOP_MIN_COUNT=0
CONFIG_IP_VS=y
CONFIG_OTHER=m
"""


@pytest.fixture(autouse=True)
def no_kernel_override(cache_dir, monkeypatch) -> None:
    """Builds land in the test's own cache; no MATCHLOCK_KERNEL from the caller."""
    monkeypatch.delenv("MATCHLOCK_KERNEL", raising=False)


def test_parse_config():
    values = build.parse_config(FRAGMENT)
    assert values["CONFIG_LOCALVERSION"] == '"-matchlock"'
    assert values["CONFIG_MODULES"] == "n"
    assert values["CONFIG_BLK_DEV_LOOP_MIN_COUNT"] == "0"
    assert "comment" not in " ".join(values)


def test_verification_passes_when_everything_stuck():
    assert build.options_not_applied(FRAGMENT, GOOD_DOTCONFIG) == []
    build.verify_config(FRAGMENT, GOOD_DOTCONFIG)


def test_verification_catches_options_that_did_not_stick():
    dotconfig = (
        GOOD_DOTCONFIG.replace("CONFIG_IP_VS=y\n", "")  # dropped: unmet dependency
        .replace("CONFIG_BLK_DEV_LOOP_MIN_COUNT=0", "CONFIG_BLK_DEV_LOOP_MIN_COUNT=8")
        .replace('"-matchlock"', '""')
        + "CONFIG_MODULES=y\n"
    )
    missing = build.options_not_applied(FRAGMENT, dotconfig)
    assert missing == [
        'CONFIG_LOCALVERSION: wanted "-matchlock", got ""',
        "CONFIG_BLK_DEV_LOOP_MIN_COUNT: wanted 0, got 8",
        "CONFIG_MODULES: wanted n, got y",
        "CONFIG_IP_VS: wanted y, got n (dropped)",
    ]
    with pytest.raises(KernelError) as info:
        build.verify_config(FRAGMENT, dotconfig)
    assert "CONFIG_IP_VS" in str(info.value)
    assert "4 option(s)" in str(info.value)


def test_not_set_in_fragment_matches_explicit_not_set():
    assert build.options_not_applied("# CONFIG_PCI is not set\n", "# CONFIG_PCI is not set\n") == []


def test_real_fragment_parses_to_many_options():
    values = build.parse_config(CONFIG_FRAGMENT.read_text())
    assert len(values) > 100
    assert values["CONFIG_PVH"] == "y"


READELF_PVH = """
Displaying notes found in: .notes
  Owner                Data size 	Description
  Xen                  0x00000006	Unknown note type: (0x00000006)
   description data: 6c 69 6e 75 78 00
  Xen                  0x00000004	Unknown note type: (0x00000012)
   description data: 00 a0 4b 01
  GNU                  0x00000014	NT_GNU_BUILD_ID (unique build ID bitstring)
"""


def test_pvh_note_detection():
    assert build.has_pvh_note(READELF_PVH)
    assert not build.has_pvh_note(READELF_PVH.replace("0x00000012", "0x00000011"))
    assert not build.has_pvh_note("")


def test_missing_packages_name_the_apt_command(monkeypatch):
    monkeypatch.setattr(build, "_dpkg_installed", lambda packages: {"bc", "linux-source-6.1"})
    with pytest.raises(SetupError) as info:
        build.check_prerequisites()
    assert "apt-get install -y bison flex libelf-dev libssl-dev" in str(info.value)


def test_cached_build_returns_at_once(cache_dir, monkeypatch):
    def no_prerequisites():
        raise AssertionError("a cached build must not check build prerequisites")

    monkeypatch.setattr(build, "check_prerequisites", no_prerequisites)
    monkeypatch.setattr(build, "source_version", lambda: "6.1.192-3")
    target = fake_tuned(cache_dir, "6.1.192-3")

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached build must not run anything")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    assert build.build_tuned(log=forbidden) == target

    result = CliRunner().invoke(kernel_cli, ["build"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"Kernel already built: {target}"

    result = CliRunner().invoke(kernel_cli, ["path"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["tuned", target.parent.name, str(target)]


def test_jobs_must_be_positive():
    with pytest.raises(KernelError):
        build._jobs(0)
    assert build._jobs(3) == 3
    assert build._jobs(None) >= 1


def test_cached_build_is_found_without_the_source_package(cache_dir, monkeypatch):
    def not_installed():
        raise SetupError("linux-source-6.1 is not installed")

    monkeypatch.setattr(build, "source_version", not_installed)
    assert build.cached_tuned() is None
    target = fake_tuned(cache_dir, "6.1.100-1")
    assert build.cached_tuned() == target
    assert build.build_tuned() == target


def test_published_build_is_what_resolve_finds(cache_dir, tmp_path):
    tree = tmp_path / "linux-source-6.1"
    (tree / "include" / "config").mkdir(parents=True)
    (tree / "vmlinux").write_bytes(b"\x7fELF kernel")
    (tree / ".config").write_text(GOOD_DOTCONFIG)
    (tree / "include" / "config" / "kernel.release").write_text("6.1.192-matchlock\n")
    final = build.tuned_kernel_dir("6.1.192-3")
    record = {"source_version": "6.1.192-3", "config_sha256": tuned_config_hash(), "build_seconds": 1.5, "jobs": 2}
    build._publish(tree, final, record)

    assert (final / "vmlinux").read_bytes() == b"\x7fELF kernel"
    assert (final / "config").read_text() == GOOD_DOTCONFIG
    written = json.loads((final / "build.json").read_text())
    assert written == {
        "version": f"6.1.192-3-{tuned_config_hash()[:12]}",
        "source_package": "linux-source-6.1",
        **record,
        "kernel_release": "6.1.192-matchlock",
        "vmlinux_bytes": len(b"\x7fELF kernel"),
    }
    assert build.find_tuned() == final / "vmlinux"
