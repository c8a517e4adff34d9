"""Interception rules (contract 5.7): compile, match, before, after, body filters, SDK callbacks.

Callbacks go to a real Unix socket server run by the test, as the SDK's would
(`support.hooks`), or to an in-memory transport where only the engine is under test.
"""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from matchlock.api.errors import UsageError
from matchlock.api.network import BodyReplacement, InterceptionConfig, InterceptionRule, NetworkConfig, SecretConfig
from matchlock.net.callbacks import UnixCallbackClient
from matchlock.policy.body_filters import BufferedReplace, SetBody, SSEDataReplace
from matchlock.policy.engine import Blocked, HttpRequest, NetworkPolicy
from matchlock.policy.rules import InterceptionRules, canonical_header_key, compile_rule, path_matches
from support.hooks import Gate, HookServer, replying

pytestmark = pytest.mark.timeout(60)


def make_rules(*specs, callback_socket: str = "", callbacks=None) -> InterceptionRules:
    config = InterceptionConfig(tuple(InterceptionRule.from_json(s) for s in specs), callback_socket)
    if callback_socket:
        callbacks = UnixCallbackClient(callback_socket)
    return InterceptionRules(config, callbacks=callbacks)


def make_request(method="GET", host="api.example.com", path="/v1/items", query="", headers=None) -> HttpRequest:
    headers = headers if headers is not None else [("Host", host), ("Accept", "*/*")]
    return HttpRequest(method=method, scheme="https", host=host, port=443, path=path, query=query, headers=headers)


def run_filter(body_filter, chunks) -> bytes:
    return b"".join(body_filter.feed(c) for c in chunks) + body_filter.finish()


# --- compile and match ------------------------------------------------------------------


def test_compile_keeps_only_effective_rules_with_defaults():
    assert compile_rule(InterceptionRule.from_json({})) is None
    assert compile_rule(InterceptionRule.from_json({"action": "allow", "hosts": ["a.com"]})) is None
    # A before-only mutation on an after rule does nothing in its phase.
    assert compile_rule(InterceptionRule.from_json({"phase": "after", "set_headers": {"x": "1"}})) is None
    assert compile_rule(InterceptionRule.from_json({"phase": "after", "body_replacements": [{"find": ""}]})) is None

    mutate = compile_rule(InterceptionRule.from_json({"set_headers": {"x-api-KEY": "1"}, "methods": ["post"]}))
    assert (mutate.phase, mutate.action) == ("before", "mutate")
    assert mutate.set_headers == (("X-Api-Key", "1"),)
    assert mutate.methods == {"POST"}
    block = compile_rule(InterceptionRule.from_json({"phase": "after", "action": "block"}))
    assert (block.phase, block.action) == ("after", "block")
    hook = compile_rule(InterceptionRule.from_json({"callback_id": "network_hook_1", "timeout_ms": 250}))
    assert (hook.action, hook.timeout) == ("allow", 0.25)
    assert compile_rule(InterceptionRule.from_json({"callback_id": "network_hook_2"})).timeout == 5.0


def test_rule_phase_and_action_are_checked_once_at_construction():
    with pytest.raises(UsageError, match="phase 'sideways'"):
        InterceptionRule(phase="sideways")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="action 'drop'"):
        InterceptionRule.from_json({"action": "drop"})
    assert InterceptionRule.from_json({}).phase == "before"


def test_canonical_header_keys_follow_go():
    assert canonical_header_key("x-api-KEY") == "X-Api-Key"
    assert canonical_header_key("content-type") == "Content-Type"
    assert canonical_header_key("WWW-AUTHENTICATE") == "Www-Authenticate"
    assert canonical_header_key("bad header") == "bad header"  # not a token: left alone


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("/v1/*", "/v1/items", True),
        ("/v1/*", "/v1/items/3", False),  # `*` never crosses `/`
        ("/v1/*/detail", "/v1/7/detail", True),
        ("/v?/items", "/v2/items", True),
        ("/v?/items", "/v/items", False),
        ("/[a-c]x", "/bx", True),
        ("/[^a-c]x", "/dx", True),
        ("/[^a-c]x", "/ax", False),
        ("/\\*", "/*", True),
        ("/\\*", "/a", False),
        ("/[", "/[", False),  # malformed patterns never match
        ("/a\\", "/a", False),
        ("/exact", "/exact", True),
    ],
)
def test_path_glob_has_path_match_semantics(pattern, path, expected):
    assert path_matches(pattern, path) is expected


