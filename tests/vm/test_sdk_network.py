"""SDK network hooks end to end: the proxy of our `matchlock rpc` calls back into the SDK process.

The guest (busybox wget) talks to the stand-in servers of netfixtures.py, which echo each request as
JSON. `matchlock rpc` runs under `inet.wrap`, so its name lookups go to the stand-in DNS server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess

import pytest
from netfixtures import DNS_SERVER, HOSTS
from sdk_support import IMAGE, MATCHLOCK

from matchlock import (
    AsyncClient,
    Client,
    Config,
    NetworkHookRequest,
    NetworkHookRequestMutation,
    NetworkHookResponseMutation,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    Sandbox,
)
from support import sdk_compat

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


@pytest.fixture(scope="module")
def rpc_config(inet, tmp_path_factory, module_state_dir) -> Config:
    """A `matchlock` for the SDK whose `rpc` resolves through the stand-in DNS and trusts its CA."""
    wrapper = tmp_path_factory.mktemp("rpc") / "matchlock"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in inet.env().items())
    wrapper.write_text(f'#!/bin/sh\nexport {env}\nexec {shlex.join(inet.wrap([MATCHLOCK]))} "$@"\n')
    wrapper.chmod(0o755)
    return Config(binary_path=str(wrapper))


def sandbox(rules: list[NetworkHookRule]) -> Sandbox:
    box = Sandbox(IMAGE).allow_host("api.test").with_dns_servers(DNS_SERVER)
    for name, ip in HOSTS.items():
        box.add_host(name, ip)
    return box.with_network_interception(NetworkInterceptionConfig(rules=rules))


def tag(request: NetworkHookRequest) -> NetworkHookResult:
    headers = dict(request.request_headers or {})
    headers["X-From-Hook"] = [f"{request.method} {request.path}"]
    return NetworkHookResult(action="mutate", request=NetworkHookRequestMutation(headers=headers))


def swap(request: NetworkHookRequest) -> NetworkHookResult:
    body = f"swapped after {request.status_code}\n"
    return NetworkHookResult(action="mutate", response=NetworkHookResponseMutation(set_body=body))


def deny(request: NetworkHookRequest) -> NetworkHookResult:
    return NetworkHookResult(action="block")


RULES = [
    NetworkHookRule(name="tag", phase="before", hosts=["api.test"], path="/tag", hook=tag, timeout_ms=5000),
    NetworkHookRule(name="swap", phase="after", path="/swap", hook=swap, timeout_ms=5000),
    NetworkHookRule(name="deny", phase="before", path="/deny", hook=deny, timeout_ms=5000),
]


def sent_header(echo: str, name: str) -> list[str]:
    return [v for k, v in json.loads(echo)["headers"] if k.lower() == name.lower()]


def test_sync_client_hooks_mutate_replace_and_block(rpc_config, inet):
    mark = inet.mark()
    with Client(rpc_config) as client:
        client.create(sandbox(RULES).options())
        tagged = client.exec("wget -qO- http://api.test/tag", timeout=120)
        swapped = client.exec("wget -qO- http://api.test/swap", timeout=120)
        denied = client.exec("wget -qO- http://api.test/deny", timeout=120)
    client.remove()
    assert tagged.exit_code == 0, tagged
    assert sent_header(tagged.stdout, "x-from-hook") == ["GET /tag"]
    assert (swapped.exit_code, swapped.stdout) == (0, "swapped after 200\n")
    assert denied.exit_code != 0
    assert [e["path"] for e in inet.served_since(mark, kind="http")] == ["/tag", "/swap"]


def test_async_client_awaits_coroutine_hooks(rpc_config, loop_thread):
    calls: list[str] = []

    async def tag_later(request: NetworkHookRequest) -> NetworkHookResult:
        await asyncio.sleep(0)
        calls.append(request.host)
        return tag(request)

    async def scenario() -> str:
        rules = [NetworkHookRule(phase="before", path="/tag", hook=tag_later, timeout_ms=5000)]
        async with AsyncClient(rpc_config) as client:
            await client.create(sandbox(rules).options())
            result = await client.exec("wget -qO- http://api.test/tag", timeout=120)
        await client.remove()
        return result.stdout

    assert sent_header(loop_thread.run(scenario()), "x-from-hook") == ["GET /tag"]
    assert calls == ["api.test"]


PUBLISHED_PROGRAM = """
import json, sys
from matchlock import Client, NetworkHookRequestMutation, NetworkHookResult, NetworkHookRule, NetworkInterceptionConfig, Sandbox

def tag(request):
    headers = dict(request.request_headers or {})
    headers["X-From-Hook"] = ["published " + request.path]
    return NetworkHookResult(action="mutate", request=NetworkHookRequestMutation(headers=headers))

box = Sandbox(sys.argv[1]).allow_host("api.test").with_dns_servers(sys.argv[2])
for name, ip in json.loads(sys.argv[3]).items():
    box.add_host(name, ip)
box.with_network_interception(NetworkInterceptionConfig(rules=[NetworkHookRule(phase="before", hook=tag, timeout_ms=5000)]))
with Client() as client:
    client.create(box.options())
    print(client.exec("wget -qO- http://api.test/published", timeout=120).stdout)
client.remove()
"""


def test_the_published_sdk_serves_network_hooks_to_our_proxy(rpc_config, tmp_path):
    python = sdk_compat.ensure()
    program = tmp_path / "program.py"
    program.write_text(PUBLISHED_PROGRAM)
    env = {**os.environ, "MATCHLOCK_BIN": rpc_config.binary_path}
    argv = [str(python), "-I", str(program), IMAGE, DNS_SERVER, json.dumps(HOSTS)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sent_header(done.stdout, "x-from-hook") == ["published /published"]
