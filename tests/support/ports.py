"""Loopback ports for servers the tests start, and a client for the guest echo servers behind forwards."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_round_trip(port: int, payload: bytes, timeout: float = 60) -> bytes:
    """Send, half-close, read to EOF; retried until the guest's echo server behind the forward answers (bounded)."""
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