def test_match_on_hosts_methods_and_decoded_path():
    rule = compile_rule(InterceptionRule.from_json({"hosts": ["*.example.com"], "methods": ["post"],
                                                    "path": "/v1/a b", "action": "block"}))  # fmt: skip
    assert rule.matches(make_request("POST", path="/v1/a%20b"))
    assert not rule.matches(make_request("GET", path="/v1/a%20b"))
    assert not rule.matches(make_request("POST", host="example.com", path="/v1/a%20b"))
    assert compile_rule(InterceptionRule.from_json({"action": "block"})).matches(make_request(path=""))


# --- before -----------------------------------------------------------------------------


def test_before_rules_mutate_headers_query_and_path_in_order():
    rules = make_rules(
        {"set_headers": {"accept": "application/json", "x-added": "1", "host": "evil.test"},
         "delete_headers": ["X-Drop", "content-length"]},
        {"set_query": {"b": "x y", "a": "2"}, "delete_query": ["gone"], "rewrite_path": "/v2/new path"},
        {"hosts": ["other.test"], "set_headers": {"x-never": "1"}},
    )  # fmt: skip
    headers = [("Host", "api.example.com"), ("accept", "*/*"), ("x-drop", "1"), ("Content-Length", "0")]
    request = make_request(query="a=1&gone=1&a=3&keep=", headers=headers)
    asyncio.run(rules.before(request))
    assert request.headers == [("Host", "api.example.com"), ("Content-Length", "0"),
                               ("Accept", "application/json"), ("X-Added", "1")]  # fmt: skip
    assert request.query == "a=2&keep=&b=x+y"
    assert request.path == "/v2/new%20path"


def test_before_block_refuses_and_stops():
    rules = make_rules({"path": "/admin/*", "action": "block"}, {"set_headers": {"x-late": "1"}})
    request = make_request(path="/admin/users")
    with pytest.raises(Blocked) as refused:
        asyncio.run(rules.before(request))
    assert (refused.value.status, refused.value.reason) == (403, "request blocked by policy")
    assert ("X-Late", "1") not in request.headers
    asyncio.run(rules.before(make_request(path="/public")))


# --- after ------------------------------------------------------------------------------


def test_after_rules_rewrite_headers_and_block():
    rules = make_rules({"phase": "after", "set_response_headers": {"x-seen": "yes"},
                        "delete_response_headers": ["server", "content-length"]},
                       {"phase": "after", "path": "/secret", "action": "block"})  # fmt: skip
    headers, body_filter = asyncio.run(rules.after(make_request(), 200, [("server", "x"), ("content-length", "5")]))
    # Framing stays the transport's: a rule cannot drop Content-Length.
    assert headers == [("X-Seen", "yes"), ("content-length", "5")]
    assert body_filter is None
    with pytest.raises(Blocked) as refused:
        asyncio.run(rules.after(make_request(path="/secret"), 200, []))
    assert refused.value.status == 403


def test_after_body_replacements_choose_the_right_filter():
    rules = make_rules({"phase": "after", "body_replacements": [{"find": "fox", "replace": "cat"}]},
                       {"phase": "after", "body_replacements": [{"find": "cat", "replace": "dog"}]})  # fmt: skip
    _, plain = asyncio.run(rules.after(make_request(), 200, [("Content-Type", "text/plain")]))
    assert isinstance(plain, BufferedReplace)
    assert run_filter(plain, [b"the quick f", b"ox and the fox"]) == b"the quick dog and the dog"
    _, events = asyncio.run(rules.after(make_request(), 200, [("content-type", "text/event-stream; charset=utf-8")]))
    assert isinstance(events, SSEDataReplace)
    for method, status in (("HEAD", 200), ("GET", 204), ("GET", 304), ("GET", 101)):
        assert asyncio.run(rules.after(make_request(method), status, []))[1] is None


