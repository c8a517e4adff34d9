"""`--secret-file` and `--secret-placeholder` (issue 10, item 6): values off the command line, custom placeholders."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from matchlock.api.config import SandboxConfig, public_config
from matchlock.api.errors import UsageError
from matchlock.api.network import NetworkConfig, SecretConfig
from matchlock.api.secrets import load_secret_file, parse_secrets
from matchlock.policy.engine import NetworkPolicy
from proxy_harness import PlainHTTPProxy, make_policy
from proxy_upstreams import HTTP1Upstream

pytestmark = pytest.mark.timeout(60)
VALUE = "ghp_TheRealValue0123456789"


def write(tmp_path, document) -> str:
    path = tmp_path / "secrets.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def test_secret_file_in_upstream_shape(tmp_path):
    path = write(tmp_path, {"GH": {"value": VALUE, "placeholder": "ghp_placeholder", "hosts": ["api.github.test"]},
                            "K": {"value": "v2", "hosts": ["a.test", "*.b.test:443"]}})  # fmt: skip
    assert load_secret_file(path) == {
        "GH": SecretConfig(VALUE, ("api.github.test",), "ghp_placeholder"),
        "K": SecretConfig("v2", ("a.test", "*.b.test:443"), ""),
    }


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ({"bad name": {"value": VALUE, "hosts": ["a.test"]}}, "invalid secret name 'bad name'"),
        ({"K": "just a string"}, 'secret K: expected an object with "value" and "hosts"'),
        ({"K": {"hosts": ["a.test"]}}, '"value" must be a non-empty string'),
        ({"K": {"value": "", "hosts": ["a.test"]}}, '"value" must be a non-empty string'),
        ({"K": {"value": 5, "hosts": ["a.test"]}}, '"value" must be a non-empty string'),
        ({"K": {"value": VALUE}}, '"hosts" must be a non-empty list'),
        ({"K": {"value": VALUE, "hosts": []}}, '"hosts" must be a non-empty list'),
        ({"K": {"value": VALUE, "hosts": "a.test"}}, '"hosts" must be a non-empty list'),
        ({"K": {"value": VALUE, "hosts": ["bad host"]}}, "secret K: invalid host 'bad host'"),
        ({"K": {"value": VALUE, "hosts": [""]}}, "empty host"),
        ({"K": {"value": VALUE, "hosts": ["a.test"], "placeholder": 3}}, '"placeholder" must be a string'),
        ({"K": {"value": VALUE, "hosts": ["a.test"], "vaule": "x"}}, "unknown field 'vaule'"),
    ],
)
def test_every_field_is_checked_and_no_message_quotes_a_value(tmp_path, document, needle):
    with pytest.raises(UsageError) as caught:
        load_secret_file(write(tmp_path, document))
    assert needle in str(caught.value) and VALUE not in str(caught.value)
    assert "secrets.json" in str(caught.value)


def test_unreadable_and_binary_files(tmp_path):
    with pytest.raises(UsageError, match="cannot read it"):
        load_secret_file(str(tmp_path / "missing.json"))
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_secret_file(str(binary))


def test_flags_override_the_file_and_placeholders_name_a_known_secret(tmp_path):
    path = write(tmp_path, {"GH": {"value": VALUE, "hosts": ["api.github.test"]}, "K": {"value": "x", "hosts": ["k"]}})
    secrets = parse_secrets(["K@k.test"], ["GH=ghp_custom"], path, {"K": "from-env"})
    assert secrets["GH"] == SecretConfig(VALUE, ("api.github.test",), "ghp_custom")
    assert secrets["K"] == SecretConfig("from-env", ("k.test",))
    for bad, needle in (("NOPE=x", "no secret NOPE"), ("GH", "expected NAME=PLACEHOLDER"), ("GH=", "NAME=PLACE")):
        with pytest.raises(UsageError, match=needle):
            parse_secrets([], [bad], path, {})


@pytest.mark.parametrize(
    ("placeholders", "needle"),
    [
        ({"A": "tok_one", "B": "tok_one_more"}, "overlap"),
        ({"A": "has space"}, "printable ASCII"),
        ({"A": "x" * 300}, "printable ASCII"),
        ({"A": "prefix-valueA-suffix"}, "contains the value of secret A"),
        ({"B": "valueA"}, "contains the value of secret A"),
    ],
)
def test_placeholders_are_checked_with_the_network_config_rpc_included(placeholders, needle):
    secrets = {name: SecretConfig(f"value{name}", ("a.test",), placeholders.get(name, "")) for name in ("A", "B")}
    with pytest.raises(UsageError, match=needle) as caught:
        NetworkConfig(secrets=secrets).validate()
    assert "valueA" not in str(caught.value).replace("value of", "")


def test_custom_placeholder_is_what_the_guest_sees_and_is_substituted(tmp_path):
    secrets = parse_secrets(
        [], ["GH=ghp_placeholder0000"], write(tmp_path, {"GH": {"value": VALUE, "hosts": ["localhost"]}}), {}
    )
    assert NetworkPolicy(NetworkConfig(secrets=secrets)).guest_environment() == {"GH": "ghp_placeholder0000"}

    async def scenario(upstream):
        policy, _ = make_policy(secrets=secrets)
        async with PlainHTTPProxy(policy, upstream.port) as proxy:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                response = await http.get(f"http://localhost:{proxy.port}/echo",
                                          headers={"authorization": "token ghp_placeholder0000"})  # fmt: skip
        return response.json()

    with HTTP1Upstream() as upstream:
        echo = asyncio.run(scenario(upstream))
    assert echo["headers"]["authorization"] == f"token {VALUE}"


def test_the_stored_config_holds_no_value(tmp_path):
    secrets = parse_secrets([], [], write(tmp_path, {"GH": {"value": VALUE, "hosts": ["api.github.test"]}}), {})
    stored = json.dumps(public_config(SandboxConfig(image="x", network=NetworkConfig(secrets=secrets))))
    assert VALUE not in stored and "api.github.test" in stored


def test_run_reports_a_bad_secret_file_in_one_line_before_boot(tmp_path):
    path = write(tmp_path, {"GH": {"value": VALUE, "hosts": []}})
    env = {"MATCHLOCK_STATE_DIR": str(tmp_path / "state"), "MATCHLOCK_CACHE_DIR": str(tmp_path / "cache"),
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "matchlock", "run", "--secret-file", path, "--", "true"],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done
    assert '"hosts" must be a non-empty list' in done.stderr and VALUE not in done.stderr
