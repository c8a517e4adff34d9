"""JSON-RPC 2.0 message types and error codes (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Standard JSON-RPC 2.0 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# matchlock server codes (upstream handler.go).
VM_FAILED = -32000
EXEC_FAILED = -32001
FILE_FAILED = -32002
CANCELLED = -32003

# Ids are ints on the matchlock wire; strings are accepted too (JSON-RPC 2.0 allows them).
RequestId = int | str
JSONObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Request:
    """A request (``id`` set) or a notification (``id is None``). ``params`` is always an object."""

    method: str
    params: JSONObject = field(default_factory=dict)
    id: RequestId | None = None

    @property
    def is_notification(self) -> bool:
        return self.id is None

    @property
    def target_id(self) -> RequestId | None:
        """``params.id`` when it is a valid id: the request a scoped notification or input message belongs to."""
        value = self.params.get("id")
        return value if _is_id(value) else None

    def to_json(self) -> JSONObject:
        out: JSONObject = {"jsonrpc": "2.0", "method": self.method}
        if self.id is not None:
            out["id"] = self.id
        if self.params:  # the Python SDK omits empty params; so do we
            out["params"] = self.params
        return out


@dataclass(frozen=True, slots=True)
class Response:
    """A successful response. ``result`` is an object on the matchlock wire."""

    id: RequestId
    result: Any

    def to_json(self) -> JSONObject:
        return {"jsonrpc": "2.0", "result": self.result, "id": self.id}


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """An error response; ``code`` and ``message`` are always emitted (the SDK reader needs both).

    ``id`` is None when the request's id could not be read; it is then sent as ``"id": null``.
    """

    id: RequestId | None
    code: int
    message: str
    data: Any = None

    def to_json(self) -> JSONObject:
        error: JSONObject = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return {"jsonrpc": "2.0", "error": error, "id": self.id}


Message = Request | Response | ErrorResponse


@dataclass(frozen=True, slots=True)
class Invalid:
    """A line that is not a valid message. ``id`` is set when one could be read, so the peer can be answered."""

    code: int
    message: str
    id: RequestId | None = None

    def to_error(self) -> ErrorResponse:
        return ErrorResponse(self.id, self.code, self.message)


def _is_id(value: object) -> bool:
    # bool is an int subclass; true/false are not ids.
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def is_request_id(value: object) -> bool:
    """True for a value usable as a request id (int or str, not bool)."""
    return _is_id(value)
