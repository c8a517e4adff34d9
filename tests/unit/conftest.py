"""Fixtures shared by several unit test files: the fake guest's channel, the built-in image's package cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import fake_guest
import pytest


@pytest.fixture
async def connected():
    async with fake_guest.connected() as pair:
        yield pair


@pytest.fixture
async def booted():
    async with fake_guest.booted() as pair:
        yield pair


@pytest.fixture(scope="module")
def busybox_debs() -> list[Path]:
    """busybox-static from the shared package cache (module scope: read before `cache_dir` replaces it)."""
    from matchlock.api.paths import debs_dir

    cached = sorted(debs_dir().glob("busybox-static_*.deb"))
    if not cached:
        pytest.fail("busybox-static is not in the package cache: run scripts/setup.sh first")
    return cached


@pytest.fixture
def busybox_cache(busybox_debs, cache_dir) -> Path:
    """A private cache holding only the package the built-in image is made from."""
    (cache_dir / "debs").mkdir(parents=True)
    for deb in busybox_debs:
        shutil.copy2(deb, cache_dir / "debs" / deb.name)
    return cache_dir
