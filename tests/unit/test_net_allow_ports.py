"""Allow-list entries with a port (`host:PORT` allows that port only) and empty entries (issue 10, item 17)."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys

import dns.message
import dns.rcode
import dns.rrset
import httpx
import pytest

from matchlock.api.errors import UsageError
from matchlock.api.network import NetworkConfig, SecretConfig, parse_host_list, split_host_entry
from matchlock.net.dns import DNSForwarder
from matchlock.policy.engine import Blocked, HttpRequest, NetworkPolicy
from proxy_harness import PlainHTTPProxy, make_policy
from proxy_upstreams import HTTP1Upstream

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("api.test", ("api.test", None)),
        ("api.test:443", ("api.test", 443)),
        ("*.example.com:8443", ("*.example.com", 8443)),
        ("192.0.2.10:22", ("192.0.2.10", 22)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("2001:db8::1", ("2001:db8::1", None)),
    ],
)
def test_entries_keep_their_port(entry, expected):
    assert parse_host_list([entry]) == (entry,)
    assert split_host_entry(entry) == expected


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ([""], "empty host"),
        (["a.test,,b.test"], "empty host"),
        (["a.test,"], "empty host"),
        (["api.test:0"], "from 1 to 65535"),
        (["api.test:https"], "from 1 to 65535"),
        (["api.test:70000"], "from 1 to 65535"),
        (["a:1:2"], "IPv6"),
        (["[nope]:443"], "not an IPv6 address"),
        (["bad host"], "host name"),
    ],
)
def test_bad_entries_are_usage_errors(values, needle):
    with pytest.raises(UsageError, match=needle):
        parse_host_list(values)


def test_a_port_entry_allows_only_that_port_and_dns_resolves_the_name():
    policy = NetworkPolicy(NetworkConfig(allowed_hosts=("api.test:443", "*.cdn.test:8443", "any.test")))
    assert policy.host_allowed("api.test", 443) and not policy.host_allowed("api.test", 80)
    assert policy.host_allowed("a.cdn.test", 8443) and not policy.host_allowed("a.cdn.test", 443)
    assert policy.host_allowed("any.test", 80) and policy.host_allowed("any.test", 8080)
    assert policy.host_allowed("api.test")  # a name alone (DNS): the connection is checked with its port
    assert not policy.host_allowed("other.test")
    with pytest.raises(Blocked, match="host api.test port 80 is not in the allow-list"):
        policy.check_host("api.test", 80)


def test_a_port_entry_names_an_own_address_only_on_that_port():
    own = "198.51.100.7"
    policy = NetworkPolicy(NetworkConfig(allowed_hosts=(f"{own}:8080", "*:443")))
    assert policy.address_allowed(own, frozenset(), 8080)
    assert not policy.address_allowed("127.0.0.1", frozenset(), 443)  # `*:443` names no address in particular
    host = frozenset({ipaddress.ip_address(own)})
    assert policy.address_allowed(own, host, 8080) and not policy.address_allowed(own, host, 22)


async def test_secret_and_rule_hosts_with_a_port_match_only_that_port():
    placeholder = "SANDBOX_SECRET_" + "c" * 32
    policy = NetworkPolicy(
        NetworkConfig(secrets={"K": SecretConfig("real", ("api.test:443",), placeholder)}, intercept=True)
    )
    ok = HttpRequest("GET", "https", "api.test", 443, "/", "", [("authorization", placeholder)])
    await policy.prepare_request(ok)
    assert ok.headers == [("authorization", "real")]
    with pytest.raises(Blocked):  # the secret's host joined the allow-list for port 443 only
        await policy.prepare_request(HttpRequest("GET", "http", "api.test", 80, "/", "", [("x", placeholder)]))


def test_the_proxy_refuses_other_ports_of_a_port_scoped_host():
    async def scenario(upstream):
        results = []
        for port in (upstream.port, upstream.port + 1):
            policy, events = make_policy(allowed_hosts=(f"localhost:{port}", f"127.0.0.1:{port}"))
            async with PlainHTTPProxy(policy, upstream.port) as proxy:
                async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                    response = await http.get(f"http://localhost:{proxy.port}/text")
            results.append((response.status_code, response.text, [e.blocked for e in events]))
        return results

    with HTTP1Upstream() as upstream:
        allowed, other_port = asyncio.run(scenario(upstream))
    assert allowed == (200, "the quick brown fox jumps over the lazy dog", [False])
    assert other_port[0] == 403 and f"port {upstream.port}" in other_port[1] and other_port[2] == [True]


class _Recorder(DNSForwarder):
    """The forwarder's decision only: upstream answers with one public address, replies are kept."""

    def __init__(self, policy: NetworkPolicy) -> None:
        super().__init__(policy, ["192.0.2.53"])
        self.rcodes: list = []

    async def _ask_upstreams(self, data: bytes) -> bytes | None:
        response = dns.message.make_response(dns.message.from_wire(data))
        response.answer.append(dns.rrset.from_text("api.test.", 60, "IN", "A", "198.51.100.9"))
        return response.to_wire()

    def _send(self, message, rcode, addr) -> None:
        self.rcodes.append(message.rcode() if rcode is None else rcode)


async def test_dns_answers_a_name_allowed_on_one_port():
    forwarder = _Recorder(NetworkPolicy(NetworkConfig(allowed_hosts=("api.test:443",))))
    for name in ("api.test", "other.test"):
        await forwarder._answer(dns.message.make_query(name, "A").to_wire(), ("10.0.0.2", 5353))
    assert forwarder.rcodes == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN]


@pytest.mark.parametrize("value", ["", "api.test:https"])
def test_run_rejects_bad_allow_host_in_one_line_before_boot(tmp_path, value):
    env = {"MATCHLOCK_STATE_DIR": str(tmp_path / "state"), "MATCHLOCK_CACHE_DIR": str(tmp_path / "cache"),
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "matchlock", "run", "--allow-host", value, "--", "true"],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "--allow-host" in done.stderr, done.stderr