def test_sse_filter_rewrites_only_data_payloads_and_streams_lines():
    sse = SSEDataReplace([BodyReplacement("secret", "[x]"), BodyReplacement("data", "DATA")])
    assert sse.feed(b"event: secret\r\ndata: a secret") == b"event: secret\r\n"  # the partial line waits
    assert sse.feed(b" data\r\n\r\n") == b"data: a [x] DATA\r\n\r\n"
    assert sse.feed(b": secret comment\ndata:secret\n") == b": secret comment\ndata:[x]\n"
    assert sse.feed(b"data: lone\rcr secret") == b""
    assert sse.finish() == b"data: lone\rcr [x]"
    endings = SSEDataReplace([BodyReplacement("end\r", "!"), BodyReplacement("end\n", "!")])
    assert run_filter(endings, [b"data: end\r\n", b"data: end\n"]) == b"data: end\r\ndata: end\n"


def test_set_body_replaces_upstream_body():
    body = SetBody(b"new secret body", [BodyReplacement("secret", "public")])
    assert run_filter(body, [b"old", b"stuff"]) == b"new public body"


# --- callbacks --------------------------------------------------------------------------


class MemoryHooks:
    """A callback transport in memory: records each line, answers from `replies` in order."""

    def __init__(self, *replies: bytes) -> None:
        self.replies = list(replies)
        self.lines: list[bytes] = []

    async def round_trip(self, line: bytes) -> bytes:
        self.lines.append(line)
        return self.replies.pop(0)


async def test_callbacks_go_only_through_the_injected_transport():
    hooks = MemoryHooks(b'{"action": "mutate", "request": {"path": "/from-hook"}}\n', b"{}\n")
    rules = make_rules({"callback_id": "network_hook_1"}, {"phase": "after", "callback_id": "network_hook_2"},
                       callbacks=hooks)  # fmt: skip
    request = make_request()
    await rules.before(request)
    await rules.after(request, 204, [("Content-Type", "text/event-stream")])
    assert request.path == "/from-hook"
    before, after = (json.loads(line) for line in hooks.lines)
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in hooks.lines)  # one JSON line each
    # Empty fields are left out, as upstream's `omitempty`; the SDK defaults them.
    assert set(before) == {"callback_id", "phase", "host", "method", "path", "request_headers"}
    assert after == {"callback_id": "network_hook_2", "phase": "after", "host": "api.example.com", "method": "GET",
                     "path": "/from-hook", "request_headers": {"Accept": ["*/*"]}, "status_code": 204,
                     "response_headers": {"Content-Type": ["text/event-stream"]}, "is_sse": True}  # fmt: skip


def test_before_callback_mutates_with_the_documented_payload(tmp_path):
    reply = {"request": {"headers": {"x-from-hook": ["1", "2"]}, "query": {"q": "z z"}, "path": "/hooked"}}
    with HookServer(tmp_path / "hook.sock", replying(reply)) as hooks:
        rules = make_rules({"callback_id": "network_hook_1", "hosts": ["api.example.com"]}, callback_socket=hooks.path)
        request = make_request(
            "POST",
            query="a=1&a=2&b=",
            headers=[("Host", "api.example.com"), ("x-token", "t"), ("Content-Length", "3")],
        )
        asyncio.run(rules.before(request))
    assert hooks.requests == [{"callback_id": "network_hook_1", "phase": "before", "host": "api.example.com",
                               "method": "POST", "path": "/v1/items", "query": {"a": "1", "b": ""},
                               "request_headers": {"X-Token": ["t"], "Content-Length": ["3"]}}]  # fmt: skip
    # Full replacement of the headers, but Host and body framing stay.
    assert request.headers == [("Host", "api.example.com"), ("Content-Length", "3"),
                               ("X-From-Hook", "1"), ("X-From-Hook", "2")]  # fmt: skip
    assert (request.query, request.path) == ("q=z+z", "/hooked")


