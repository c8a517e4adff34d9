"""Network interception rules on real traffic, configured through the Python API.

One sandbox (the test client image) carries one rule per behaviour, each
scoped to its own path, plus SDK-style callback hooks served here over a
Unix socket. The guest's requests go through the proxy to the stand-in
servers, which echo what they received. The owner is this process, on an
event loop whose name lookups go to the stand-in DNS server (netfixtures.net_loop_thread).
"""

from __future__ import annotations

import base64
import secrets
import shlex

import pytest
from netfixtures import DNS_SERVER, HOSTS, body_json, json_lines

from matchlock.api.config import SandboxConfig
from matchlock.api.network import (
    BodyReplacement,
    HostMapping,
    InterceptionConfig,
    InterceptionRule,
    NetworkConfig,
    SecretConfig,
)  # fmt: skip
from matchlock.sandbox.sandbox import ExecSpec, Sandbox
from support.hooks import Gate, HookServer

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

PLACEHOLDER = "SANDBOX_SECRET_" + "5e" * 16
KEY_VALUE = "rule-key-" + secrets.token_hex(8)
R = InterceptionRule
RULES = (
    R(name="headers", hosts=("api.test",), path="/hdr", set_headers={"X-Added": "yes", "X-Key": PLACEHOLDER},
      delete_headers=("X-Remove-Me",)),
    R(name="query", path="/query", set_query={"added": "1"}, delete_query=("drop",)),
    R(name="rewrite", path="/v1/*", rewrite_path="/v2/thing"),
    R(name="block-post", path="/guarded", methods=("post",), action="block"),
    R(name="block-other-host", hosts=("other.test",), path="/nope", action="block"),
    R(name="response-headers", phase="after", path="/resp", set_response_headers={"X-After": "1"},
      delete_response_headers=("X-Upstream-Secret",)),
    R(name="body", phase="after", path="/body", body_replacements=(BodyReplacement("foo", "bar"),)),
    R(name="sse", phase="after", path="/sse", body_replacements=(BodyReplacement("foo", "bar"),)),
    R(name="after-block", phase="after", path="/status/*", action="block"),
    R(name="hook-before", path="/cb", callback_id="network_hook_1", timeout_ms=3000),
    R(name="hook-after", phase="after", path="/cb-after", callback_id="network_hook_2", timeout_ms=3000),
    R(name="hook-slow", path="/cb-slow", callback_id="network_hook_3", timeout_ms=200),
    R(name="hook-block", path="/cb-block", callback_id="network_hook_4", timeout_ms=3000),
)  # fmt: skip
HOOK_BODY = b"replaced by hook\n"


SLOW_HOOK = Gate({"action": "block"})  # held until the test has seen the proxy go on without it


def answer(request: dict) -> dict:
    """The SDK side of the callback rules above."""
    hook = request.get("callback_id")
    if hook == "network_hook_1":
        headers = {k: v for k, v in (request.get("request_headers") or {}).items() if k.lower() != "x-drop-by-hook"}
        headers["X-From-Hook"] = ["yes"]
        return {"action": "mutate", "request": {"headers": headers, "query": {"hooked": "1"}}}
    if hook == "network_hook_2":
        return {"response": {"headers": {"X-Hooked-Response": ["1"], "Content-Type": ["text/plain"]},
                             "set_body_base64": base64.b64encode(HOOK_BODY).decode()}}  # fmt: skip
    if hook == "network_hook_3":
        return {"action": "block"} if SLOW_HOOK(request) else {}  # held past the rule's 200 ms: fail open
    if hook == "network_hook_4":
        return {"action": "block"}
    return {"error": f"unknown callback {hook}"}


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    server = HookServer(tmp_path_factory.mktemp("hooks") / "hook.sock", answer)
    yield server
    SLOW_HOOK.release()
    server.close()


@pytest.fixture(scope="module")
def ruled(net_loop, client_image, module_state_dir, hooks, inet):
    """One sandbox with every rule; yields (sandbox, events)."""
    config = SandboxConfig(
        image=client_image,
        network=NetworkConfig(
            allowed_hosts=("api.test", "other.test"),
            dns_servers=(DNS_SERVER,),
            add_hosts=tuple(HostMapping(name, ip) for name, ip in HOSTS.items()),
            secrets={"RULE_KEY": SecretConfig(value=KEY_VALUE, hosts=("api.test",), placeholder=PLACEHOLDER)},
            interception=InterceptionConfig(rules=RULES, callback_socket=hooks.path),
        ),
    )
    box = net_loop.run(Sandbox.create(config))
    events: list = []
    box.event_listeners.append(events.append)
    yield box, events
    net_loop.run(box.aclose())


def client(box, net_loop, *commands: str) -> list[dict]:
    script = "mlk-net multi " + " ".join(shlex.quote(c) for c in commands)
    result = net_loop.run(box.exec(ExecSpec(script)), timeout=120)
    assert result.exit_code == 0, result
    replies = json_lines(result.stdout.decode())
    assert len(replies) == len(commands), result
    return replies


