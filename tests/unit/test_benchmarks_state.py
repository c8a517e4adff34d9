"""Benchmarks leave nothing in /tmp (issue 10, item 20)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_makes_a_temporary_directory_it_never_removes():
    for script in sorted(BENCHMARKS.glob("*.py")):
        source = script.read_text()
        assert "mkdtemp(" not in source, f"{script.name}: use tempfile.TemporaryDirectory or private_state_dir()"
        if script.name.startswith("bench_") and "MATCHLOCK_STATE_DIR" in source:
            assert re.search(r"TemporaryDirectory\(", source), script.name


def test_private_state_dir_is_removed_afterwards(monkeypatch):
    monkeypatch.delenv("MATCHLOCK_STATE_DIR", raising=False)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchstate import private_state_dir

    with private_state_dir() as state:
        assert os.environ["MATCHLOCK_STATE_DIR"] == str(state)
        (state / "vms" / "vm-00000000").mkdir(parents=True)
    assert not state.exists() and "MATCHLOCK_STATE_DIR" not in os.environ
    sys.modules.pop("benchstate", None)


def test_a_state_dir_the_caller_chose_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from benchstate import private_state_dir

    with private_state_dir() as state:
        assert state == tmp_path
    assert tmp_path.exists() and os.environ["MATCHLOCK_STATE_DIR"] == str(tmp_path)
