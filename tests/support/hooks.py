"""The SDK's side of network hooks (sdk-wire 5.1), for unit and VM tests alike.

A Unix socket server on its own threads, so it answers whether the proxy
under test runs on the test's event loop or on another one: per
connection, one JSON request line in, `answer(request)` out as one line,
then the connection is closed, as the Python SDK does. `answer` returns a
dict (sent as JSON), raw bytes (sent as they are, for malformed replies) or
None (close without replying). `Gate` holds an answer until the test
releases it, so a test can tell "the proxy gave up" from "the hook replied".
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path

Answer = Callable[[dict], "dict | bytes | None"]
MAX_REQUEST = 1 << 20


class Gate:
    """An answer that waits for `release()` (or `limit` seconds) before replying `reply`."""

    def __init__(self, reply: dict | bytes | None, limit: float = 30.0) -> None:
        self.reply, self.limit = reply, limit
        self.waiting = threading.Event()  # a request has arrived and is being held
        self.opened = threading.Event()

    def __call__(self, request: dict) -> dict | bytes | None:
        self.waiting.set()
        self.opened.wait(self.limit)
        return self.reply

    def release(self) -> None:
        self.opened.set()


def replying(reply: dict | bytes | None) -> Answer:
    return lambda request: reply


class HookServer:
    def __init__(self, path: str | Path, answer: Answer) -> None:
        self.path, self.answer = str(path), answer
        self.requests: list[dict] = []
        self.raw: list[bytes] = []
        self.answered = 0  # replies written (or connections closed without one on purpose)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(16)
        self._workers: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._serve, name="hook server", daemon=True)
        self._acceptor.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            worker = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            with self._lock:
                self._workers.append(worker)
            worker.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                line = conn.makefile("rb").readline(MAX_REQUEST)
            except OSError:
                return
            request = json.loads(line)
            with self._lock:
                self.raw.append(line)
                self.requests.append(request)
            reply = self.answer(request)
            try:
                if reply is not None:
                    conn.sendall(reply if isinstance(reply, bytes) else json.dumps(reply).encode() + b"\n")
            except OSError:
                pass  # the proxy gave up on us (deadline): that is its right
            with self._lock:
                self.answered += 1

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._acceptor.join(5)
        for worker in list(self._workers):
            worker.join(5)

    def __enter__(self) -> HookServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
