"""Sans-IO JSON-RPC core: messages, codec, bounded framing and the client call tracker."""

from __future__ import annotations

import json
import random

import pytest

from matchlock import jsonrpc
from matchlock.jsonrpc import (
    Broadcast,
    CallTracker,
    Dropped,
    ErrorResponse,
    Failed,
    Invalid,
    LineSplitter,
    OverlongLine,
    Request,
    Resolved,
    Response,
    Routed,
    encode,
    parse_line,
)


def test_encode_request_omits_empty_params_and_missing_id() -> None:
    assert json.loads(encode(Request("log", {}, 3))) == {"jsonrpc": "2.0", "method": "log", "id": 3}
    assert json.loads(encode(Request("event", {"type": "file"}))) == {
        "jsonrpc": "2.0",
        "method": "event",
        "params": {"type": "file"},
    }


def test_encode_is_one_ascii_line() -> None:
    line = encode(Response(1, {"text": "h\u00e9\nllo \u2603", "nested": {"a": [1, 2]}}))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")  # raises if not ASCII
    assert json.loads(line)["result"]["text"] == "h\u00e9\nllo \u2603"


def test_error_response_always_has_code_and_message() -> None:
    obj = json.loads(encode(ErrorResponse(None, jsonrpc.PARSE_ERROR, "Parse error")))
    assert obj == {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None}
    obj = json.loads(encode(ErrorResponse(7, jsonrpc.CANCELLED, "cancelled", {"why": "x"})))
    assert obj["error"] == {"code": -32003, "message": "cancelled", "data": {"why": "x"}} and obj["id"] == 7


def test_encode_rejects_nan() -> None:
    with pytest.raises(ValueError):
        encode(Response(1, {"x": float("nan")}))


def test_error_codes() -> None:
    codes = [
        jsonrpc.PARSE_ERROR,
        jsonrpc.INVALID_REQUEST,
        jsonrpc.METHOD_NOT_FOUND,
        jsonrpc.INVALID_PARAMS,
        jsonrpc.INTERNAL_ERROR,
        jsonrpc.VM_FAILED,
        jsonrpc.EXEC_FAILED,
        jsonrpc.FILE_FAILED,
        jsonrpc.CANCELLED,
    ]
    assert codes == [-32700, -32600, -32601, -32602, -32603, -32000, -32001, -32002, -32003]


def test_parse_request_and_notification() -> None:
    msg = parse_line(b'{"jsonrpc":"2.0","method":"exec","id":4,"params":{"command":"ls"}}')
    assert msg == Request("exec", {"command": "ls"}, 4)
    msg = parse_line('{"jsonrpc":"2.0","method":"exec_pipe.stdin_eof","params":{"id":4}}\r')
    assert isinstance(msg, Request) and msg.is_notification and msg.target_id == 4
    assert parse_line(b'{"method":"log","id":"abc","params":null}') == Request("log", {}, "abc")


@pytest.mark.parametrize("line", [b"", b"   ", b"\t\r"])
def test_blank_lines_are_none(line: bytes) -> None:
    assert parse_line(line) is None


@pytest.mark.parametrize(
    ("line", "code", "msg_id", "fragment"),
    [
        (b"{not json", -32700, None, "Parse error"),
        (b"\xff\xfe{}", -32700, None, "Parse error"),
        (b"[" * 100000, -32700, None, "Parse error"),
        (b"1" * 5000, -32700, None, "Parse error"),
        (b"42", -32600, None, "got number"),
        (b'[{"method":"x"}]', -32600, None, "got array"),
        (b"null", -32600, None, "got null"),
        (b'{"method":"x","id":true}', -32600, None, "id must be"),
        (b'{"method":"x","id":1.5}', -32600, None, "id must be"),
        (b'{"method":"x","id":[1]}', -32600, None, "id must be"),
        (b'{"method":7,"id":3}', -32600, 3, "method must be"),
        (b'{"method":"","id":3}', -32600, 3, "method must be"),
        (b'{"method":"exec","id":3,"params":[1]}', -32602, 3, "params must be an object"),
        (b'{"id":9}', -32600, 9, "no method"),
        (b'{"id":9,"error":"bad"}', -32600, 9, "error must be an object"),
        (b'{"id":9,"error":{"code":"x","message":"m"}}', -32600, 9, "integer code"),
        (b'{"id":9,"error":{"code":1}}', -32600, 9, "integer code"),
        (b'{"result":{}}', -32600, None, "without an id"),
    ],
)
def test_invalid_lines(line: bytes, code: int, msg_id: object, fragment: str) -> None:
    result = parse_line(line)
    assert isinstance(result, Invalid)
    assert (result.code, result.id) == (code, msg_id)
    assert fragment in result.message
    error = result.to_error()
    assert (error.code, error.id) == (code, msg_id)


