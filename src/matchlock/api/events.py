"""Events a sandbox reports (network requests, file operations), in the wire format."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NetworkEvent:
    method: str = ""
    url: str = ""
    host: str = ""
    status_code: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    duration_ms: int = 0
    blocked: bool = False
    block_reason: str = ""
    timestamp: int = field(default_factory=lambda: int(time.time()))  # seconds, as matchlock sends

    def to_json(self) -> dict:
        body = {
            "method": self.method,
            "url": self.url,
            "host": self.host,
            "status_code": self.status_code,
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "duration_ms": self.duration_ms,
            "blocked": self.blocked,
        }
        if self.block_reason:
            body["block_reason"] = self.block_reason
        return {"type": "network", "timestamp": self.timestamp, "network": body}

    def log_line(self) -> str:
        verdict = f"blocked ({self.block_reason})" if self.blocked else str(self.status_code)
        target = self.url or self.host
        return f"[matchlock] network: {self.method or 'CONNECT'} {target} -> {verdict}"


@dataclass(frozen=True)
class FileEvent:
    """One intercepted VFS operation, as the SDK's after-hooks read it (`params.file`)."""

    op: str
    path: str  # the guest's absolute path
    size: int = 0  # bytes read or written; the file size otherwise
    mode: int = 0
    uid: int = 0
    gid: int = 0
    timestamp: int = field(default_factory=lambda: time.time_ns() // 1_000_000)  # ms

    def to_json(self) -> dict:
        return {
            "type": "file",
            "timestamp": self.timestamp,
            "file": {"op": self.op, "path": self.path, "size": self.size, "mode": self.mode, "uid": self.uid,
                     "gid": self.gid},
        }  # fmt: skip


Event = NetworkEvent | FileEvent
