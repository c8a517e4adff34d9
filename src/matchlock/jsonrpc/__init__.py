"""Sans-IO JSON-RPC 2.0 over newline-delimited JSON: the one core of the rpc server and both SDK clients.

Stdlib only, no I/O: callers own the pipes, threads and event loops.

Messages (``messages``)
    ``Request(method, params={}, id=None)``: a request, or a notification when ``id is None``.
    ``params`` is always a dict; ``.target_id`` is ``params.id`` (scoped notifications, stdin messages).
    ``Response(id, result)``; ``ErrorResponse(id, code, message, data=None)`` always carries code and message;
    ``id=None`` is sent as ``"id": null``. ``Message`` is the union of the three.
    ``Invalid(code, message, id=None)``: what a bad line parsed to; ``.to_error()`` is the reply.
    Codes: ``PARSE_ERROR`` -32700, ``INVALID_REQUEST`` -32600, ``METHOD_NOT_FOUND`` -32601,
    ``INVALID_PARAMS`` -32602, ``INTERNAL_ERROR`` -32603, ``VM_FAILED`` -32000, ``EXEC_FAILED`` -32001,
    ``FILE_FAILED`` -32002, ``CANCELLED`` -32003.

Codec (``codec``)
    ``encode(message) -> bytes``: one ASCII-escaped JSON line ending in ``\\n`` (empty request params omitted).
    ``dump_line(obj) -> bytes``: the same for any JSON value.
    ``parse_line(line) -> Message | Invalid | None``: never raises; None for a blank line. A non-object,
    a bad id (not int/str), a non-string method or non-object params give ``Invalid`` (with the id if
    readable). ``parse_object(obj)`` does the same for an already-decoded value.

Framing (``framing``)
    ``LineSplitter(max_line=MAX_LINE_BYTES)``: ``feed(bytes) -> list[bytes | OverlongLine]``,
    ``feed_eof()`` flushes a final unterminated line. A line over the limit is reported once as
    ``OverlongLine`` (``.id`` is sniffed from its head, ``.to_error()`` is the reply) and drained.
    ``MAX_LINE_BYTES`` is 32 MiB: enough for the SDK's single-line ``write_file`` of a 24 MiB file.

Client (``client``)
    ``CallTracker[T]()`` (thread-safe; ids count from 1):
    ``start(method, params, context) -> (id, line)`` registers a pending call;
    ``send(method, params, with_id=True) -> line`` for fire-and-forget input (stdin, EOF, resize);
    ``abandon(id) -> (context, cancel_line)`` on a timeout; ``forget(id)``; ``fail_all() -> [(id, context)]``
    when the transport ends; ``receive_line(line)`` / ``receive(message)`` return one outcome:
    ``Resolved(id, context, result)``, ``Failed(id, context, code, message, data)`` (both end the call),
    ``Routed(id, context, method, params)`` for a notification whose ``params.id`` is pending,
    ``Broadcast(method, params)`` for unscoped notifications such as ``event``, or ``Dropped(reason)``.

Server side, a typical loop is: ``for item in splitter.feed(chunk)``: an ``OverlongLine`` is answered with
``item.to_error()``; else ``parse_line(item)``: ``Invalid`` is answered with ``.to_error()``, a ``Request``
is dispatched, and ``Response``/``ErrorResponse`` from a client are ignored.
"""

from .client import Broadcast, CallTracker, Dropped, Failed, Outcome, Resolved, Routed
from .codec import dump_line, encode, parse_line, parse_object, sniff_id
from .framing import MAX_LINE_BYTES, LineSplitter, OverlongLine
from .messages import (
    CANCELLED,
    EXEC_FAILED,
    FILE_FAILED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    VM_FAILED,
    ErrorResponse,
    Invalid,
    JSONObject,
    Message,
    Request,
    RequestId,
    Response,
    is_request_id,
)

__all__ = [
    "CANCELLED",
    "EXEC_FAILED",
    "FILE_FAILED",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_LINE_BYTES",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "VM_FAILED",
    "Broadcast",
    "CallTracker",
    "Dropped",
    "ErrorResponse",
    "Failed",
    "Invalid",
    "JSONObject",
    "LineSplitter",
    "Message",
    "Outcome",
    "OverlongLine",
    "Request",
    "RequestId",
    "Resolved",
    "Response",
    "Routed",
    "dump_line",
    "encode",
    "is_request_id",
    "parse_line",
    "parse_object",
    "sniff_id",
]