def test_parse_responses() -> None:
    assert parse_line(b'{"jsonrpc":"2.0","result":{"id":"vm-1"},"id":1}') == Response(1, {"id": "vm-1"})
    assert parse_line(b'{"error":{"code":-32000,"message":"VM not created"},"id":2}') == ErrorResponse(
        2, -32000, "VM not created"
    )
    assert parse_line(b'{"error":{"code":-32700,"message":"Parse error"}}') == ErrorResponse(
        None, -32700, "Parse error"
    )


def test_roundtrip() -> None:
    messages: list[jsonrpc.Message] = [
        Request("create", {"image": "alpine:latest", "n": [1, None, True]}, 1),
        Request("event", {"type": "network"}),
        Response("x", {}),
        ErrorResponse(5, -32602, "bad \u00e9"),
    ]
    for msg in messages:
        assert parse_line(encode(msg)) == msg


def test_target_id_ignores_non_ids() -> None:
    assert Request("x", {"id": True}).target_id is None
    assert Request("x", {"id": 1.0}).target_id is None
    assert Request("x", {}).target_id is None


# -- framing ------------------------------------------------------------------------------------------


def test_splitter_joins_chunks_and_splits_lines() -> None:
    splitter = LineSplitter(64)
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b":1}\n{}\n{") == [b'{"a":1}', b"{}"]
    assert splitter.feed(b"}") == []
    assert splitter.feed_eof() == [b"{}"]
    assert splitter.feed_eof() == []


def test_splitter_line_exactly_at_limit_passes() -> None:
    splitter = LineSplitter(8)
    assert splitter.feed(b"12345678\n") == [b"12345678"]
    assert splitter.feed(b"1234") == []
    assert splitter.feed(b"5678\n") == [b"12345678"]


def test_splitter_overlong_reported_once_and_drained() -> None:
    splitter = LineSplitter(16)
    out = splitter.feed(b'{"method":"write_file","id":12,')
    assert len(out) == 1 and isinstance(out[0], OverlongLine)
    assert out[0].id == 12 and out[0].limit == 16
    # The rest of the line, in several chunks, is dropped without another report.
    assert splitter.feed(b"x" * 1000) == []
    assert splitter.feed(b"y" * 1000 + b'\n{"ok":1}\n') == [b'{"ok":1}']
    error = out[0].to_error()
    assert error.id == 12 and error.code == jsonrpc.INVALID_REQUEST and "16-byte limit" in error.message


def test_splitter_overlong_detected_at_newline() -> None:
    splitter = LineSplitter(4)
    out = splitter.feed(b"abc")
    assert out == []
    out = splitter.feed(b"defg\nok\n")
    assert isinstance(out[0], OverlongLine) and out[0].head == b"abcdefg" and out[0].id is None
    assert out[1:] == [b"ok"]


def test_splitter_overlong_unterminated_at_eof_is_not_a_line() -> None:
    splitter = LineSplitter(4)
    assert len(splitter.feed(b"abcdefgh")) == 1
    assert splitter.feed_eof() == []


def test_splitter_buffer_stays_bounded() -> None:
    splitter = LineSplitter(1024)
    for _ in range(200):
        splitter.feed(b"z" * 4096)
        assert len(splitter._buf) <= 1024


def test_splitter_rejects_bad_limit() -> None:
    with pytest.raises(ValueError, match="max_line"):
        LineSplitter(0)


def test_default_limit_carries_a_16_mib_write_file() -> None:
    import base64

    content = base64.b64encode(b"\0" * (16 * 1024 * 1024)).decode()
    line = encode(Request("write_file", {"path": "/tmp/big", "content": content, "mode": 420}, 3))
    splitter = LineSplitter()
    out = splitter.feed(line)
    assert len(out) == 1 and isinstance(out[0], bytes)
    assert len(out[0]) <= jsonrpc.MAX_LINE_BYTES


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'{"jsonrpc":"2.0","method":"write_file","id":77,"params":{"content":"AAAA', 77),
        (b'{"jsonrpc":"2.0","method":"write_file","params":{"id":5,"content":"AAAA', None),
        (b'{"id" : 3 ,"method":"x"', 3),
        (b'{"method":"x","id":"s"', None),
        (b"garbage", None),
    ],
)
def test_sniff_id(head: bytes, expected: int | None) -> None:
    assert jsonrpc.sniff_id(head) == expected


# -- client tracker -----------------------------------------------------------------------------------


