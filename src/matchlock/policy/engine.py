"""The network policy of one sandbox: who may be reached, and what is added on the way out.

The proxy asks this engine three things for every connection or request:
- may this name be reached, on this port (allow-list globs, each optionally
  `:PORT` for that port only; an empty list allows all)?
- may this address be dialled (the host's own addresses, loopback, "this
  network", broadcast and multicast are refused in every mode; private,
  link-local and ULA ranges unless private addresses are allowed; always
  checked on the address actually dialled, so a DNS answer that changes
  between lookups gains nothing)?
- what does the request look like after interception rules and secret
  substitution, or must it be refused (403)?

Secret values live only here, in memory. The guest sees placeholders; a
placeholder is swapped for the value only in header values and the query
string of requests to that secret's hosts, and a placeholder sent anywhere
else blocks the request.
"""

from __future__ import annotations

import dataclasses
import secrets as random_tokens
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..api.events import NetworkEvent
from ..api.network import PLACEHOLDER_PREFIX, NetworkConfig, validate_host_glob
from .hosts import Address, any_entry_matches, is_blocked_address, is_match_all, is_never_dialled, normalise_host

if TYPE_CHECKING:
    from .body_filters import BodyFilter
    from .rules import InterceptionRules


class Blocked(Exception):
    """The request or connection is refused by policy."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class HttpRequest:
    """One HTTP request as the proxy sees it, independent of HTTP/1.1 or HTTP/2."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str  # raw, without '?'
    headers: list[tuple[str, str]] = field(default_factory=list)
    # The request after interception rules but before secret substitution:
    # all that SDK callbacks may ever see (set by the rules engine when needed).
    before_secrets: HttpRequest | None = field(default=None, repr=False, compare=False)

    @property
    def target(self) -> str:
        return self.path + ("?" + self.query if self.query else "")

    @property
    def url(self) -> str:
        default = 443 if self.scheme == "https" else 80
        authority = self.host if self.port == default else f"{self.host}:{self.port}"
        return f"{self.scheme}://{authority}{self.target}"

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)


@dataclass(frozen=True)
class _Secret:
    name: str
    value: str
    hosts: tuple[str, ...]
    placeholder: str


