"""Wire a sandbox's network together: namespace, policy, proxy, and what the guest is told."""

from __future__ import annotations

from collections.abc import Callable

from ..api.events import NetworkEvent
from ..api.network import NetworkConfig
from ..net import namespace as ns
from ..net.proxy import NetworkProxy
from ..policy.engine import NetworkPolicy
from ..vm.machine import MachineNetwork
from ..wire.agent import GuestNetwork

CA_PATH = "/etc/ssl/certs/matchlock-ca.crt"
CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")


class SandboxNetwork:
    def __init__(self, config: NetworkConfig, emit: Callable[[NetworkEvent], None]) -> None:
        self.config = config
        self.policy = NetworkPolicy(config, emit)
        self.namespace = ns.SandboxNamespace(config.mtu)
        self.proxy: NetworkProxy | None = None

    async def start(self) -> None:
        self.namespace.create()
        if self.config.interception is not None and self.config.interception.rules:
            from ..policy.rules import InterceptionRules  # only sandboxes with rules pay for it

            self.policy.rules = InterceptionRules(self.config.interception)
        self.proxy = NetworkProxy(self.namespace, self.policy, list(self.config.dns_servers))
        await self.proxy.start()

    @property
    def ca_pem(self) -> str:
        return self.proxy.ca.pem if self.proxy is not None and self.proxy.ca is not None else ""

    def machine_network(self) -> MachineNetwork:
        wrapper, fds = self.namespace.qemu_wrapper()
        return MachineNetwork(tap=ns.TAP, mac=ns.GUEST_MAC, wrapper=tuple(wrapper), pass_fds=fds)

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
            env["NODE_EXTRA_CA_CERTS"] = CA_PATH
        env.update(self.policy.guest_environment())
        return env

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        self.namespace.close()
