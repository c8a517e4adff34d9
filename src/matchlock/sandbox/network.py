"""Wire a sandbox's network together: namespace, policy, proxy, and what the guest is told.

The namespace helper is a process of its own (`run` starts it first thing, sandbox/early.py
start_early) and QEMU needs its TAP, so `Sandbox.create` runs `create_namespace()`, then QEMU beside
`start_proxy()`, whose imports go on a thread so the loop keeps serving QEMU; `start()` does both in turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..api.events import NetworkEvent
from ..api.network import NetworkConfig
from ..net import namespace as ns
from ..policy.engine import NetworkPolicy
from ..vm.machine import MachineNetwork
from ..wire.agent import GuestNetwork
from ..wire.boot import CA_FALLBACK_PATHS, CA_PATH
from .early import take_early

if TYPE_CHECKING:
    from ..net.proxy import NetworkProxy
    from ..policy.rules import InterceptionRules

# Imported only when first needed (interception, dnspython), so `run -- true` never pays for them;
# `matchlock fork` preloads them (cli/launcher.py), or each clone would import its own copy.
CLONE_MODULES = ("matchlock.net.proxy", "matchlock.net.intercept", "dns.message", "dns.rdatatype")
CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")


def _interception_rules(config: NetworkConfig) -> InterceptionRules | None:
    """The rules engine, with the SDK's hook socket as its callback transport; None without rules."""
    if config.interception is None or not config.interception.rules:
        return None
    from ..net.callbacks import UnixCallbackClient  # only sandboxes with rules pay for these
    from ..policy.rules import InterceptionRules

    socket_path = config.interception.callback_socket
    return InterceptionRules(config.interception, callbacks=UnixCallbackClient(socket_path) if socket_path else None)


def _import_proxy() -> None:
    from ..net import proxy  # noqa: F401 - loaded for start_proxy()


class SandboxNetwork:
    def __init__(self, config: NetworkConfig, emit: Callable[[NetworkEvent], None]) -> None:
        self.config = config
        self.policy = NetworkPolicy(config, emit, rules=_interception_rules(config))
        self.namespace = take_early(config.mtu)  # the one `run` began, if any
        self.proxy: NetworkProxy | None = None

    async def start(self) -> None:
        await self.create_namespace()
        await self.start_proxy()

    async def create_namespace(self) -> None:
        await self.namespace.acreate()

    async def start_proxy(self) -> None:
        """The proxy (and with interception its CA) on the namespace's listeners; create_namespace() first."""
        await asyncio.to_thread(_import_proxy)  # TLS, HTTP/2, DNS: while the loop serves QEMU's restore
        from ..net.proxy import NetworkProxy

        # The proxy reads $MATCHLOCK_UPSTREAM_CA_FILE (stand-in servers in tests) once, and only when it intercepts.
        self.proxy = NetworkProxy(self.namespace, self.policy, list(self.config.dns_servers))
        await self.proxy.start()

    @property
    def ca_pem(self) -> str:
        return self.proxy.ca.pem if self.proxy is not None and self.proxy.ca is not None else ""

    def machine_network(self) -> MachineNetwork:
        assert self.namespace.tap_fd is not None, "start() first"
        return MachineNetwork(mac=ns.GUEST_MAC, tap_fd=self.namespace.tap_fd)

    def guest_network(self) -> GuestNetwork:
        return GuestNetwork("eth0", ns.GUEST_ADDRESS, ns.PREFIX_LENGTH, ns.GATEWAY, self.config.mtu)

    def exec_environment(self, ca_bundle: str | None) -> dict[str, str]:
        """Secret placeholders, and where TLS clients find the sandbox CA when intercepting.

        Where the image has a system bundle, the CA was appended to it and the
        variables point there, so TLS to servers the proxy passes through
        (ports other than 443) still verifies; NODE_EXTRA_CA_CERTS adds to
        Node's own roots, so it always names the CA alone.
        """
        env: dict[str, str] = {}
        if self.ca_pem:
            bundle = ca_bundle or CA_PATH
            env.update({name: bundle for name in CA_ENV_VARS})
            # The CA alone: CA_PATH, or where the guest put it because a VFS mount covers CA_PATH.
            env["NODE_EXTRA_CA_CERTS"] = ca_bundle if ca_bundle in CA_FALLBACK_PATHS else CA_PATH
        env.update(self.policy.guest_environment())
        return env

    async def aclose(self) -> None:
        """Proxy first (its connections end), then the namespace; idempotent, and the namespace is
        released even when closing the proxy fails."""
        try:
            if self.proxy is not None:
                await self.proxy.aclose()
        finally:
            await self.namespace.aclose()