class NetworkPolicy:
    def __init__(
        self,
        network: NetworkConfig,
        emit: Callable[[NetworkEvent], None] | None = None,
        rules: InterceptionRules | None = None,
    ) -> None:
        self.block_private = network.block_private_ips
        self.intercepting = network.intercepting
        self._emit = emit
        self._lock = threading.Lock()
        self._secrets = tuple(
            _Secret(name, cfg.value, cfg.hosts, cfg.placeholder or self._new_placeholder())
            for name, cfg in network.secrets.items()
        )
        # As in matchlock, a secret's hosts join the allow-list: a sandbox
        # given a key for one API reaches that API and nothing else.
        hosts = list(network.allowed_hosts)
        for secret in self._secrets:
            hosts += [h for h in secret.hosts if h not in hosts]
        self._allowed: list[str] = hosts
        self._rules = rules

    @staticmethod
    def _new_placeholder() -> str:
        return PLACEHOLDER_PREFIX + random_tokens.token_hex(16)

    # --- allow-list ----------------------------------------------------------------

    @property
    def allowed_hosts(self) -> list[str]:
        with self._lock:
            return list(self._allowed)

    def add_hosts(self, hosts) -> list[str]:
        added = []
        with self._lock:
            for host in hosts:
                host = validate_host_glob(host.strip(), "host")
                if host not in self._allowed and host not in added:
                    added.append(host)
            self._allowed += added
        return added

    def remove_hosts(self, hosts) -> list[str]:
        wanted = {h.strip() for h in hosts}
        with self._lock:
            removed = [h for h in self._allowed if h in wanted]
            self._allowed = [h for h in self._allowed if h not in wanted]
        return removed

    def host_allowed(self, host: str, port: int | None = None) -> bool:
        """`port=None` asks about the name alone (DNS): an entry for any port of it will do."""
        patterns = self.allowed_hosts
        return not patterns or any_entry_matches(patterns, host, port)

    def explicitly_allowed(self, host: str, port: int | None = None) -> bool:
        """Named by the allow-list itself (not merely allowed because the list is empty, or by `*`)."""
        return any_entry_matches([p for p in self.allowed_hosts if not is_match_all(p)], host, port)

    def check_host(self, host: str, port: int | None = None) -> None:
        if self.host_allowed(host, port):
            return
        if port is not None and self.host_allowed(host):  # the list names this host, on other ports only
            raise Blocked(f"host {normalise_host(host)} port {port} is not in the allow-list")
        raise Blocked(f"host {normalise_host(host)} is not in the allow-list")

    def address_allowed(
        self, address: str, host_addresses: frozenset[Address] = frozenset(), port: int | None = None
    ) -> bool:
        """Whether `address` may be dialled.

        The host's own addresses (`host_addresses`, read by the caller as it
        dials: interfaces change) and the NEVER_DIALLED ranges are refused in
        every mode; private ranges while block_private_ips is on. The
        allow-list naming the address explicitly overrides both."""
        if is_never_dialled(address, host_addresses) or (self.block_private and is_blocked_address(address)):
            return self.explicitly_allowed(address, port)
        return True

    def check_address(
        self, address: str, host_addresses: frozenset[Address] = frozenset(), port: int | None = None
    ) -> None:
        if not self.address_allowed(address, host_addresses, port):
            raise Blocked(f"{address} is a private or local address, or one of the host's own")

    def usable_addresses(
        self, addresses, host_addresses: frozenset[Address] = frozenset(), port: int | None = None
    ) -> list[str]:
        return [a for a in addresses if self.address_allowed(a, host_addresses, port)]

    # --- secrets -------------------------------------------------------------------

    def guest_environment(self) -> dict[str, str]:
        return {s.name: s.placeholder for s in self._secrets}

    def apply_secrets(self, request: HttpRequest) -> None:
        """Swap placeholders for values, in place; raise Blocked on a placeholder sent elsewhere."""
        for secret in self._secrets:
            in_headers = any(secret.placeholder in v for _, v in request.headers)
            in_url = secret.placeholder in request.target or secret.placeholder in request.host
            if not (in_headers or in_url):
                continue
            if secret.hosts and not any_entry_matches(secret.hosts, request.host, request.port):
                raise Blocked(f"secret placeholder of {secret.name} sent to unauthorized host {request.host}")
            request.headers = [(k, v.replace(secret.placeholder, secret.value)) for k, v in request.headers]
            request.query = request.query.replace(secret.placeholder, secret.value)

    def redact(self, text: str) -> str:
        """Anything that may reach a log or an event goes through here first."""
        for secret in self._secrets:
            text = text.replace(secret.value, f"[{secret.name}]")
        return text

    # --- requests ------------------------------------------------------------------

    async def prepare_request(self, request: HttpRequest) -> HttpRequest:
        """Before-rules, then secrets (so placeholders set by a rule are substituted too).

        Async because a rule may wait for an SDK callback."""
        self.check_host(request.host, request.port)
        if self._rules is not None:
            await self._rules.before(request)
        self.apply_secrets(request)
        return request

    async def prepare_response(
        self, request: HttpRequest, status: int, headers: list[tuple[str, str]]
    ) -> tuple[list[tuple[str, str]], BodyFilter | None]:
        """After-rules: the headers to send to the guest and an optional body filter
        (None streams the body untouched)."""
        if self._rules is None:
            return headers, None
        return await self._rules.after(request, status, headers)

    def record(self, event: NetworkEvent) -> None:
        """Emit a network event, with secret values redacted from everything it says."""
        if self._emit is None:
            return
        self._emit(dataclasses.replace(event, url=self.redact(event.url), host=normalise_host(event.host),
                                       block_reason=self.redact(event.block_reason)))  # fmt: skip
