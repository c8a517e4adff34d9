"""Shared by the SDK VM tests (test_sdk.py, test_sdk_async.py, test_sdk_compat.py)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")
IMAGE = "matchlock/busybox:builtin"


def echo_round_trip(port: int, payload: bytes, timeout: float = 60) -> bytes:
    """Connect through the forward until the guest's one-shot echo server answers (bounded retries)."""
    deadline = time.monotonic() + timeout
    received = b""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
        except OSError:
            received = b""
        if received == payload:
            break
        time.sleep(0.3)
    return received
