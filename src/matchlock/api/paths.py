"""Where matchlock keeps caches and state.

`MATCHLOCK_CACHE_DIR` and `MATCHLOCK_STATE_DIR` override the defaults
(`~/.cache/matchlock` and `~/.matchlock`); tests use them to isolate state
while sharing the expensive caches.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    override = os.environ.get("MATCHLOCK_CACHE_DIR")
    return Path(override) if override else Path.home() / ".cache" / "matchlock"


def state_dir() -> Path:
    override = os.environ.get("MATCHLOCK_STATE_DIR")
    return Path(override) if override else Path.home() / ".matchlock"


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def images_dir() -> Path:
    return cache_dir() / "images"


def runtime_dir() -> Path:
    return cache_dir() / "runtime"


def debs_dir() -> Path:
    """Downloaded Debian packages, shared by the runtime, kernel and image builders."""
    return cache_dir() / "debs"


def vms_dir() -> Path:
    return state_dir() / "vms"
