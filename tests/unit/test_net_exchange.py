"""The HTTP policy exchange (net/exchange.py) without sockets: requests in, decisions and events out.

`Playbook` scripts one connection's requests in the style of mitmproxy's
test playbooks: each step says what goes in and what must come out, and a
script fails on any decision or event it did not name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import pytest

from matchlock.api.events import NetworkEvent
from matchlock.api.network import InterceptionConfig, InterceptionRule, NetworkConfig, SecretConfig
from matchlock.net.exchange import (
    Refusal,
    ResponsePlan,
    admit,
    admit_response,
    misrouted,
    refusal_for,
    request_event,
    request_from_h1,
    request_from_h2,
    split_target,
)  # fmt: skip
from matchlock.net.upstream import UpstreamError
from matchlock.policy.body_filters import BufferedReplace
from matchlock.policy.engine import Blocked, HttpRequest, NetworkPolicy
from matchlock.policy.rules import InterceptionRules

PLACEHOLDER = "SANDBOX_SECRET_" + "c" * 32
SECRET = SecretConfig("sk-value-42", ("api.test",), PLACEHOLDER)


def make_policy(*rules: dict, **network) -> tuple[NetworkPolicy, list[NetworkEvent]]:
    events: list[NetworkEvent] = []
    engine = None
    if rules:
        engine = InterceptionRules(InterceptionConfig(tuple(InterceptionRule.from_json(r) for r in rules)))
    return NetworkPolicy(NetworkConfig(intercept=True, **network), events.append, rules=engine), events


def h1(target: str, *headers: tuple[str, str], method: str = "GET") -> HttpRequest:
    event = h11.Request(method=method, target=target, headers=list(headers) or [("Host", "api.test")])
    return request_from_h1(event, scheme="https", default_host="10.0.0.9", port=443)


# --- building requests -----------------------------------------------------------------------


def test_h1_request_takes_host_header_drops_hop_by_hop_and_keeps_raw_query():
    request = h1("http://ignored.example/v1/a%20b?x=1&y", ("Host", "API.test:443"), ("Keep-Alive", "300"),
                 ("Accept", "*/*"))  # fmt: skip
    assert (request.method, request.host, request.path, request.query) == ("GET", "api.test", "/v1/a%20b", "x=1&y")
    assert request.headers == [("host", "API.test:443"), ("accept", "*/*")]  # h11 lower-cases names
    assert request.url == "https://api.test/v1/a%20b?x=1&y"


def test_h1_request_without_host_falls_back_to_the_destination():
    event = h11.Request(method="GET", target="/", headers=[("Host", "")])
    assert request_from_h1(event, scheme="http", default_host="192.0.2.7", port=8080).url == "http://192.0.2.7:8080/"


def test_h2_request_prefers_authority_and_hides_pseudo_headers():
    headers = [(b":method", b"POST"), (b":path", b"/p?q=1"), (b":authority", b"api.test"), (b"host", b"other"),
               (b"x-a", b"1")]  # fmt: skip
    request, authority = request_from_h2(headers, server_name="api.test", port=443)
    assert (request.method, request.host, request.path, request.query, authority) == (
        "POST", "api.test", "/p", "q=1", b"api.test")  # fmt: skip
    assert request.headers == [("host", "other"), ("x-a", "1")]
    without, _ = request_from_h2([(b":method", b"GET"), (b":path", b"/")], server_name="sni.test", port=8443)
    assert without.url == "https://sni.test:8443/"


@pytest.mark.parametrize("target, expected", [("/a?b", ("/a", "b")), ("", ("/", "")), ("https://h", ("/", ""))])
def test_split_target(target, expected):
    assert split_target(target) == expected


# --- refusals --------------------------------------------------------------------------------


def test_connect_and_misdirected_requests_are_refused_before_the_policy():
    assert misrouted(h1("api.test:443", method="CONNECT"), None).status == 405
    assert misrouted(h1("/"), "api.test", has_path=False).status == 405  # h2 CONNECT carries no :path
    misdirected = misrouted(h1("/", ("Host", "other.test")), "api.test")
    assert misdirected == Refusal(421, "request for other.test on a TLS connection to api.test",
                                  "Blocked by policy: request for other.test on a TLS connection to api.test", True)  # fmt: skip
    assert misrouted(h1("/"), "api.test") is None and misrouted(h1("/"), None) is None


def test_refusal_bodies_and_headers_agree():
    refusal = refusal_for(UpstreamError("cannot resolve api.test: Name or service not known"))
    assert (refusal.status, refusal.blocked) == (502, False)
    assert refusal.body == b"Failed to connect: cannot resolve api.test: Name or service not known\n"
    assert dict(refusal.headers())[b"content-length"] == str(len(refusal.body)).encode()
    assert refusal_for(Blocked("nope")).body == b"Blocked by policy: nope\n"
    tls = Refusal.upstream_failed("bad cert", "TLS with api.test:443 failed: bad cert")
    assert (tls.reason, tls.body) == ("bad cert", b"Failed to connect: TLS with api.test:443 failed: bad cert\n")


async def test_admit_applies_rules_and_secrets_in_place():
    policy, _ = make_policy({"set_headers": {"x-key": PLACEHOLDER}}, secrets={"KEY": SECRET})
    request = h1(f"/v1?k={PLACEHOLDER}")
    assert await admit(policy, request, connection_host="api.test") is None
    assert request.query == "k=sk-value-42" and ("X-Key", "sk-value-42") in request.headers


async def test_admit_response_plans_a_filter_or_refuses():
    policy, _ = make_policy({"phase": "after", "path": "/text", "body_replacements": [{"find": "a", "replace": "b"}]},
                            {"phase": "after", "path": "/hidden", "action": "block"})  # fmt: skip
    plan = await admit_response(policy, h1("/text"), 200, [("Content-Type", "text/plain")])
    assert isinstance(plan, ResponsePlan) and isinstance(plan.body_filter, BufferedReplace)
    refused = await admit_response(policy, h1("/hidden"), 200, [])
    assert isinstance(refused, Refusal) and (refused.status, refused.reason) == (403, "response blocked by policy")


def test_events_carry_the_refusal_and_are_redacted_when_recorded():
    policy, events = make_policy(secrets={"KEY": SECRET})
    request = h1(f"/v1?k={SECRET.value}")  # as it went upstream, after substitution
    policy.record(request_event(request, 200, started=10.0, sent=3, received=5, now=10.25))
    refused = Refusal.by_policy(Blocked(f"leaked {SECRET.value}"))
    policy.record(request_event(request, started=10.0, sent=3, refusal=refused, now=10.0))
    ok, blocked = events
    assert (ok.status_code, ok.request_bytes, ok.response_bytes, ok.duration_ms, ok.blocked) == (200, 3, 5, 250, False)
    assert ok.url == "https://api.test/v1?k=[KEY]"
    assert (blocked.status_code, blocked.response_bytes, blocked.blocked) == (403, 0, True)
    assert blocked.block_reason == "leaked [KEY]"


# --- a playbook ------------------------------------------------------------------------------


@dataclass
class Playbook:
    """Requests on one connection, each with the decision it must get; then exactly these events."""

    policy: NetworkPolicy
    events: list[NetworkEvent]
    connection_host: str | None = None
    steps: list[tuple[HttpRequest, int | None, str]] = field(default_factory=list)

    def admits(self, request: HttpRequest, upstream_query: str) -> Playbook:
        self.steps.append((request, None, upstream_query))
        return self

    def refuses(self, request: HttpRequest, status: int, message: str) -> Playbook:
        self.steps.append((request, status, message))
        return self

    async def run(self) -> list[tuple[int, bool]]:
        for request, status, expected in self.steps:
            refusal = await admit(self.policy, request, connection_host=self.connection_host)
            if status is None:
                assert refusal is None, f"{request.url}: expected to go upstream, got {refusal}"
                assert request.query == expected, request
                self.policy.record(request_event(request, 200, started=0.0, now=0.0))
            else:
                assert refusal is not None, f"{request.url}: expected {status}, went upstream"
                assert (refusal.status, refusal.body.decode()) == (status, expected + "\n")
                self.policy.record(request_event(request, started=0.0, refusal=refusal, now=0.0))
        assert len(self.events) == len(self.steps), "an event was recorded that no step accounts for"
        return [(e.status_code, e.blocked) for e in self.events]


async def test_playbook_one_tls_connection_with_rules_secrets_and_refusals():
    policy, events = make_policy({"path": "/admin/*", "action": "block"}, allowed_hosts=("api.test",),
                                 secrets={"KEY": SECRET})  # fmt: skip
    outcome = await (
        Playbook(policy, events, connection_host="api.test")
        .admits(h1(f"/v1?key={PLACEHOLDER}"), upstream_query="key=sk-value-42")
        .refuses(h1("/admin/users"), 403, "Blocked by policy: request blocked by policy")
        .refuses(
            h1("/", ("Host", "other.test")),
            421,
            "Blocked by policy: request for other.test on a TLS connection to api.test",
        )  # fmt: skip
        .refuses(
            h1("api.test:443", method="CONNECT"), 405, "Blocked by policy: CONNECT is not supported through the proxy"
        )
        .admits(h1("/v1?plain=1"), upstream_query="plain=1")
        .run()
    )
    assert outcome == [(200, False), (403, True), (421, True), (405, True), (200, False)]


async def test_playbook_plain_http_refuses_hosts_and_misplaced_secrets():
    policy, events = make_policy(allowed_hosts=("api.test", "other.test"), secrets={"KEY": SECRET})
    outcome = await (
        Playbook(policy, events)
        .refuses(h1("/", ("Host", "evil.test")), 403, "Blocked by policy: host evil.test is not in the allow-list")
        .refuses(
            h1(f"/?k={PLACEHOLDER}", ("Host", "other.test")),
            403,
            "Blocked by policy: secret placeholder of KEY sent to unauthorized host other.test",
        )  # fmt: skip
        .admits(h1("/?k=1", ("Host", "other.test")), upstream_query="k=1")
        .run()
    )
    assert outcome == [(403, True), (403, True), (200, False)]
