"""The upper disk: a sparse copy of a blank ext4 made once per size (sandbox/upper.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from matchlock.api.errors import SetupError
from matchlock.sandbox import upper


def _blanks(cache: Path) -> list[Path]:
    return sorted((cache / "upper").glob("ext4-*.img"))


def test_each_disk_is_a_sparse_copy_of_one_blank_made_once(cache_dir, tmp_path, monkeypatch):
    calls = []
    run = subprocess.run
    monkeypatch.setattr(upper.subprocess, "run", lambda argv, **kw: calls.append(argv) or run(argv, **kw))
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    upper.make_upper_disk(first, 64)
    upper.make_upper_disk(second, 64)
    assert [argv[0] for argv in calls] == ["mke2fs"]  # the second disk is only a copy
    [blank] = _blanks(cache_dir)
    assert first.read_bytes() == second.read_bytes() == blank.read_bytes()
    assert first.stat().st_size == 64 << 20 and first.stat().st_blocks * 512 < 8 << 20  # holes stay holes
    if shutil.which("e2fsck"):
        check = subprocess.run(["e2fsck", "-fn", str(second)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_blank_removed_by_a_prune_is_made_again(cache_dir, tmp_path):
    upper.make_upper_disk(tmp_path / "a.img", 32)
    for blank in _blanks(cache_dir):
        blank.unlink()
    upper.make_upper_disk(tmp_path / "b.img", 32)
    [blank] = _blanks(cache_dir)
    assert (tmp_path / "b.img").read_bytes() == blank.read_bytes()


def test_only_the_most_recent_sizes_keep_a_blank(cache_dir, tmp_path):
    sizes = [8 + n for n in range(upper.KEEP_BLANKS + 2)]
    for size in sizes:
        upper.make_upper_disk(tmp_path / f"{size}.img", size)
    kept = {int(p.name.split("-")[1].removesuffix("m")) for p in _blanks(cache_dir)}
    assert len(kept) == upper.KEEP_BLANKS and sizes[-1] in kept
    assert not list((cache_dir / "upper").glob("*.partial-*"))


def test_a_disk_that_cannot_be_made_names_the_size_and_the_fix(cache_dir, tmp_path):
    with pytest.raises(SetupError, match=r"cannot create a 64 MB sandbox disk in .*; fix: a smaller --disk-size"):
        upper.make_upper_disk(tmp_path / "missing-dir" / "a.img", 64)
