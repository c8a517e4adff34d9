"""The guest code's digest is cached by the files' stat (image/runtime.py): a start reads no guest source,
and any change to a file still changes the digest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from matchlock.image import runtime


@pytest.fixture
def source(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "src" / "matchlock"
    for package in runtime.GUEST_PACKAGES:
        shutil.copytree(Path(runtime.__file__).parent.parent / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    monkeypatch.setattr(runtime, "_source_root", lambda: root)
    (tmp_path / "runtime").mkdir()
    monkeypatch.setattr(runtime, "runtime_dir", lambda: tmp_path / "runtime")
    monkeypatch.setattr(runtime, "RACY_NS", -1)  # the copies count as old enough to cache
    return root


def _unreadable(*args):
    raise AssertionError("a guest source was read although none changed")


def test_an_unchanged_tree_is_not_read_again(source, monkeypatch):
    first = runtime.guest_code_digest()
    monkeypatch.setattr(runtime, "directory_digest_input", _unreadable)
    assert runtime.guest_code_digest() == first


def test_an_edit_of_the_same_size_changes_the_digest(source):
    init = source / "guest" / "init.py"
    os.utime(init, (1, 1))  # older than the edit below, even within one tick of the clock
    first = runtime.guest_code_digest()
    text = init.read_text()
    init.write_text(text[:-1] + ("#" if text[-1] != "#" else "\n"))  # same size, new content
    second = runtime.guest_code_digest()
    assert second != first
    (runtime.runtime_dir() / runtime.DIGEST_CACHE).unlink()
    assert runtime.guest_code_digest() == second  # what hashing from scratch gives


def test_a_damaged_cache_is_hashed_again(source):
    first = runtime.guest_code_digest()
    (runtime.runtime_dir() / runtime.DIGEST_CACHE).write_text("{not json")
    assert runtime.guest_code_digest() == first


def test_files_changed_just_now_are_not_cached(source, monkeypatch):
    monkeypatch.setattr(runtime, "RACY_NS", 10**18)  # every file counts as changed within the granularity
    runtime.guest_code_digest()
    assert not (runtime.runtime_dir() / runtime.DIGEST_CACHE).exists()
