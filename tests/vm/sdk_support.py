"""Shared by the SDK VM tests (tests/vm/test_sdk*.py)."""

from __future__ import annotations

import sys
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")
IMAGE = "matchlock/busybox:builtin"
