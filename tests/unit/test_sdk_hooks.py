"""The SDK's sans-IO parts: the session over the jsonrpc core, result parsing, and the hook protocols."""

from __future__ import annotations

import json

import pytest

from matchlock import (
    MatchlockError,
    NetworkBodyTransform,
    NetworkHookRequestMutation,
    NetworkHookResponseMutation,
    NetworkHookResult,
    VFSHookEvent,
)
from matchlock.jsonrpc import Broadcast, Failed, Resolved, Routed
from matchlock.sdk import calls, session
from matchlock.sdk.hooks import network_result_to_wire, parse_file_event, resolve_network_call


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_session_routes_results_notifications_and_events_across_chunk_boundaries():
    s: session.Session[str] = session.Session()
    call_id, request = s.start("exec_stream", {"command": "x"}, "ctx")
    assert json.loads(request) == {"jsonrpc": "2.0", "method": "exec_stream", "id": 1, "params": {"command": "x"}}
    data = (
        line({"jsonrpc": "2.0", "method": "exec_stream.stdout", "params": {"id": call_id, "data": "aGk="}})
        + line({"jsonrpc": "2.0", "method": "event", "params": {"type": "file"}})
        + line({"jsonrpc": "2.0", "result": {"exit_code": 0}, "id": call_id})
    )
    events = s.feed(data[:7]) + s.feed(data[7:])
    assert [type(e) for e in events] == [Routed, Broadcast, Resolved]
    assert events[2].context == "ctx" and events[2].result == {"exit_code": 0}


@pytest.mark.parametrize(
    "junk",
    [
        b"garbage\n",
        b"42\n",
        b"[1]\n",
        b'{"id": 5, "result": {}}\n',
        b'{"method": "exec_stream.stdout", "params": {"id": 9}}\n',
        b"\n",
    ],
)
def test_session_drops_junk(junk):
    s: session.Session[str] = session.Session()
    s.start("exec", None, "ctx")
    assert s.feed(junk) == []


def test_a_malformed_answer_fails_only_its_call():
    s: session.Session[str] = session.Session()
    first, _ = s.start("exec", None, "a")
    s.start("exec", None, "b")
    [event] = s.feed(line({"jsonrpc": "2.0", "error": {"code": "bad"}, "id": first}))
    assert isinstance(event, session.Malformed) and event.context == "a"
    assert [context for _, context in s.eof()] == ["b"]


def test_an_overlong_answer_fails_its_call(monkeypatch):
    monkeypatch.setattr(session, "MAX_RESPONSE_LINE", 64)
    s: session.Session[str] = session.Session()
    call_id, _ = s.start("read_file", {"path": "/x"}, "ctx")
    [event] = s.feed(b'{"jsonrpc": "2.0", "id": %d, "result": {"content": "%s"}}\n' % (call_id, b"A" * 100))
    assert isinstance(event, session.Malformed) and "longer than 64 bytes" in event.reason


def test_late_notifications_reach_recent_calls_only(monkeypatch):
    monkeypatch.setattr(session, "LINGER_CALLS", 2)
    s: session.Session[int] = session.Session()
    ids = [s.start("exec_stream", None, n)[0] for n in range(3)]
    for call_id in ids:
        s.feed(line({"jsonrpc": "2.0", "error": {"code": -32001, "message": "x"}, "id": call_id}))

    def late(call_id):
        return s.feed(line({"jsonrpc": "2.0", "method": "exec_stream.stdout", "params": {"id": call_id, "data": ""}}))

    assert late(ids[0]) == []
    assert [e.context for e in late(ids[2])] == [2]


def test_cancel_after_abandon_drops_the_answer():
    s: session.Session[str] = session.Session()
    call_id, _ = s.start("exec", None, "ctx")
    cancel = json.loads(s.abandon(call_id))
    assert cancel["method"] == "cancel" and cancel["params"] == {"id": call_id} and cancel["id"] == call_id + 1
    assert s.feed(line({"jsonrpc": "2.0", "result": {}, "id": call_id})) == []