def test_tracker_resolves_and_fails() -> None:
    tracker: CallTracker[str] = CallTracker()
    id1, line1 = tracker.start("create", {"image": "alpine"}, "ctx1")
    id2, line2 = tracker.start("log", None, "ctx2")
    assert (id1, id2) == (1, 2)
    assert json.loads(line1) == {"jsonrpc": "2.0", "method": "create", "id": 1, "params": {"image": "alpine"}}
    assert "params" not in json.loads(line2)
    assert tracker.pending() == [1, 2]
    assert tracker.receive_line(b'{"jsonrpc":"2.0","result":{"id":"vm-1"},"id":1}') == Resolved(
        1, "ctx1", {"id": "vm-1"}
    )
    assert tracker.receive_line(b'{"error":{"code":-32002,"message":"no such file"},"id":2}') == Failed(
        2, "ctx2", -32002, "no such file"
    )
    assert tracker.pending() == []
    assert isinstance(tracker.receive_line(b'{"result":{},"id":1}'), Dropped)


def test_tracker_routes_notifications() -> None:
    tracker: CallTracker[str] = CallTracker()
    call_id, _ = tracker.start("exec_stream", {"command": "ls"}, "stream")
    out = tracker.receive_line(encode(Request("exec_stream.stdout", {"id": call_id, "data": "aGk="})))
    assert out == Routed(call_id, "stream", "exec_stream.stdout", {"id": call_id, "data": "aGk="})
    assert isinstance(tracker.receive_line(encode(Request("event", {"type": "file"}))), Broadcast)
    assert isinstance(tracker.receive_line(encode(Request("exec_stream.stdout", {"id": 99}))), Dropped)
    # A "notification" carrying a top-level id is not a response and is not routed.
    assert isinstance(tracker.receive_line(encode(Request("exec_stream.stdout", {"id": call_id}, 5))), Dropped)
    tracker.receive_line(encode(Response(call_id, {"exit_code": 0})))
    assert isinstance(tracker.receive_line(encode(Request("exec_stream.stdout", {"id": call_id}))), Dropped)


def test_tracker_fire_and_forget_and_abandon() -> None:
    tracker: CallTracker[str] = CallTracker()
    call_id, _ = tracker.start("exec_pipe", {"command": "cat"}, "pipe")
    stdin = json.loads(tracker.send("exec_pipe.stdin", {"id": call_id, "data": ""}))
    assert stdin["id"] == 2 and stdin["params"]["id"] == call_id
    eof = json.loads(tracker.send("exec_pipe.stdin_eof", {"id": call_id}, with_id=False))
    assert "id" not in eof
    context, cancel = tracker.abandon(call_id)
    assert context == "pipe"
    assert json.loads(cancel) == {"jsonrpc": "2.0", "method": "cancel", "id": 3, "params": {"id": call_id}}
    assert tracker.pending() == []
    assert tracker.abandon(call_id)[0] is None


def test_tracker_fail_all() -> None:
    tracker: CallTracker[int] = CallTracker(first_id=10)
    tracker.start("a", None, 1)
    tracker.start("b", None, 2)
    assert tracker.fail_all() == [(10, 1), (11, 2)]
    assert tracker.pending() == []


def test_tracker_drops_garbage() -> None:
    tracker: CallTracker[None] = CallTracker()
    for line in [b"", b"nonsense", b"[1,2]", b'{"result":1,"id":"str"}']:
        assert isinstance(tracker.receive_line(line), Dropped)


# -- fuzz-ish -----------------------------------------------------------------------------------------

_FRAGMENTS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b'"id":',
    b'"method":"exec"',
    b'"params":',
    b"null",
    b"1",
    b"-1e999",
    b'"\\ud800"',
    b",",
    b":",
    b"\n",
    b"\xff",
    b"\x00",
    b'"error":{"code":1,"message":"m"}',
    b'"result":{}',
    b"true",
]


def test_random_bytes_never_raise() -> None:
    rng = random.Random(20261201)
    splitter = LineSplitter(256)
    tracker: CallTracker[int] = CallTracker()
    for _ in range(300):
        tracker.start("x", None, 0)
    for _ in range(3000):
        if rng.random() < 0.5:
            chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            chunk = b"".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(12)))
        for item in splitter.feed(chunk):
            if isinstance(item, OverlongLine):
                assert item.to_error().code == jsonrpc.INVALID_REQUEST
                continue
            assert len(item) <= 256
            parsed = parse_line(item)
            if isinstance(parsed, Invalid):
                assert isinstance(json.loads(encode(parsed.to_error()))["error"]["message"], str)
            tracker.receive_line(item)
    splitter.feed_eof()


def test_random_objects_classify() -> None:
    rng = random.Random(7)
    values: list[object] = [None, True, 0, -1, 2**70, 1.5, "s", "", [], {}, [1], {"id": 1}]
    keys = ["jsonrpc", "id", "method", "params", "result", "error"]
    for _ in range(2000):
        obj = {k: rng.choice(values + ["exec"]) for k in rng.sample(keys, rng.randrange(len(keys) + 1))}
        parsed = jsonrpc.parse_object(obj)
        assert isinstance(parsed, Request | Response | ErrorResponse | Invalid)
        if not isinstance(parsed, Invalid):
            assert isinstance(json.loads(encode(parsed)), dict)
