"""Drive `matchlock rpc` as a subprocess with raw JSON lines, as the SDKs do, and check every line it writes."""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.cli import MATCHLOCK


class RpcProcess:
    """One `matchlock rpc` server. Every stdout line must be a JSON object (the SDK reader dies otherwise)."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        stderr_path: Path | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self._stderr = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
        argv = [MATCHLOCK, "rpc"]
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, **(env or {})},
        )
        self.messages: queue.Queue[dict | None] = queue.Queue()
        self.bad_lines: list[bytes] = []
        self._write_lock = threading.Lock()
        self._next_id = 1000
        self._pending: dict[int, list[dict]] = {}  # id -> notifications seen for it
        self._responses: dict[int, dict] = {}
        self._others: list[dict] = []  # notifications not scoped to a pending id (events, late output)
        self._cond = threading.Condition()
        self.eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                msg = None
            if not isinstance(msg, dict) or not line.endswith(b"\n"):
                self.bad_lines.append(line)
                continue
            line.decode("ascii")  # the server promises ASCII-escaped JSON
            with self._cond:
                msg_id = msg.get("id")
                if "method" in msg:
                    target = (msg.get("params") or {}).get("id")
                    if "id" in msg:
                        self.bad_lines.append(line)  # notifications must not carry a top-level id
                    elif target in self._pending and target not in self._responses:
                        self._pending[target].append(msg)
                    else:
                        self._others.append(msg)
                elif isinstance(msg_id, int) and msg_id in self._pending:
                    self._responses[msg_id] = msg
                else:
                    self._others.append(msg)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def new_id(self) -> int:
        with self._cond:
            self._next_id += 1
            return self._next_id

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        with self._write_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def send(self, method: str, params: dict | None = None, *, msg_id: int | None = None, track: bool = True) -> int:
        """Write one request; returns its id (tracked for `wait` unless track=False)."""
        msg_id = self.new_id() if msg_id is None else msg_id
        if track:
            with self._cond:
                self._pending[msg_id] = []
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": msg_id}
        if params:
            msg["params"] = params
        self.write(json.dumps(msg).encode() + b"\n")
        return msg_id

    def notify(self, method: str, params: dict) -> None:
        self.write(json.dumps({"jsonrpc": "2.0", "method": method, "params": params}).encode() + b"\n")

    def wait(self, msg_id: int, timeout: float = 120) -> tuple[dict, list[dict]]:
        """The response to `msg_id` and the notifications that arrived for it before the response."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while msg_id not in self._responses:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof:
                    raise AssertionError(f"no response to {msg_id} (eof={self.eof}); others: {self._others[-5:]}")
                self._cond.wait(remaining)
            return self._responses.pop(msg_id), self._pending.pop(msg_id)

    def wait_scoped(self, msg_id: int, method: str, timeout: float = 60) -> dict:
        """The first `method` notification for the pending request `msg_id` (left in place for `wait`)."""
        return self._wait_notes(msg_id, lambda notes: next((n for n in notes if n["method"] == method), None), timeout)

    def wait_scoped_data(self, msg_id: int, method: str, needle: bytes, timeout: float = 60) -> bytes:
        """The data of `method` notifications for `msg_id` once it contains `needle`."""

        def found(notes: list[dict]) -> bytes | None:
            data = joined(notes, method)
            return data if needle in data else None

        return self._wait_notes(msg_id, found, timeout)

    def _wait_notes(self, msg_id: int, check, timeout: float):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                outcome = check(self._pending.get(msg_id, []))
                if outcome is not None:
                    return outcome
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof or msg_id in self._responses:
                    raise AssertionError(
                        f"no {check} for {msg_id}: {self._pending.get(msg_id)} {self._responses.get(msg_id)}"
                    )
                self._cond.wait(remaining)

    def call(self, method: str, params: dict | None = None, timeout: float = 120) -> tuple[dict, list[dict]]:
        return self.wait(self.send(method, params), timeout)

    def result(self, method: str, params: dict | None = None, timeout: float = 120) -> Any:
        response, _ = self.call(method, params, timeout)
        assert "error" not in response, response
        return response["result"]

    def error(self, method: str, params: dict | None = None, timeout: float = 120) -> dict:
        response, _ = self.call(method, params, timeout)
        assert "error" in response, response
        error = response["error"]
        assert isinstance(error["code"], int) and isinstance(error["message"], str)
        return error

    def unscoped(self) -> list[dict]:
        with self._cond:
            return list(self._others)

    def expect(self, msg_id: int) -> None:
        """Track a response for an id written by hand (`write`)."""
        with self._cond:
            self._pending[msg_id] = []

    def answered(self, msg_id: int) -> bool:
        with self._cond:
            return msg_id in self._responses or any(m.get("id") == msg_id for m in self._others)

    def wait_unscoped(self, predicate, timeout: float = 30, after: int = 0) -> dict:
        """The first message not matched to a pending id (events, errors with a null id) from index `after`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self._others[after:]:
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof:
                    raise AssertionError(f"no matching message; others: {self._others[-5:]}")
                self._cond.wait(remaining)

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        with self._write_lock:
            self.proc.stdin.close()

    def wait_exit(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def stop(self) -> None:
        """Best-effort end for fixtures: close stdin, then kill if it lingers."""
        if self.proc.poll() is None:
            try:
                self.close_stdin()
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not isinstance(self._stderr, int):
            self._stderr.close()


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def joined(notifications: list[dict], method: str) -> bytes:
    return b"".join(unb64(n["params"]["data"]) for n in notifications if n["method"] == method)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


__all__ = ["RpcProcess", "b64", "joined", "pid_alive", "unb64"]
