"""Network configuration of a sandbox, in the wire format of `create`'s `network` object."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .errors import UsageError

DEFAULT_MTU = 1500
PLACEHOLDER_PREFIX = "SANDBOX_SECRET_"
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GLOB = re.compile(r"^[A-Za-z0-9*._:\[\]-]+$")
PHASES = ("before", "after")
ACTIONS = ("allow", "block", "mutate")


def validate_host_glob(pattern: str, what: str = "--allow-host") -> str:
    pattern = pattern.strip()
    if not pattern or len(pattern) > 253 or not _GLOB.match(pattern):
        raise UsageError(f"invalid {what} {pattern!r}: use a host name, an IP address or a glob such as *.example.com")
    return pattern


@dataclass(frozen=True)
class HostMapping:
    host: str
    ip: str

    @classmethod
    def parse(cls, spec: str) -> HostMapping:
        host, sep, ip = spec.partition(":")
        if not sep or not host or not ip:
            raise UsageError(f"invalid add-host mapping {spec!r}: expected host:ip")
        return cls.validated(host, ip)

    @classmethod
    def validated(cls, host: str, ip: str) -> HostMapping:
        if any(c.isspace() for c in host) or ":" in host or not host:
            raise UsageError(f"invalid add-host mapping {host!r}: the host name may not contain ':' or spaces")
        try:
            normalised = str(ipaddress.ip_address(ip.strip("[]")))
        except ValueError:
            raise UsageError(f"invalid add-host mapping {host}:{ip}: {ip!r} is not an IP address") from None
        return cls(host, normalised)


@dataclass(frozen=True)
class SecretConfig:
    """A secret the guest only sees as a placeholder; the proxy adds the value for `hosts`."""

    value: str
    hosts: tuple[str, ...] = ()
    placeholder: str = ""

    @classmethod
    def parse_flag(cls, spec: str, environ) -> tuple[str, SecretConfig]:
        """`NAME=VALUE@host1,host2`, or `NAME@hosts` taking VALUE from the environment."""
        head, sep, hosts = spec.rpartition("@")
        if not sep or not head:
            raise UsageError(
                f"invalid --secret {spec.split('=', 1)[0]!r}: expected NAME=VALUE@host[,host] or NAME@host"
            )
        name, has_value, value = head.partition("=")
        if not _ENV_KEY.match(name):
            raise UsageError(f"invalid --secret name {name!r}: use letters, digits and '_'")
        if not has_value:
            value = environ.get(name, "")
            if not value:
                raise UsageError(f"invalid --secret {name}: ${name} is empty or unset in the host environment")
        host_list = tuple(validate_host_glob(h, "--secret host") for h in hosts.split(",") if h.strip())
        if not host_list:
            raise UsageError(f"invalid --secret {name}: name at least one host after '@'")
        return name, cls(value=value, hosts=host_list)


@dataclass(frozen=True)
class BodyReplacement:
    find: str
    replace: str


@dataclass(frozen=True)
class InterceptionRule:
    name: str = ""
    phase: str = "before"
    hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    path: str = ""
    action: str = "allow"
    callback_id: str = ""
    timeout_ms: int = 0
    set_headers: dict[str, str] = field(default_factory=dict)
    delete_headers: tuple[str, ...] = ()
    set_query: dict[str, str] = field(default_factory=dict)
    delete_query: tuple[str, ...] = ()
    rewrite_path: str = ""
    set_response_headers: dict[str, str] = field(default_factory=dict)
    delete_response_headers: tuple[str, ...] = ()
    body_replacements: tuple[BodyReplacement, ...] = ()

    @classmethod
    def from_json(cls, data: dict) -> InterceptionRule:
        def strings(key: str) -> tuple[str, ...]:
            value = data.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"interception rule {key!r} must be a list of strings")
            return tuple(value)

        def mapping(key: str) -> dict[str, str]:
            value = data.get(key) or {}
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise UsageError(f"interception rule {key!r} must map strings to strings")
            return dict(value)

        phase = data.get("phase") or "before"
        action = data.get("action") or "allow"
        if phase not in PHASES:
            raise UsageError(f"invalid interception rule phase {phase!r}: use before or after")
        if action not in ACTIONS:
            raise UsageError(f"invalid interception rule action {action!r}: use allow, block or mutate")
        timeout = data.get("timeout_ms") or 0
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise UsageError(f"invalid interception rule timeout_ms {timeout!r}")
        replacements = data.get("body_replacements") or []
        if not isinstance(replacements, list):
            raise UsageError("interception rule 'body_replacements' must be a list")
        parsed_replacements = []
        for item in replacements:
            if not isinstance(item, dict) or not isinstance(item.get("find"), str):
                raise UsageError("each body replacement needs a string 'find'")
            if item["find"]:  # an empty find would match everywhere: dropped, as in matchlock
                parsed_replacements.append(BodyReplacement(item["find"], str(item.get("replace", ""))))
        return cls(
            name=str(data.get("name") or ""),
            phase=phase,
            hosts=tuple(validate_host_glob(h, "interception rule host") for h in strings("hosts")),
            methods=tuple(m.upper() for m in strings("methods")),
            path=str(data.get("path") or ""),
            action=action,
            callback_id=str(data.get("callback_id") or ""),
            timeout_ms=timeout,
            set_headers=mapping("set_headers"),
            delete_headers=strings("delete_headers"),
            set_query=mapping("set_query"),
            delete_query=strings("delete_query"),
            rewrite_path=str(data.get("rewrite_path") or ""),
            set_response_headers=mapping("set_response_headers"),
            delete_response_headers=strings("delete_response_headers"),
            body_replacements=tuple(parsed_replacements),
        )


@dataclass(frozen=True)
class InterceptionConfig:
    rules: tuple[InterceptionRule, ...] = ()
    callback_socket: str = ""


@dataclass(frozen=True)
class NetworkConfig:
    hostname: str = ""
    dns_servers: tuple[str, ...] = ()
    add_hosts: tuple[HostMapping, ...] = ()
    no_network: bool = False
    allowed_hosts: tuple[str, ...] = ()
    block_private_ips: bool = True
    intercept: bool = False
    secrets: dict[str, SecretConfig] = field(default_factory=dict)
    mtu: int = DEFAULT_MTU
    interception: InterceptionConfig | None = None

    @property
    def intercepting(self) -> bool:
        """TLS interception and HTTP policy: on with an allow-list, secrets, rules or when forced."""
        return not self.no_network and bool(self.intercept or self.interception or self.allowed_hosts or self.secrets)

    def validate(self) -> None:
        if self.hostname and (len(self.hostname) > 64 or not _HOSTNAME.match(self.hostname)):
            raise UsageError(f"invalid --hostname {self.hostname!r}: use letters, digits, '-' and '.'")
        for server in self.dns_servers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise UsageError(f"invalid --dns-servers entry {server!r}: must be an IP address") from None
        if isinstance(self.mtu, bool) or not isinstance(self.mtu, int) or not 576 <= self.mtu <= 65535:
            raise UsageError(f"invalid --mtu {self.mtu!r}: must be between 576 and 65535")
        if self.no_network and (self.allowed_hosts or self.secrets or self.intercept or self.interception):
            raise UsageError("--no-network cannot be combined with --allow-host, --secret or --network-intercept")
        for pattern in self.allowed_hosts:
            validate_host_glob(pattern)
        for name, secret in self.secrets.items():
            if not _ENV_KEY.match(name):
                raise UsageError(f"invalid secret name {name!r}: use letters, digits and '_'")
            if not secret.value:
                raise UsageError(f"secret {name} has an empty value")
