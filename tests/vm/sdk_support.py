"""Shared by the SDK VM tests (test_sdk.py, test_sdk_async.py, test_sdk_compat.py)."""

from __future__ import annotations

import sys
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")
IMAGE = "matchlock/busybox:builtin"
