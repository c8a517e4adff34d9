"""The network policy of one sandbox: who may be reached, and what is added on the way out.

The proxy asks this engine three things for every connection or request:
- may this name be reached (allow-list globs; an empty list allows all)?
- may this address be dialled (private, loopback, link-local and ULA ranges
  are refused in every mode, checked on the address actually dialled, so a
  DNS answer that changes between lookups gains nothing)?
- what does the request look like after interception rules and secret
  substitution, or must it be refused (403)?

Secret values live only here, in memory. The guest sees placeholders; a
placeholder is swapped for the value only in header values and the query
string of requests to that secret's hosts, and a placeholder sent anywhere
else blocks the request.
"""

from __future__ import annotations

import secrets as random_tokens
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..api.events import NetworkEvent
from ..api.network import PLACEHOLDER_PREFIX, NetworkConfig, validate_host_glob
from .hosts import any_glob_matches, is_blocked_address, normalise_host


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
    def __init__(self, network: NetworkConfig, emit: Callable[[NetworkEvent], None] | None = None) -> None:
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
        self.rules = None  # interception rules engine, attached by the proxy when configured

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

    def host_allowed(self, host: str) -> bool:
        patterns = self.allowed_hosts
        return not patterns or any_glob_matches(patterns, host)

    def explicitly_allowed(self, host: str) -> bool:
        """Named by the allow-list itself (not merely allowed because the list is empty)."""
        patterns = self.allowed_hosts
        return bool(patterns) and any_glob_matches([p for p in patterns if p != "*"], host)

    def check_host(self, host: str) -> None:
        if not self.host_allowed(host):
            raise Blocked(f"host {normalise_host(host)} is not in the allow-list")

    def address_allowed(self, address: str) -> bool:
        """A private address is dialled only when the allow-list names it explicitly."""
        if not self.block_private or not is_blocked_address(address):
            return True
        return self.explicitly_allowed(address)

    def check_address(self, address: str) -> None:
        if not self.address_allowed(address):
            raise Blocked(f"{address} is a private or local address")

    def usable_addresses(self, addresses) -> list[str]:
        return [a for a in addresses if self.address_allowed(a)]

    # --- secrets -------------------------------------------------------------------

    def guest_environment(self) -> dict[str, str]:
        return {s.name: s.placeholder for s in self._secrets}

    @property
    def secret_names(self) -> list[str]:
        return [s.name for s in self._secrets]

    def apply_secrets(self, request: HttpRequest) -> None:
        """Swap placeholders for values, in place; raise Blocked on a placeholder sent elsewhere."""
        for secret in self._secrets:
            in_headers = any(secret.placeholder in v for _, v in request.headers)
            in_url = secret.placeholder in request.target or secret.placeholder in request.host
            if not (in_headers or in_url):
                continue
            if secret.hosts and not any_glob_matches(secret.hosts, request.host):
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
        self.check_host(request.host)
        if self.rules is not None:
            await self.rules.before(request)
        self.apply_secrets(request)
        return request

    async def prepare_response(self, request: HttpRequest, status: int, headers: list[tuple[str, str]]):
        """After-rules: the headers to send to the guest and an optional body filter
        (`feed(bytes) -> bytes`, `finish() -> bytes`), or None to stream the body untouched."""
        if self.rules is None:
            return headers, None
        return await self.rules.after(request, status, headers)

    def event(self, *, method: str = "", url: str = "", host: str = "", status: int = 0, request_bytes: int = 0,
              response_bytes: int = 0, started: float | None = None, blocked: bool = False,
              reason: str = "") -> None:  # fmt: skip
        if self._emit is None:
            return
        self._emit(
            NetworkEvent(
                method=method,
                url=self.redact(url),
                host=normalise_host(host),
                status_code=status,
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                duration_ms=int((time.monotonic() - started) * 1000) if started else 0,
                blocked=blocked,
                block_reason=self.redact(reason),
            )
        )