def test_callback_block_refuses(tmp_path):
    async def scenario(hooks):
        rules = make_rules({"callback_id": "network_hook_1"}, {"phase": "after", "callback_id": "network_hook_2"},
                           callback_socket=hooks.path)  # fmt: skip
        with pytest.raises(Blocked):
            await rules.before(make_request())
        with pytest.raises(Blocked):
            await rules.after(make_request(), 200, [])

    with HookServer(tmp_path / "hook.sock", replying({"action": "block"})) as hooks:
        asyncio.run(scenario(hooks))
    assert [r["phase"] for r in hooks.requests] == ["before", "after"]


def test_after_callback_replaces_headers_and_body(tmp_path):
    reply = {"response": {"headers": {"x-new": ["1"]}, "set_body_base64": base64.b64encode(b"from hook: fox").decode(),
                          "body_replacements": [{"find": "hook", "replace": "sdk"}]}}  # fmt: skip
    with HookServer(tmp_path / "hook.sock", replying(reply)) as hooks:
        rules = make_rules({"phase": "after", "body_replacements": [{"find": "fox", "replace": "cat"}]},
                           {"phase": "after", "callback_id": "network_hook_2", "methods": ["GET"]},
                           callback_socket=hooks.path)  # fmt: skip
        headers, body_filter = asyncio.run(rules.after(make_request(), 201, [("content-type", "text/event-stream"),
                                                                             ("transfer-encoding", "chunked")]))  # fmt: skip
    payload = hooks.requests[0]
    assert payload["phase"] == "after" and payload["status_code"] == 201 and payload["is_sse"] is True
    assert payload["response_headers"] == {"Content-Type": ["text/event-stream"], "Transfer-Encoding": ["chunked"]}
    assert headers == [("X-New", "1"), ("transfer-encoding", "chunked")]
    assert run_filter(body_filter, [b"upstream body is dropped"]) == b"from sdk: cat"


@pytest.mark.parametrize(
    "reply",
    [
        b"this is not json\n",
        {"error": "network hook callback not found", "action": "block"},
        {"request": {"headers": {"x": "not a list"}}, "action": "block"},
        None,  # closes without a reply
    ],
    ids=["malformed", "error", "wrong-types", "no-reply"],
)
def test_callback_failures_fail_open(tmp_path, reply):
    with HookServer(tmp_path / "hook.sock", replying(reply)) as hooks:
        rules = make_rules({"callback_id": "network_hook_1", "timeout_ms": 3000}, callback_socket=hooks.path)
        request = make_request(query="a=1")
        asyncio.run(rules.before(request))
    assert len(hooks.requests) == 1  # the callback was really asked
    assert (request.query, request.path, request.headers) == ("a=1", "/v1/items", make_request().headers)


def test_callback_past_its_deadline_fails_open_before_the_hook_answers(tmp_path):
    gate = Gate({"action": "block"})
    with HookServer(tmp_path / "hook.sock", gate) as hooks:
        rules = make_rules({"callback_id": "network_hook_1", "timeout_ms": 300}, callback_socket=hooks.path)
        request = make_request(query="a=1")
        asyncio.run(rules.before(request))
        # The engine gave up while the hook still held its (blocking) answer.
        answered_in_time = hooks.answered
        gate.release()
    assert gate.waiting.is_set() and answered_in_time == 0
    assert (request.query, request.path, request.headers) == ("a=1", "/v1/items", make_request().headers)


def test_missing_callback_socket_fails_open(tmp_path):
    rules = make_rules({"callback_id": "network_hook_1", "set_headers": {"x-rule": "1"}},
                       callback_socket=str(tmp_path / "absent.sock"))  # fmt: skip
    request = make_request(query="a=1")
    asyncio.run(rules.before(request))
    # The rule's own mutation applies; the unreachable callback changes nothing and blocks nothing.
    assert (request.query, request.path) == ("a=1", "/v1/items")
    assert request.headers == make_request().headers + [("X-Rule", "1")]


