"""Interception rules (contract 5.7): compile, match, before, after, body filters, SDK callbacks.

Callbacks go to a real Unix socket server run by the test, as the SDK's would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from matchlock.api.network import BodyReplacement, InterceptionConfig, InterceptionRule, NetworkConfig, SecretConfig
from matchlock.policy.body_filters import BufferedReplace, SetBody, SSEDataReplace
from matchlock.policy.engine import Blocked, HttpRequest, NetworkPolicy
from matchlock.policy.rules import InterceptionRules, canonical_header_key, compile_rule, path_matches

pytestmark = pytest.mark.timeout(60)


def make_rules(*specs, callback_socket: str = "") -> InterceptionRules:
    return InterceptionRules(InterceptionConfig(tuple(InterceptionRule.from_json(s) for s in specs), callback_socket))


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


class HookServer:
    """The SDK's side: a Unix socket answering each callback with `answer(payload)`."""

    def __init__(self, path, answer) -> None:
        self.path, self.answer = str(path), answer
        self.payloads: list[dict] = []
        self.raw: list[bytes] = []

    async def _serve(self, reader, writer) -> None:
        line = await reader.readline()
        self.raw.append(line)
        self.payloads.append(json.loads(line))
        reply = await self.answer(self.payloads[-1])
        if reply is not None:
            writer.write(reply if isinstance(reply, bytes) else json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> HookServer:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def replying(reply, delay: float = 0.0):
    async def answer(payload):
        await asyncio.sleep(delay)
        return reply

    return answer


def test_before_callback_mutates_with_the_documented_payload(tmp_path):
    async def scenario():
        reply = {"request": {"headers": {"x-from-hook": ["1", "2"]}, "query": {"q": "z z"}, "path": "/hooked"}}
        async with HookServer(tmp_path / "hook.sock", replying(reply)) as hooks:
            rules = make_rules({"callback_id": "network_hook_1", "hosts": ["api.example.com"]},
                               callback_socket=hooks.path)  # fmt: skip
            request = make_request(
                "POST",
                query="a=1&a=2&b=",
                headers=[("Host", "api.example.com"), ("x-token", "t"), ("Content-Length", "3")],
            )
            await rules.before(request)
            return hooks.payloads, request

    payloads, request = asyncio.run(scenario())
    assert payloads == [{"callback_id": "network_hook_1", "phase": "before", "host": "api.example.com",
                         "method": "POST", "path": "/v1/items", "query": {"a": "1", "b": ""},
                         "request_headers": {"X-Token": ["t"], "Content-Length": ["3"]}, "status_code": 0,
                         "response_headers": {}, "is_sse": False}]  # fmt: skip
    # Full replacement of the headers, but Host and body framing stay.
    assert request.headers == [("Host", "api.example.com"), ("Content-Length", "3"),
                               ("X-From-Hook", "1"), ("X-From-Hook", "2")]  # fmt: skip
    assert (request.query, request.path) == ("q=z+z", "/hooked")


def test_callback_block_refuses(tmp_path):
    async def scenario():
        async with HookServer(tmp_path / "hook.sock", replying({"action": "block"})) as hooks:
            rules = make_rules({"callback_id": "network_hook_1"}, {"phase": "after", "callback_id": "network_hook_2"},
                               callback_socket=hooks.path)  # fmt: skip
            with pytest.raises(Blocked):
                await rules.before(make_request())
            with pytest.raises(Blocked):
                await rules.after(make_request(), 200, [])

    asyncio.run(scenario())


def test_after_callback_replaces_headers_and_body(tmp_path):
    reply = {"response": {"headers": {"x-new": ["1"]}, "set_body_base64": base64.b64encode(b"from hook: fox").decode(),
                          "body_replacements": [{"find": "hook", "replace": "sdk"}]}}  # fmt: skip

    async def scenario():
        async with HookServer(tmp_path / "hook.sock", replying(reply)) as hooks:
            rules = make_rules({"phase": "after", "body_replacements": [{"find": "fox", "replace": "cat"}]},
                               {"phase": "after", "callback_id": "network_hook_2", "methods": ["GET"]},
                               callback_socket=hooks.path)  # fmt: skip
            result = await rules.after(make_request(), 201, [("content-type", "text/event-stream"),
                                                             ("transfer-encoding", "chunked")])  # fmt: skip
            return hooks.payloads, result

    payloads, (headers, body_filter) = asyncio.run(scenario())
    assert payloads[0]["phase"] == "after" and payloads[0]["status_code"] == 201 and payloads[0]["is_sse"] is True
    assert payloads[0]["response_headers"] == {"Content-Type": ["text/event-stream"], "Transfer-Encoding": ["chunked"]}
    assert headers == [("X-New", "1"), ("transfer-encoding", "chunked")]
    assert run_filter(body_filter, [b"upstream body is dropped"]) == b"from sdk: cat"


@pytest.mark.parametrize(
    "answer",
    [
        replying({"action": "block"}, delay=3),  # past the deadline
        replying(b"this is not json\n"),
        replying({"error": "network hook callback not found", "action": "block"}),
        replying({"request": {"headers": {"x": "not a list"}}, "action": "block"}),
        replying(None),  # closes without a reply
    ],
    ids=["timeout", "malformed", "error", "wrong-types", "no-reply"],
)
def test_callback_failures_fail_open(tmp_path, answer):
    async def scenario():
        async with HookServer(tmp_path / "hook.sock", answer) as hooks:
            rules = make_rules({"callback_id": "network_hook_1", "timeout_ms": 300}, callback_socket=hooks.path)
            request = make_request(query="a=1")
            started = time.monotonic()
            await rules.before(request)
            return request, time.monotonic() - started, hooks.payloads

    request, elapsed, payloads = asyncio.run(scenario())
    assert len(payloads) == 1  # the callback was really asked
    assert (request.query, request.path, request.headers) == ("a=1", "/v1/items", make_request().headers)
    assert elapsed < 2


def test_missing_callback_socket_fails_open(tmp_path):
    rules = make_rules({"callback_id": "network_hook_1"}, callback_socket=str(tmp_path / "absent.sock"))
    asyncio.run(rules.before(make_request()))


def test_slow_callback_does_not_block_the_event_loop(tmp_path):
    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with HookServer(tmp_path / "hook.sock", replying({}, delay=0.4)) as hooks:
            rules = make_rules({"callback_id": "network_hook_1"}, callback_socket=hooks.path)
            task = asyncio.ensure_future(ticker())
            await rules.before(make_request())
            task.cancel()
        return ticks

    assert asyncio.run(scenario()) >= 10


def test_callbacks_never_see_secret_values(tmp_path):
    secret = SecretConfig("sk-live-0123456789", ("api.example.com",), "SANDBOX_SECRET_" + "a" * 32)

    async def scenario():
        async with HookServer(tmp_path / "hook.sock", replying({})) as hooks:
            policy = NetworkPolicy(NetworkConfig(secrets={"KEY": secret}))
            policy.rules = make_rules(
                {"callback_id": "network_hook_1"},
                {"phase": "after", "callback_id": "network_hook_2"},
                callback_socket=hooks.path,
            )
            request = make_request(query=f"key={secret.placeholder}", headers=[
                ("Host", "api.example.com"), ("Authorization", f"Bearer {secret.placeholder}")])  # fmt: skip
            await policy.prepare_request(request)
            await policy.prepare_response(request, 200, [("x-echo", "fine")])
            return request, hooks.raw

    request, raw = asyncio.run(scenario())
    assert ("Authorization", f"Bearer {secret.value}") in request.headers  # what goes upstream
    assert request.query == f"key={secret.value}"
    assert len(raw) == 2
    for line in raw:
        assert secret.value.encode() not in line
        assert secret.placeholder.encode() in line
