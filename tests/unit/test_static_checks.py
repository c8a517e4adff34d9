"""Lint, format and type checks, run from pytest so CI's one test command enforces them.

Configuration lives in pyproject.toml ([tool.ruff], [tool.mypy]); the tools come from the venv.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PYTHON_TREES = ["src", "tests", "benchmarks"]


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", *PYTHON_TREES],
        ["ruff", "format", "--check", *PYTHON_TREES],
        ["mypy", "src"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check(argv):
    tool = BIN / argv[0]
    assert tool.is_file(), f"{tool} is missing; fix: .venv/bin/pip install -e '.[test]'"
    result = subprocess.run([str(tool), *argv[1:]], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"`{' '.join(argv)}` failed:\n{result.stdout}{result.stderr}"


def test_test_file_names_are_unique():
    # pytest imports test files by basename (rootdir-relative, no packages): two files of one name in
    # tests/unit and tests/vm stop the whole session at collection.
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(REPO)} and {path.relative_to(REPO)}")
        seen.setdefault(path.name, path)
    assert not clashes, f"test files share a name: {'; '.join(clashes)}; fix: rename one of each pair"