def header(reply_or_echo: dict, name: str) -> list[str]:
    return [v for k, v in reply_or_echo["headers"] if k.lower() == name.lower()]


def test_before_rules_set_and_delete_headers_with_secret(ruled, net_loop):
    box, _ = ruled
    (reply,) = client(box, net_loop, "get https://api.test/hdr -H 'X-Remove-Me: 1' -H 'X-Keep: 1'")
    echo = body_json(reply)
    assert header(echo, "x-added") == ["yes"] and header(echo, "x-keep") == ["1"], echo
    assert header(echo, "x-remove-me") == [], echo
    # Secrets are substituted after the before-rules, so a placeholder set by a rule arrives as the value.
    assert header(echo, "x-key") == [KEY_VALUE], echo


def test_before_rules_query_and_path(ruled, net_loop):
    box, _ = ruled
    query, path, untouched = client(box, net_loop, "get 'http://api.test/query?drop=1&keep=2'",
                                    "get https://api.test/v1/thing", "get https://api.test/v3/thing")  # fmt: skip
    params = sorted(body_json(query)["query"].split("&"))
    assert params == ["added=1", "keep=2"], query
    assert body_json(path)["path"] == "/v2/thing", path
    assert body_json(untouched)["path"] == "/v3/thing", untouched


def test_block_rules_by_method_host_and_phase(ruled, net_loop, inet):
    box, events = ruled
    mark = inet.mark()
    post, get, other, same_path_api, after = client(
        box, net_loop, "get -X POST -d x https://api.test/guarded", "get https://api.test/guarded",
        "get http://other.test/nope", "get http://api.test/nope", "get https://api.test/status/201",
    )  # fmt: skip
    assert post["status"] == 403 and get["status"] == 200, (post, get)
    assert other["status"] == 403 and same_path_api["status"] == 200, (other, same_path_api)
    assert after["status"] == 403, after
    served = [(e["method"], e["host"], e["path"]) for e in inet.served_since(mark, kind="http")]
    # Before-phase blocks never reach the server; an after-phase block is decided on the response.
    assert ("POST", "api.test", "/guarded") not in served and ("GET", "other.test", "/nope") not in served
    assert ("GET", "api.test", "/status/201") in served
    blocked = [e for e in events if e.blocked]
    assert any(e.url.endswith("/guarded") and e.method == "POST" for e in blocked), blocked


def test_after_rules_response_headers_and_body(ruled, net_loop):
    box, _ = ruled
    resp, body = client(box, net_loop, "get https://api.test/resp", "get http://api.test/body")
    assert header(resp, "x-after") == ["1"] and header(resp, "x-upstream-secret") == [], resp
    assert header(resp, "x-served-by") == ["stand-in"], resp
    assert body["body"] == "bar is bar, not bar\n", body
    assert header(body, "content-length") in ([str(len(body["body"]))], []), body


def test_sse_rewrites_only_data_lines(ruled, net_loop):
    box, _ = ruled
    (sse,) = client(box, net_loop, "stream https://api.test/sse")
    assert sse["status"] == 200, sse
    assert "".join(sse["lines"]) == (
        'event: greeting\ndata: hello bar\n\ndata: bar and bar\n\n: comment foo\n\nid: foo-1\ndata: {"v": "bar"}\n\n'
    ), sse
    assert header(sse, "content-length") == []
    assert sse["times"][-1] - sse["times"][0] >= 0.1, sse  # still streamed, event by event


def test_callback_hooks(ruled, net_loop, hooks):
    box, _ = ruled
    before = len(hooks.requests)
    mutated, after, slow, blocked = client(
        box, net_loop, "get 'https://api.test/cb?orig=1' -H 'X-Drop-By-Hook: 1' -H 'X-Keep: 1'",
        "get https://api.test/cb-after", "get https://api.test/cb-slow", "get https://api.test/cb-block",
    )  # fmt: skip
    echo = body_json(mutated)
    assert header(echo, "x-from-hook") == ["yes"] and header(echo, "x-drop-by-hook") == [], echo
    assert header(echo, "x-keep") == ["1"] and echo["query"] == "hooked=1", echo
    assert after["body"] == HOOK_BODY.decode() and header(after, "x-hooked-response") == ["1"], after
    # The slow hook still holds its "block" (it answers only once released): the proxy went on without it.
    assert slow["status"] == 200 and SLOW_HOOK.waiting.is_set() and not SLOW_HOOK.opened.is_set(), slow
    assert blocked["status"] == 403, blocked
    calls = {r["callback_id"]: r for r in hooks.requests[before:]}
    first = calls["network_hook_1"]
    assert (first["phase"], first["host"], first["method"], first["path"]) == ("before", "api.test", "GET", "/cb")
    assert first["query"] == {"orig": "1"}
    assert calls["network_hook_2"]["phase"] == "after" and calls["network_hook_2"]["status_code"] == 200
