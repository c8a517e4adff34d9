"""`matchlock version` and `matchlock diagnose`, in-process where a fault must be simulated."""

from __future__ import annotations

import importlib
import json
import re

from matchlock.cli import info

resolve_module = importlib.import_module("matchlock.kernel.resolve")


def test_version_format(cli):
    result = cli("version")
    assert result.returncode == 0
    assert re.fullmatch(r"matchlock \S+ \(commit: \S+, built: \S+\)\n", result.stdout), result


def test_version_flag(cli):
    result = cli("--version")
    assert result.stdout.startswith("matchlock version ")


def test_diagnose_json_shape(cli):
    result = cli("diagnose", "--json")
    report = json.loads(result.stdout)
    names = {check["name"] for check in report["checks"]}
    assert {"accelerator", "qemu", "kernel", "guest-runtime", "e2fsprogs", "erofs-utils", "nftables"} <= names
    for check in report["checks"]:
        assert check["status"] in ("pass", "fail", "warn")
        if check["status"] != "pass":
            assert check.get("fix"), check
    assert report["ok"] == all(c["status"] != "fail" for c in report["checks"])
    assert result.returncode == (0 if report["ok"] else 1)


def test_diagnose_explains_the_accelerator_choice():
    check = info._accelerator_check()
    assert check.message.startswith(("kvm", "tcg"))
    if check.message.startswith("tcg"):
        assert "software emulation" in check.message and check.status == "warn"


def test_diagnose_shows_the_fallback_kernel(monkeypatch):
    monkeypatch.delenv("MATCHLOCK_KERNEL", raising=False)
    monkeypatch.setattr(resolve_module, "find_tuned", lambda: None)
    check = info._kernel_check()
    if check.status == "fail":  # no fallback cached either
        assert "kernel build" in check.fix
    else:
        assert check.status == "warn" and check.message.startswith("fallback")
        assert check.fix == "matchlock kernel build"


def test_diagnose_reports_a_missing_tool(monkeypatch):
    monkeypatch.setattr(info.shutil, "which", lambda name: None)
    check = info._tool_check("qemu", "qemu-system-x86_64", "qemu-system-x86")
    assert check.status == "fail" and check.fix == "apt-get install qemu-system-x86"