def test_failed_outcome_carries_code_and_message():
    s: session.Session[str] = session.Session()
    call_id, _ = s.start("exec", None, "ctx")
    [event] = s.feed(line({"jsonrpc": "2.0", "error": {"code": -32000, "message": "VM not created"}, "id": call_id}))
    assert isinstance(event, Failed) and (event.code, event.message) == (-32000, "VM not created")


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"stdout": "", "stderr": "", "duration_ms": 1}, "exit_code must be an integer"),
        ({"exit_code": 0, "stdout": "***", "stderr": "", "duration_ms": 1}, "stdout is not base64"),
        (None, "expected an object"),
    ],
)
def test_malformed_exec_results_name_the_field(result, message):
    with pytest.raises(MatchlockError, match=message):
        calls.parse_exec(result)


def test_list_files_rejects_null_and_accepts_absent():
    assert calls.parse_list_files({}) == []
    with pytest.raises(MatchlockError, match="files must be a list"):
        calls.parse_list_files({"files": None})


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([], "expected object"),
        ({"bindings": None}, "bindings must be a list"),
        ({"bindings": [{"address": "", "local_port": 1, "remote_port": 1}]}, "address is required"),
        ({"bindings": [{"address": "a", "local_port": 0, "remote_port": 1}]}, "local_port must be in range"),
        ({"bindings": [{"address": "a", "local_port": 1, "remote_port": 70000}]}, "remote_port must be in range"),
    ],
)
def test_port_forward_results_are_checked(result, message):
    with pytest.raises(MatchlockError, match=message):
        calls.parse_bindings(result)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("", "empty spec"), ("a:b", "invalid port value 'a'"), ("0", "must be in range"), ("1:2:3", "expected")],
)
def test_port_forward_specs_are_validated(spec, message):
    with pytest.raises(MatchlockError, match=message):
        calls.parse_forward_spec(spec)


def test_file_events_tolerate_nulls_and_ignore_empty_ops():
    params = {"file": {"op": "WRITE", "path": "/w/a", "size": None, "mode": "420", "uid": 1000}}
    assert parse_file_event(params) == VFSHookEvent("write", "/w/a", 0, 420, 1000, 0)
    assert parse_file_event({"file": {"op": "", "path": "/x"}}) is None
    assert parse_file_event({"network": {}}) is None
    assert parse_file_event(["not", "a", "dict"]) is None


def test_network_hook_requests_are_parsed_leniently():
    callbacks = {"network_hook_2": ("", lambda request: None)}
    hook, request = resolve_network_call(
        b'{"callback_id": " network_hook_2 ", "phase": "AFTER", "request_headers": {"A": "1", "B": ["2", 3]}}',
        callbacks,
    )
    assert request.phase == "after" and request.request_headers == {"A": ["1"], "B": ["2", "3"]}
    assert request.query is None and request.status_code == 0
    assert resolve_network_call(b"{nope", callbacks)["error"].startswith("invalid network hook request")
    assert resolve_network_call(b"[1]", callbacks) == {"error": "network hook callback request must be an object"}


def test_network_hook_results_to_wire():
    result = NetworkHookResult(
        action="mutate",
        request=NetworkHookRequestMutation(headers={"X": ["1"]}, query={}, path="/p"),
        response=NetworkHookResponseMutation(body_replacements=[NetworkBodyTransform("a")], set_body="é"),
    )
    assert network_result_to_wire(result) == {
        "action": "mutate",
        "request": {"headers": {"X": ["1"]}, "query": {}, "path": "/p"},
        "response": {"body_replacements": [{"find": "a"}], "set_body_base64": "w6k="},
    }
    assert network_result_to_wire(None) == {}
    assert network_result_to_wire(NetworkHookResult(request=NetworkHookRequestMutation())) == {"action": "allow"}
    with pytest.raises(MatchlockError, match="expected NetworkHookResult or None, got dict"):
        network_result_to_wire({"action": "block"})
