"""QEMU arguments that decide how much memory an idle sandbox costs (benchmarks/bench_density.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from matchlock.api.errors import UsageError
from matchlock.vm import machine
from matchlock.vm.accel import AccelChoice
from matchlock.vm.machine import TCG_BUFFER_ENV, MachineSpec, build_argv


def _argv(tmp_path: Path, accel: str = "tcg") -> list[str]:
    spec = MachineSpec(
        name="vm-1", kernel=Path("/k"), kernel_args=(), disks=(), console_log=tmp_path / "log",
        accel=AccelChoice(accel, "test"),
    )  # fmt: skip
    return build_argv(spec, 3, 4)


def _accel_arg(argv: list[str]) -> str:
    return argv[argv.index("-accel") + 1]


def test_by_default_tcg_keeps_qemus_buffer_so_template_keys_do_not_change(tmp_path, monkeypatch):
    monkeypatch.delenv(TCG_BUFFER_ENV, raising=False)
    assert _accel_arg(_argv(tmp_path)) == "tcg"
    monkeypatch.setattr(machine, "TCG_BUFFER_MB", 24)
    assert _accel_arg(_argv(tmp_path)) == "tcg,tb-size=24"


@pytest.mark.parametrize(("value", "expected"), [("0", "tcg"), ("32", "tcg,tb-size=32"), (" 16 ", "tcg,tb-size=16")])
def test_the_buffer_size_can_be_chosen_and_zero_means_qemus_default(tmp_path, monkeypatch, value, expected):
    monkeypatch.setenv(TCG_BUFFER_ENV, value)
    assert _accel_arg(_argv(tmp_path)) == expected


def test_kvm_has_no_translation_buffer(tmp_path, monkeypatch):
    monkeypatch.setenv(TCG_BUFFER_ENV, "32")
    assert _accel_arg(_argv(tmp_path, "kvm")) == "kvm"


@pytest.mark.parametrize("value", ["-1", "8M", "big"])
def test_a_bad_size_names_the_value_and_the_fix(tmp_path, monkeypatch, value):
    monkeypatch.setenv(TCG_BUFFER_ENV, value)
    with pytest.raises(UsageError) as raised:
        _argv(tmp_path)
    assert repr(value) in str(raised.value) and "whole number" in str(raised.value)
