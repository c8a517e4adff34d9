"""Sandbox networking through the real CLI, probed from inside real guests.

Every byte stays inside namespaces this session made: the stand-in
internet of netfixtures.py (documentation addresses, *.test names answered
by its own DNS server). Guests use busybox (wget, nc) or the test client
image (Debian's Python with OpenSSL, h2, websockets: `mlk-net`), which
verifies TLS against the sandbox CA exactly as a real client would.
Ports the contracts' acceptance tests cli_network_test.go,
cli_allow_list_test.go, network_test.go and concurrent_test.go.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time

import pytest
from netfixtures import DNS_SERVER, HOSTS, PRIVATE_ADDRESS, body_json, json_lines

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

DNS = ("--dns-servers", DNS_SERVER)
# /etc/hosts entries for every stand-in name: the guest reaches the proxy without asking DNS,
# so the proxy's own decision is what is tested.
ADD_HOSTS = tuple(arg for name, ip in HOSTS.items() for arg in ("--add-host", f"{name}:{ip}"))
PLACEHOLDER = re.compile(r"^SANDBOX_SECRET_[0-9a-f]{32}$")
# `p URL`: one line per probe, "OK <url> <body>" or "FAIL <url> <error>" (busybox wget segfaults with -T).
PROBE = ('p() { if timeout 10 wget -q -O /tmp/o "$@" 2>/tmp/e; then echo "OK $1 $(cat /tmp/o)"; '
         'else echo "FAIL $1 $(tr "\\n" " " < /tmp/e)"; fi; }; ')  # fmt: skip


def probes(output: str) -> dict[str, tuple[bool, str]]:
    results = {}
    for line in output.splitlines():
        verdict, _, rest = line.partition(" ")
        if verdict in ("OK", "FAIL"):
            url, _, detail = rest.partition(" ")
            results[url] = (verdict == "OK", detail)
    return results


def served_from(detail: str) -> str:
    return json.loads(detail)["server_addr"]


# --- flags, hostname, hosts, resolv.conf (no traffic) -------------------------------------------------


def test_help_lists_network_flags(net_cli):
    result = net_cli("run", "--help")
    for flag in ("--dns-servers", "--mtu", "--no-network", "--allow-host", "--secret", "--network-intercept",
                 "--add-host", "--hostname"):  # fmt: skip
        assert flag in result.stdout, flag


def test_hostname_hosts_resolv_conf_and_mtu(net_cli):
    result = net_cli(
        "run", "--hostname", "box.test", "--add-host", "db.internal:192.0.2.7", "--add-host", "v6.internal:2001:db8::1",
        "--dns-servers", "192.0.2.53,198.51.100.53", "--mtu", "1400", "--",
        "sh", "-c", "hostname; cat /etc/hostname; echo ---; cat /etc/hosts; echo ---; cat /etc/resolv.conf; echo ---; "
                    "cat /sys/class/net/eth0/mtu",
    )  # fmt: skip
    assert result.returncode == 0, result
    hostname, hosts, resolv, mtu = result.stdout.split("---\n")
    assert hostname == "box.test\nbox.test\n"
    assert hosts == (
        "127.0.0.1\tlocalhost localhost.localdomain box.test\n192.0.2.7\tdb.internal\n2001:db8::1\tv6.internal\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
    assert resolv == "nameserver 192.0.2.53\nnameserver 198.51.100.53\n"
    assert mtu == "1400\n"


def test_default_hostname_and_resolvers(net_cli):
    result = net_cli("run", "--", "sh", "-c", "hostname; cat /etc/hostname /etc/resolv.conf; head -1 /etc/hosts")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"vm-[0-9a-f]{8}", lines[0]) and lines[1] == lines[0], result
    assert lines[2:4] == ["nameserver 8.8.8.8", "nameserver 8.8.4.4"]
    assert lines[4] == f"127.0.0.1\tlocalhost localhost.localdomain {lines[0]}"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--add-host", "bad"], "invalid add-host mapping"),
        (["--add-host", "db.internal:not-an-ip"], "invalid add-host mapping"),
        (["--add-host", "bad host:192.0.2.1"], "invalid add-host mapping"),
        (["--no-network", "--allow-host", "api.test"], "--no-network cannot be combined"),
        (["--no-network", "--secret", "K=v@api.test"], "--no-network cannot be combined"),
        (["--no-network", "--network-intercept"], "--no-network cannot be combined"),
        (["--mtu", "0"], "--mtu"),
        (["--dns-servers", "dns.test"], "--dns-servers"),
        (["--secret", "NOHOSTS=value"], "--secret"),
        (["--secret", "MATCHLOCK_TEST_UNSET_SECRET@api.test"], "MATCHLOCK_TEST_UNSET_SECRET"),
    ],
)
def test_invalid_network_flags_fail_before_boot(net_cli, args, needle):
    result = net_cli("run", *args, "--", "true")
    assert result.returncode == 2, result
    assert needle in result.stderr, result


def test_no_network_has_only_loopback(net_cli, inet):
    mark = inet.mark()
    result = net_cli("run", "--no-network", "--", "sh", "-c",
                     "ls /sys/class/net; timeout 10 wget -q -O- http://192.0.2.10/echo; echo rc=$?")  # fmt: skip
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[-1] != "rc=0"
    assert lines[:-1] == ["lo"], f"interfaces besides lo: {lines[:-1]}"
    assert inet.served_since(mark, kind="http") == []


# --- allow-list ------------------------------------------------------------------------------------


def test_allowed_and_blocked_hosts_with_events(net_cli, net_detached, inet):
    vm = net_detached("--allow-host", "api.test", *DNS, "--add-host", "other.test:198.51.100.20")
    mark = inet.mark()
    # (HTTPS is probed with mlk-net below: Debian's busybox wget fails TLS handshakes with OpenSSL servers.)
    result = net_cli("exec", vm, "--", "sh", "-c", PROBE + "p http://api.test/echo; p http://other.test/echo")
    seen = probes(result.stdout)
    assert seen["http://api.test/echo"][0] and served_from(seen["http://api.test/echo"][1]) == "192.0.2.10", result
    assert not seen["http://other.test/echo"][0] and "403" in seen["http://other.test/echo"][1], result
    assert [e["host"] for e in inet.served_since(mark, kind="http")] == ["api.test"]
    log = net_cli("log", vm).stdout
    assert "[matchlock] network: GET http://api.test/echo -> 200" in log, log
    assert re.search(r"network: GET http://other\.test/echo -> blocked \(.*other\.test.*allow-list\)", log), log


def test_https_is_verified_against_the_sandbox_ca(net_cli, client_image, inet):
    result = net_cli("run", "--image", client_image, "--allow-host", "api.test", *DNS, *ADD_HOSTS, "--",
                     "sh", "-c", "grep -c 'BEGIN CERTIFICATE' $SSL_CERT_FILE; "
                     "mlk-net multi 'get https://api.test/echo?x=1' 'get https://other.test/echo'")  # fmt: skip
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[0] == "1"  # the image's (empty) bundle now holds the sandbox CA
    allowed, blocked = json_lines(result.stdout)
    assert allowed["status"] == 200, allowed
    echo = body_json(allowed)
    assert (echo["tls"], echo["query"], echo["server_addr"]) == (True, "x=1", "192.0.2.10")
    assert blocked.get("status") == 403 or "error" in blocked, blocked


def test_allow_host_with_a_port_allows_only_that_port(net_cli, client_image, inet):
    """`api.test:443`: HTTPS to it passes, its port 80 and other names do not; DNS still resolves it."""
    mark = inet.mark()
    result = net_cli("run", "--image", client_image, "--allow-host", "api.test:443", *DNS, "--",
                     "mlk-net", "multi", "get https://api.test/echo", "get http://api.test/echo",
                     "get https://other.test/echo")  # fmt: skip
    assert result.returncode == 0, result
    https, http, other = json_lines(result.stdout)
    assert https["status"] == 200 and body_json(https)["server_addr"] == "192.0.2.10", https
    assert http["status"] == 403 and "port 80" in http.get("body", ""), http
    assert other.get("status") == 403 or "error" in other, other
    assert [(e["host"], e["tls"]) for e in inet.served_since(mark, kind="http")] == [("api.test", True)]


GLOB_CASES = [
    ("*", {"api.test": True, "other.test": True, "www.sub.test": True}),
    ("*.sub.test", {"www.sub.test": True, "sub.test": False, "api.test": False}),
    ("api-*", {"api-eu.test": True, "api.test": False, "other.test": False}),
    ("api.*", {"api.test": True, "api-eu.test": False, "other.test": False}),
    ("other.test", {"other.test": True, "api.test": False, "www.sub.test": False}),
]


@pytest.mark.parametrize("pattern, expected", GLOB_CASES, ids=[c[0] for c in GLOB_CASES])
def test_allow_list_globs(net_cli, inet, pattern, expected):
    script = PROBE + "; ".join(f"p http://{name}/echo" for name in expected)
    mark = inet.mark()
    result = net_cli("run", "--allow-host", pattern, *DNS, *ADD_HOSTS, "--", "sh", "-c", script)
    assert result.returncode == 0, result
    seen = probes(result.stdout)
    for name, allowed in expected.items():
        ok, detail = seen[f"http://{name}/echo"]
        assert ok == allowed, (pattern, name, detail)
        if allowed:
            assert served_from(detail) == HOSTS[name]
        else:
            assert "403" in detail, (pattern, name, detail)
    assert sorted(e["host"] for e in inet.served_since(mark, kind="http")) == sorted(
        n for n, a in expected.items() if a
    )


def test_intercept_with_empty_list_allows_all_and_open_mode_passes_tls_through(net_cli, client_image):
    urls = ("https://api.test/echo", "https://other.test/echo", "https://third.test/echo")
    intercepted = net_cli("run", "--image", client_image, "--network-intercept", *DNS, "--",
                          "mlk-net", "multi", *(f"get {u}" for u in urls))  # fmt: skip
    replies = json_lines(intercepted.stdout)
    # The guest trusts only the sandbox CA: a verified handshake proves the proxy terminated TLS.
    assert [r.get("status") for r in replies] == [200, 200, 200], intercepted
    assert [body_json(r)["server_addr"] for r in replies] == ["192.0.2.10", "198.51.100.20", "203.0.113.30"]
    # Without an allow-list or --network-intercept, 443 is a policy-checked relay: the guest sees the real
    # (test CA) certificate, which it does not trust.
    open_mode = net_cli("run", "--image", client_image, *DNS, "--",
                        "mlk-net", "multi", f"get {urls[0]}", f"get -k {urls[1]}")  # fmt: skip
    untrusted, insecure = json_lines(open_mode.stdout)
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.get("error", ""), open_mode
    assert insecure["status"] == 200 and body_json(insecure)["server_addr"] == "198.51.100.20", open_mode


# --- private addresses, bypass attempts, DNS, UDP -------------------------------------------------------


def test_private_addresses_are_blocked(net_cli, client_image, inet):
    mark = inet.mark()
    intercepted = net_cli(
        "run", "--image", client_image, "--allow-host", "*", *DNS, "--", "mlk-net", "multi",
        f"get http://{PRIVATE_ADDRESS}/echo", f"get https://{PRIVATE_ADDRESS}/echo", f"tcp {PRIVATE_ADDRESS} 7000 hi",
        "get --connect 192.0.2.10 http://private.test/echo", "get --connect 192.0.2.10 https://private.test/echo",
        "dns private.test",
    )  # fmt: skip
    http_ip, https_ip, tcp_ip, http_name, https_name, dns = json_lines(intercepted.stdout)
    assert http_ip.get("status") == 403, intercepted
    assert https_ip.get("status") == 403 or "error" in https_ip, intercepted
    assert tcp_ip.get("received", "") == "", intercepted
    # The name is allowed (`*`) but resolves, on the host, to 10.0.0.5: DNS rebinding gains nothing.
    assert http_name.get("status") == 403, intercepted
    assert https_name.get("status") == 403 or "error" in https_name, intercepted
    assert dns == {"rcode": "NOERROR", "answers": []}, intercepted  # the private answer is stripped

    open_mode = net_cli("run", "--image", client_image, *DNS, "--", "mlk-net", "multi",
                        f"get http://{PRIVATE_ADDRESS}/echo", f"tcp {PRIVATE_ADDRESS} 7000 hi")  # fmt: skip
    http_open, tcp_open = json_lines(open_mode.stdout)
    assert "error" in http_open or http_open.get("status") == 403, open_mode
    assert tcp_open.get("received", "") == "", open_mode
    assert [e for e in inet.served_since(mark) if e.get("server_addr") == PRIVATE_ADDRESS] == []

    explicit = net_cli("run", "--allow-host", PRIVATE_ADDRESS, *DNS, "--", "sh", "-c",
                       PROBE + f"p http://{PRIVATE_ADDRESS}/echo")  # fmt: skip
    ok, detail = probes(explicit.stdout)[f"http://{PRIVATE_ADDRESS}/echo"]
    assert ok and served_from(detail) == PRIVATE_ADDRESS, explicit


def test_direct_ip_bypass_attempts_are_blocked(net_cli, client_image, inet):
    mark = inet.mark()
    result = net_cli(
        "run", "--image", client_image, "--allow-host", "api.test", *DNS, "--", "mlk-net", "multi",
        "get http://192.0.2.10/echo", "get https://192.0.2.10/echo", "get --no-sni --connect 192.0.2.10 https://x/echo",
        "tcp 192.0.2.10 7000 hi", "tcp 203.0.113.30 7000 hi", "tcp 192.0.2.10 443 'GET / HTTP/1.0\r\n\r\n'",
        # An allowed name sent to another address: the proxy dials the name, never the guest's address.
        "get --connect 203.0.113.30 http://api.test/echo", "get --connect 203.0.113.30 https://api.test/echo",
    )  # fmt: skip
    http_ip, https_ip, no_sni, tcp_a, tcp_b, raw_443, host_spoof, sni_spoof = json_lines(result.stdout)
    assert http_ip.get("status") == 403, result
    assert https_ip.get("status") == 403 or "error" in https_ip, result
    assert no_sni.get("status") == 403 or "error" in no_sni, result
    assert tcp_a.get("received", "") == "" and tcp_b.get("received", "") == "", result
    assert raw_443.get("received", "") == "", result
    assert host_spoof["status"] == 200 and body_json(host_spoof)["server_addr"] == "192.0.2.10", result
    assert sni_spoof["status"] == 200 and body_json(sni_spoof)["server_addr"] == "192.0.2.10", result
    served = inet.served_since(mark)
    assert [e for e in served if e["kind"] == "tcp"] == []
    assert {(e["host"], e["server_addr"]) for e in served if e["kind"] == "http"} == {("api.test", "192.0.2.10")}


def test_dns_answers_only_allowed_names_and_udp_is_dropped(net_cli, client_image, inet):
    mark = inet.mark()
    result = net_cli(
        "run", "--image", client_image, "--allow-host", "api.test", *DNS, "--", "sh", "-c",
        "mlk-net multi 'dns api.test' 'dns other.test' 'dns c2VjcmV0.other.test' 'dns api.test 198.51.100.20' "
        "'udp 192.0.2.10 9999 udp-leak-1' 'udp 198.51.100.20 9999 udp-leak-2' 'udp 192.0.2.53 53 not-dns' "
        "'udp 192.0.2.53 123 udp-leak-3'; sleep 1",
    )  # fmt: skip
    allowed, blocked, exfil, other_server, *udp = json_lines(result.stdout)
    assert allowed == {"rcode": "NOERROR", "answers": ["192.0.2.10"]}, result
    assert blocked["rcode"] == "NXDOMAIN" and exfil["rcode"] == "NXDOMAIN", result
    # Whatever server the guest names, port 53 ends at the forwarder.
    assert other_server == {"rcode": "NOERROR", "answers": ["192.0.2.10"]}, result
    assert all(u.get("reply") is None for u in udp), result
    served = inet.served_since(mark)
    assert {e["name"] for e in served if e["kind"] == "dns"} == {"api.test"}, served
    assert [e for e in served if e["kind"] == "udp"] == [], served


# --- runtime allow-list ------------------------------------------------------------------------------


def test_runtime_allow_list_add_delete(net_cli, net_detached):
    vm = net_detached("--network-intercept", *DNS, *ADD_HOSTS)

    def fetch() -> dict[str, bool]:
        out = net_cli("exec", vm, "--", "sh", "-c", PROBE + "p http://api.test/echo; p http://other.test/echo").stdout
        return {url.split("/")[2]: ok for url, (ok, _) in probes(out).items()}

    assert fetch() == {"api.test": True, "other.test": True}
    added = net_cli("allow-list", "add", vm, "api.test, third.test", "api.test")
    assert added.stdout == f"Added to {vm}: api.test,third.test\nCurrent allow-list: api.test,third.test\n", added
    assert fetch() == {"api.test": True, "other.test": False}
    again = net_cli("allow-list", "add", vm, "third.test")
    assert again.stdout == f"No new hosts were added to {vm}\nCurrent allow-list: api.test,third.test\n", again
    removed = net_cli("allow-list", "delete", vm, "third.test,nothere.test")
    assert removed.stdout == f"Removed from {vm}: third.test\nCurrent allow-list: api.test\n", removed
    nothing = net_cli("allow-list", "delete", vm, "nothere.test")
    assert nothing.stdout == f"No hosts were removed from {vm}\nCurrent allow-list: api.test\n", nothing
    emptied = net_cli("allow-list", "delete", vm, "api.test")
    assert emptied.stdout == f"Removed from {vm}: api.test\nCurrent allow-list: (empty: all hosts allowed)\n", emptied
    assert fetch() == {"api.test": True, "other.test": True}
    no_hosts = net_cli("allow-list", "add", vm, " , ")
    assert no_hosts.returncode != 0 and "at least one host" in no_hosts.stderr, no_hosts

    plain = net_detached(*DNS)
    refused = net_cli("allow-list", "add", plain, "api.test")
    assert refused.returncode == 1, refused
    assert "allow-list updates unavailable: sandbox was started without network interception" in refused.stderr


# --- secrets -----------------------------------------------------------------------------------------


def test_secrets_substituted_only_for_their_hosts(net_cli, net_detached, client_image, inet, state_dir):
    value, env_value = "sk-live-" + secrets.token_hex(8), "tok-env-" + secrets.token_hex(8)
    vm = net_detached("--image", client_image, "--secret", f"API_KEY={value}@api.test", "--secret", "ENV_KEY@api.test",
                      "--allow-host", "other.test", *DNS, *ADD_HOSTS, env={"ENV_KEY": env_value})  # fmt: skip
    env = net_cli("exec", vm, "--", "sh", "-c", 'echo "$API_KEY"; echo "$ENV_KEY"').stdout.split()
    assert len(env) == 2 and all(PLACEHOLDER.match(p) for p in env) and env[0] != env[1], env

    mark = inet.mark()
    script = PROBE + (
        'p "http://api.test/echo?key=$API_KEY&other=$ENV_KEY" --header "Authorization: Bearer $API_KEY"; '
        'p "http://other.test/echo?key=$API_KEY"; '
        'p "http://other.test/echo" --header "Authorization: Bearer $ENV_KEY"; '
        "mlk-net multi \"get https://api.test/echo?key=$API_KEY -H 'X-Env: $ENV_KEY'\" "
        '"get https://other.test/echo?key=$ENV_KEY"'
    )
    output = net_cli("exec", vm, "--", "sh", "-c", script).stdout
    (ok_http, http), (ok_q, leak_q), (ok_h, leak_h) = probes(output).values()
    https, https_leak = json_lines(output)
    assert ok_http, output
    echo = json.loads(http)
    assert echo["query"] == f"key={value}&other={env_value}"
    assert ["Authorization", f"Bearer {value}"] in [[k.capitalize(), v] for k, v in echo["headers"]], echo
    assert https["status"] == 200, https
    echo_tls = body_json(https)
    assert echo_tls["tls"] and echo_tls["query"] == f"key={value}"
    assert ["x-env", env_value] in [[k.lower(), v] for k, v in echo_tls["headers"]], echo_tls
    assert not ok_q and "403" in leak_q and not ok_h and "403" in leak_h, output
    assert https_leak.get("status") == 403, https_leak
    assert [e["host"] for e in inet.served_since(mark, kind="http")] == ["api.test", "api.test"]
    log = net_cli("log", vm).stdout
    assert re.search(r"network: GET http://other\.test/echo\?key=\S+ -> blocked \(secret placeholder of API_KEY", log)
    assert "sent to unauthorized host other.test" in log, log

    # The guest never holds a value: not in its env, any readable process environment, /etc or /tmp.
    # (The echo server reflected the values into wget's output file: that file goes first. The pattern
    # is split so this command line does not carry it either.)
    net_cli("exec", vm, "--", "rm", "-f", "/tmp/o", "/tmp/e")
    for secret in (value, env_value):
        head, tail = secret[:6], secret[6:]
        hunt = net_cli("exec", vm, "--", "sh", "-c",
                       f'h={head}; t={tail}; echo env: $(env | grep -c "$h$t"); '
                       f'grep -l "$h$t" /proc/[0-9]*/environ /proc/cmdline 2>/dev/null; '
                       f'grep -rl "$h$t" /etc /tmp /root /run /usr/local 2>/dev/null; true')  # fmt: skip
        assert hunt.stdout == "env: 0\n", hunt
    # ...and it never reached the host's disk: state database, logs, sockets directory.
    for path in state_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert value.encode() not in data and env_value.encode() not in data, path
    # ...nor the command line or environment of the background owner or its QEMU (`ps` shows command lines to all).
    owner = json.loads(net_cli("get", vm).stdout)["pid"]
    qemu = json.loads(net_cli("inspect", vm).stdout)["lifecycle"]["resources"]["qemu_pid"]
    for pid in (owner, qemu):
        for exposed in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{exposed}", "rb") as f:
                assert value.encode() not in f.read(), f"the secret is in /proc/{pid}/{exposed}"


def test_secret_file_and_custom_placeholder_through_run_detached(net_cli, net_detached, tmp_path, state_dir):
    value = "ghp_" + secrets.token_hex(12)
    secret_file = tmp_path / "secrets.json"
    secret_file.write_text(json.dumps({"TOKEN": {"value": value, "hosts": ["api.test"]}}))
    vm = net_detached("--secret-file", str(secret_file), "--secret-placeholder", "TOKEN=ghp_placeholder000000",
                      *DNS, *ADD_HOSTS)  # fmt: skip
    script = PROBE + 'echo "env $TOKEN"; p "http://api.test/echo" --header "Authorization: token $TOKEN"'
    output = net_cli("exec", vm, "--", "sh", "-c", script).stdout
    assert "env ghp_placeholder000000\n" in output, output
    ok, detail = probes(output)["http://api.test/echo"]
    assert ok and ["Authorization", f"token {value}"] in [[k.capitalize(), v] for k, v in json.loads(detail)["headers"]]
    net_cli("exec", vm, "--", "rm", "-f", "/tmp/o", "/tmp/e")  # the echo reflected the value into wget's output
    for path in state_dir.rglob("*"):
        if path.is_file():
            assert value.encode() not in path.read_bytes(), path


def test_two_sandboxes_with_different_secrets_do_not_cross(net_cli, net_detached):
    alpha, beta = "alpha-" + secrets.token_hex(6), "beta-" + secrets.token_hex(6)
    vm_a = net_detached("--secret", f"TOKEN={alpha}@api.test", *DNS, *ADD_HOSTS)
    vm_b = net_detached("--secret", f"TOKEN={beta}@api.test", *DNS, *ADD_HOSTS)
    placeholder_a = net_cli("exec", vm_a, "--", "sh", "-c", 'echo "$TOKEN"').stdout.strip()
    placeholder_b = net_cli("exec", vm_b, "--", "sh", "-c", 'echo "$TOKEN"').stdout.strip()
    assert placeholder_a != placeholder_b and PLACEHOLDER.match(placeholder_a) and PLACEHOLDER.match(placeholder_b)

    def query(vm: str, token: str) -> str:
        out = net_cli("exec", vm, "--", "sh", "-c", PROBE + f'p "http://api.test/echo?t={token}"').stdout
        ((ok, detail),) = probes(out).values()
        assert ok, out
        return json.loads(detail)["query"]

    for _ in range(3):  # interleaved, to catch any shared state
        assert query(vm_a, placeholder_a) == f"t={alpha}"
        assert query(vm_b, placeholder_b) == f"t={beta}"
    # Another sandbox's placeholder means nothing here: it is passed on as the inert string it is.
    assert query(vm_b, placeholder_a) == f"t={placeholder_a}"


def test_a_restore_substitutes_the_secret_value_it_is_given_never_the_sources(net_cli, net_detached, state_dir):
    old, new = "old-" + secrets.token_hex(6), "new-" + secrets.token_hex(6)
    vm = net_detached("--secret", f"TOKEN={old}@api.test", *DNS, *ADD_HOSTS)
    placeholder = net_cli("exec", vm, "--", "sh", "-c", 'echo "$TOKEN"').stdout.strip()
    assert net_cli("snapshot", "create", vm, "--name", "secret-swap").returncode == 0
    clone = net_detached("--from-snapshot", "secret-swap", "--secret", f"TOKEN={new}@api.test")

    def query(target: str) -> str:
        out = net_cli("exec", target, "--", "sh", "-c", PROBE + f'p "http://api.test/echo?t={placeholder}"').stdout
        ((ok, detail),) = probes(out).values()
        assert ok, out
        return json.loads(detail)["query"]

    # The clone's processes hold the source's placeholder (a full restore keeps them running).
    assert net_cli("exec", clone, "--", "sh", "-c", 'echo "$TOKEN"').stdout.strip() == placeholder
    assert query(clone) == f"t={new}"
    assert query(vm) == f"t={old}"  # the source keeps its own
    for path in state_dir.rglob("*"):  # neither value was written down (the snapshot included)
        if path.is_file():
            data = path.read_bytes()
            assert old.encode() not in data and new.encode() not in data, path
    net_cli("snapshot", "rm", "secret-swap")


# --- streaming, HTTP/2, WebSocket through interception -----------------------------------------------


def test_streaming_is_not_buffered(net_cli, client_image):
    result = net_cli("run", "--image", client_image, "--allow-host", "api.test", *DNS, "--", "mlk-net", "multi",
                     "stream 'https://api.test/chunked?n=4&delay=0.5'", "stream https://api.test/sse",
                     "stream 'http://api.test/close?n=3&delay=0.3'")  # fmt: skip
    chunked, sse, close = json_lines(result.stdout)
    assert chunked["lines"] == [f"chunk-{i} foo\n" for i in range(4)], result
    assert chunked["times"][-1] - chunked["times"][0] >= 1.2, chunked  # each chunk arrived when it was sent
    assert sse["status"] == 200 and ["content-type", "text/event-stream"] in sse["headers"], sse
    assert (
        "".join(sse["lines"]) == "event: greeting\ndata: hello foo\n\ndata: foo and foo\n\n: comment foo\n\n"
        'id: foo-1\ndata: {"v": "foo"}\n\n'
    )
    assert close["lines"] == [f"part-{i} foo\n" for i in range(3)], close


def test_kept_alive_requests_do_not_stall(net_cli, client_image):
    # A proxy that writes a response in several segments without TCP_NODELAY meets the client's delayed
    # ACK: every request then waits ~40 ms. Under TCG a request otherwise takes a few milliseconds.
    result = net_cli("run", "--image", client_image, "--allow-host", "api.test", *DNS, "--", "mlk-net", "multi",
                     "latency https://api.test/echo 30", "latency http://api.test/echo 30")  # fmt: skip
    https, http = json_lines(result.stdout)
    assert https.get("median_ms", 999) < 25 and http.get("median_ms", 999) < 25, result


def test_http2_and_websocket_through_interception(net_cli, client_image, inet):
    mark = inet.mark()
    result = net_cli("run", "--image", client_image, "--allow-host", "api.test", *DNS, "--", "mlk-net", "multi",
                     "h2 'https://api.test/echo?via=h2' -H 'X-Probe: two'", "ws wss://api.test/ws hello again",
                     "ws ws://api.test/ws plain")  # fmt: skip
    h2, wss, ws = json_lines(result.stdout)
    assert h2.get("alpn") == "h2", h2
    echo = body_json(h2)
    assert (echo["proto"], echo["query"]) == ("HTTP/2", "via=h2") and ["x-probe", "two"] in echo["headers"], echo
    assert wss == {"replies": ["echo: hello", "echo: again"]}, result
    assert ws == {"replies": ["echo: plain"]}, result
    assert [e["path"] for e in inet.served_since(mark, kind="http")] == ["/echo", "/ws", "/ws"]


# --- cleanup after a crash --------------------------------------------------------------------------


def test_kill_9_and_gc_leave_no_namespace_tap_or_socket(net_cli, net_detached, state_dir):
    from matchlock.net.namespace import namespace_alive

    vm = net_detached("--allow-host", "api.test", *DNS)
    report = json.loads(net_cli("inspect", vm).stdout)
    resources = report["lifecycle"]["resources"]
    inode, qemu = int(resources["netns_inode"]), int(resources["qemu_pid"])
    owner = json.loads(net_cli("get", vm).stdout)["pid"]
    assert namespace_alive(inode)
    os.kill(owner, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (os.path.exists(f"/proc/{qemu}") or namespace_alive(inode)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{qemu}"), "QEMU outlived its killed owner"
    assert not namespace_alive(inode), "the sandbox namespace (and its TAP) outlived the owner"
    gc = net_cli("gc")
    assert gc.returncode == 0 and f"{vm}: " in gc.stdout, gc
    assert json.loads(net_cli("get", vm).stdout)["status"] in ("crashed", "stopped")
    sockets = [p for p in (state_dir / "vms").rglob("*") if p.is_socket()] if (state_dir / "vms").exists() else []
    assert sockets == [], sockets
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "tap" not in links, links  # nothing was ever made in the test session's own namespace