async def test_slow_callback_does_not_block_the_event_loop(tmp_path):
    gate = Gate({})
    with HookServer(tmp_path / "hook.sock", gate) as hooks:
        rules = make_rules({"callback_id": "network_hook_1"}, callback_socket=hooks.path)
        async with asyncio.TaskGroup() as group:
            pending = group.create_task(rules.before(make_request()))
            # Only a loop that is free while the callback waits can get here before the gate opens.
            await asyncio.to_thread(gate.waiting.wait, 10)
            still_waiting = not pending.done()
            gate.release()
    assert gate.waiting.is_set() and still_waiting


def test_callbacks_never_see_secret_values(tmp_path):
    secret = SecretConfig("sk-live-0123456789", ("api.example.com",), "SANDBOX_SECRET_" + "a" * 32)

    async def scenario(hooks):
        rules = make_rules({"callback_id": "network_hook_1"}, {"phase": "after", "callback_id": "network_hook_2"},
                           callback_socket=hooks.path)  # fmt: skip
        policy = NetworkPolicy(NetworkConfig(secrets={"KEY": secret}), rules=rules)
        request = make_request(query=f"key={secret.placeholder}", headers=[
            ("Host", "api.example.com"), ("Authorization", f"Bearer {secret.placeholder}")])  # fmt: skip
        await policy.prepare_request(request)
        await policy.prepare_response(request, 200, [("x-echo", "fine")])
        return request

    with HookServer(tmp_path / "hook.sock", replying({})) as hooks:
        request = asyncio.run(scenario(hooks))
    assert ("Authorization", f"Bearer {secret.value}") in request.headers  # what goes upstream
    assert request.query == f"key={secret.value}"
    assert len(hooks.raw) == 2
    for line in hooks.raw:
        assert secret.value.encode() not in line
        assert secret.placeholder.encode() in line


def test_callbacks_interoperate_with_the_sdk_hook_server():
    """The proxy's side against the SDK's own server (sdk/hooks.py): the wire of sdk-wire 5.1 end to end."""
    from matchlock.sdk.hooks import NetworkHookServer
    from matchlock.sdk.types import NetworkHookRequestMutation, NetworkHookResponseMutation, NetworkHookResult

    seen = []

    def before(request):
        seen.append(request)
        return NetworkHookResult(action="mutate", request=NetworkHookRequestMutation(query={"from": "sdk"}))

    def after(request):
        seen.append(request)
        return NetworkHookResult(response=NetworkHookResponseMutation(set_body=b"sdk body"))

    def failing(request):
        raise RuntimeError("hook bug")

    server = NetworkHookServer({"network_hook_1": ("before", before), "network_hook_2": ("after", after),
                                "network_hook_3": ("before", failing)})  # fmt: skip
    try:
        rules = make_rules({"callback_id": "network_hook_1"}, {"callback_id": "network_hook_3"},
                           {"phase": "after", "callback_id": "network_hook_2"},
                           {"callback_id": "network_hook_9"},  # unknown to the SDK: an error reply, fail open
                           callback_socket=server.socket_path)  # fmt: skip
        request = make_request(query="a=1")
        asyncio.run(rules.before(request))
        _, body_filter = asyncio.run(rules.after(request, 200, [("Content-Type", "text/plain")]))
    finally:
        server.stop()
    assert request.query == "from=sdk"
    assert run_filter(body_filter, [b"upstream"]) == b"sdk body"
    assert [(r.phase, r.host, r.method, r.path, r.status_code) for r in seen] == [
        ("before", "api.example.com", "GET", "/v1/items", 0), ("after", "api.example.com", "GET", "/v1/items", 200)]  # fmt: skip
    assert seen[0].query == {"a": "1"} and seen[1].query == {"from": "sdk"}
