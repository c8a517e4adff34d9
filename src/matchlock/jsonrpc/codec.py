"""Encoding messages to lines and parsing lines to messages (no I/O)."""

from __future__ import annotations

import json
import re
from typing import Any

from .messages import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorResponse,
    Invalid,
    Message,
    Request,
    RequestId,
    Response,
    is_request_id,
)


def encode(message: Message) -> bytes:
    """One ASCII-only JSON line ending in ``\\n``. Raises ValueError for NaN/Infinity or unencodable values."""
    return dump_line(message.to_json())


def dump_line(obj: Any) -> bytes:
    """Any JSON value as one ASCII line (used for the network-hook socket too)."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii") + b"\n"


def parse_line(line: bytes | str) -> Message | Invalid | None:
    """Parse one line. Blank lines give None; anything malformed gives :class:`Invalid` (never raises)."""
    if isinstance(line, str):
        line = line.encode("utf-8", "surrogatepass")
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        # ValueError covers bad JSON, bad UTF-8 and over-long integer literals.
        return Invalid(PARSE_ERROR, "Parse error")
    return parse_object(obj)


def parse_object(obj: Any) -> Message | Invalid:
    """Classify an already-decoded JSON value."""
    if not isinstance(obj, dict):
        return Invalid(INVALID_REQUEST, f"Invalid Request: expected a JSON object, got {_kind(obj)}")
    raw_id = obj.get("id")
    if raw_id is not None and not is_request_id(raw_id):
        return Invalid(INVALID_REQUEST, f"Invalid Request: id must be an integer or a string, got {_kind(raw_id)}")
    msg_id: RequestId | None = raw_id
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            return Invalid(INVALID_REQUEST, "Invalid Request: method must be a non-empty string", msg_id)
        params = obj.get("params")
        if params is None:
            params = {}
        elif not isinstance(params, dict):
            return Invalid(INVALID_PARAMS, f"params must be an object, got {_kind(params)}", msg_id)
        return Request(method, params, msg_id)
    if "error" in obj:
        error = obj["error"]
        if not isinstance(error, dict):
            return Invalid(INVALID_REQUEST, "Invalid Response: error must be an object", msg_id)
        code, text = error.get("code"), error.get("message")
        if not isinstance(code, int) or isinstance(code, bool) or not isinstance(text, str):
            return Invalid(
                INVALID_REQUEST, "Invalid Response: error needs an integer code and a string message", msg_id
            )
        return ErrorResponse(msg_id, code, text, error.get("data"))
    if "result" in obj:
        if msg_id is None:
            return Invalid(INVALID_REQUEST, "Invalid Response: result without an id")
        return Response(msg_id, obj["result"])
    return Invalid(INVALID_REQUEST, "Invalid Request: no method", msg_id)


# The SDKs put "id" before "params", so the head of an over-long line usually names its id.
_HEAD_ID = re.compile(rb'"id"\s*:\s*(\d{1,19})\s*[,}]')


def sniff_id(head: bytes) -> int | None:
    """Best-effort id of a line whose start is ``head``: an integer ``"id"`` that precedes any ``"params"``."""
    params_at = head.find(b'"params"')
    scope = head if params_at < 0 else head[:params_at]
    match = _HEAD_ID.search(scope)
    return int(match.group(1)) if match else None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
