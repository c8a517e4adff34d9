"""A sandbox's proxy loads TLS interception, HTTP and dnspython only when it needs them (`run -- true` never does)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("cryptography", "h11", "h2", "dns", "matchlock.net.intercept", "matchlock.net.tls")

PROBE = """
import json, sys
from matchlock.api.network import NetworkConfig
from matchlock.net.proxy import NetworkProxy
from matchlock.policy.engine import NetworkPolicy
import matchlock.sandbox.network
NetworkProxy(None, NetworkPolicy(NetworkConfig(), lambda event: None), [])
before = sorted(sys.modules)
NetworkProxy(None, NetworkPolicy(NetworkConfig(intercept=True), lambda event: None), [])
print(json.dumps([before, sorted(sys.modules)]))
"""


def _loaded(modules: list[str]) -> set[str]:
    return {name for name in HEAVY if any(m == name or m.startswith(name + ".") for m in modules)}


def test_a_proxy_that_does_not_intercept_imports_no_tls_http_or_dns_parser():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain, intercepting = json.loads(proc.stdout)
    assert _loaded(plain) == set()
    assert {"cryptography", "h11", "h2", "matchlock.net.intercept"} <= _loaded(intercepting)
