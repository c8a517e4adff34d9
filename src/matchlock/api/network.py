"""Network configuration of a sandbox, in the wire format of `create`'s `network` object."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal, cast

from .errors import UsageError

DEFAULT_MTU = 1500
PLACEHOLDER_PREFIX = "SANDBOX_SECRET_"
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
# An environment variable name: also what a secret may be called (the guest sees it as one).
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GLOB = re.compile(r"^[A-Za-z0-9*._-]+$")
RulePhase = Literal["before", "after"]
RuleAction = Literal["allow", "block", "mutate"]
RULE_PHASES: tuple[RulePhase, ...] = ("before", "after")
RULE_ACTIONS: tuple[RuleAction, ...] = ("allow", "block", "mutate")


def shown(value: str, limit: int = 80) -> str:
    """A user's value quoted for an error message, cut short when long."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def split_host_entry(entry: str) -> tuple[str, int | None]:
    """(host glob, port or None) of an allow-list entry that passed `validate_host_glob`.

    `host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 address (more than one ':', no port).
    """
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest else None
    if entry.count(":") != 1:
        return entry, None
    host, _, port = entry.partition(":")
    return host, int(port)


def _check_host_entry(entry: str) -> str:
    """Why `entry` is not a host glob with an optional port, or "" when it is one."""
    if entry.startswith("["):
        host, closed, rest = entry[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            return "write an IPv6 address as [address] or [address]:port"
        port = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} in brackets is not an IPv6 address"
    elif entry.count(":") > 1:
        try:
            ipaddress.IPv6Address(entry)
        except ValueError:
            return "only an IPv6 address may hold several ':'; a port goes after [address]"
        return ""
    else:
        host, sep, port_text = entry.partition(":")
        port = port_text if sep else None
        if not host or len(host) > 253 or not _GLOB.match(host):
            return "use a host name, an IP address or a glob such as *.example.com, optionally with :PORT"
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f"the port {port!r} must be a number from 1 to 65535 (host:PORT allows only that port)"
    return ""


def validate_host_glob(pattern: str, what: str = "--allow-host") -> str:
    """A host glob, optionally with `:PORT` (then only that port is allowed); raise UsageError otherwise."""
    pattern = pattern.strip()
    if not pattern:
        raise UsageError(f"invalid {what} '': empty host; name one such as api.example.com or *.example.com")
    problem = _check_host_entry(pattern)
    if problem:
        raise UsageError(f"invalid {what} {shown(pattern)}: {problem}")
    return pattern


def parse_host_list(values, what: str = "--allow-host") -> tuple[str, ...]:
    """Comma-separated host globs from repeated flags, validated, first occurrence kept; an empty
    entry (`--allow-host ''`, `a,,b`) is an error, not a no-op."""
    hosts: list[str] = []
    for value in values:
        for item in value.split(","):
            host = validate_host_glob(item, what)
            if host not in hosts:
                hosts.append(host)
    return tuple(hosts)


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
        if not ENV_NAME.match(name):
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
    phase: RulePhase = "before"
    hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    path: str = ""
    action: RuleAction = "allow"
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

    def __post_init__(self) -> None:
        # Checked once here, for rules from JSON and from Python alike; the engine trusts the types.
        if self.phase not in RULE_PHASES:
            raise UsageError(f"invalid interception rule phase {self.phase!r}: use before or after")
        if self.action not in RULE_ACTIONS:
            raise UsageError(f"invalid interception rule action {self.action!r}: use allow, block or mutate")

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

        phase = cast(RulePhase, data.get("phase") or "before")  # validated by __post_init__
        action = cast(RuleAction, data.get("action") or "allow")
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
            if not ENV_NAME.match(name):
                raise UsageError(f"invalid secret name {shown(name)}: use letters, digits and '_'")
            if not secret.value:
                raise UsageError(f"secret {name} has an empty value")
        validate_placeholders(self.secrets)


_PLACEHOLDER = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII: it travels in headers and the environment


def validate_placeholders(secrets: dict[str, SecretConfig]) -> None:
    """Custom placeholders must be distinct tokens that give nothing away.

    One inside another would make substitution depend on order; one
    containing its own or another secret's value would show that value to
    the guest. Messages name the secrets, never a value."""
    custom = {name: s.placeholder for name, s in secrets.items() if s.placeholder}
    for name, placeholder in custom.items():
        if not _PLACEHOLDER.match(placeholder):
            raise UsageError(
                f"invalid placeholder for secret {name}: use 1 to 256 printable ASCII characters, no spaces"
            )
        for other, secret in secrets.items():
            if secret.value in placeholder:
                raise UsageError(f"the placeholder for secret {name} contains the value of secret {other}: "
                                 "the guest would see it; choose another placeholder")  # fmt: skip
    names = sorted(custom)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = custom[first], custom[second]
            if a in b or b in a:
                raise UsageError(f"the placeholders of secrets {first} and {second} overlap: one contains the "
                                 "other; make them distinct")  # fmt: skip
