"""Sandbox configuration: the `create` parameters of the RPC, and what `run` builds.

Field names follow the published wire format (`api.Config`), so the same
dataclasses parse RPC params and serialise state. Every value is validated
here, once, with an error that names the field, the bad value and the fix.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from .disks import DiskMount, validate_disks
from .errors import UsageError
from .image import ImageConfig
from .network import ENV_NAME, NetworkConfig
from .vfs import VFSConfig, check_disk_shadowing

DEFAULT_CPUS = 1.0
DEFAULT_MEMORY_MB = 512
DEFAULT_DISK_SIZE_MB = 5120
DEFAULT_TIMEOUT_SECONDS = 300
DEFAULT_DNS_SERVERS = ("8.8.8.8", "8.8.4.4")
MIN_MEMORY_MB = 128
MIN_DISK_SIZE_MB = 64
MAX_DISK_SIZE_MB = 1024 * 1024  # 1 TiB, sparse; ext4 files stop at 16 TiB
MIN_CPUS = 0.1  # below this a quota leaves the guest too little time to answer at all


def host_cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def host_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


@dataclass(frozen=True)
class Resources:
    cpus: float = DEFAULT_CPUS
    memory_mb: int = DEFAULT_MEMORY_MB
    disk_size_mb: int = DEFAULT_DISK_SIZE_MB
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS

    def validate(self) -> None:
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, (int, float)) or not math.isfinite(self.cpus):
            raise UsageError(f"invalid --cpus {self.cpus!r}: must be a finite number")
        if self.cpus < MIN_CPUS:
            raise UsageError(f"invalid --cpus {self.cpus:g}: must be at least {MIN_CPUS:g}")
        if math.ceil(self.cpus) > host_cpu_count():
            raise UsageError(
                f"invalid --cpus {self.cpus:g}: this host has {host_cpu_count()} CPUs; use at most that many"
            )
        _check_int("--memory", self.memory_mb, MIN_MEMORY_MB, host_memory_mb(), "MB")
        _check_int("--disk-size", self.disk_size_mb, MIN_DISK_SIZE_MB, MAX_DISK_SIZE_MB, "MB")
        _check_int("--timeout", self.timeout_seconds, 0, 365 * 24 * 3600, "seconds")


def _check_int(flag: str, value, lo: int, hi: int, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"invalid {flag} {value!r}: must be a whole number of {unit}")
    if not lo <= value <= hi:
        raise UsageError(f"invalid {flag} {value}: must be between {lo} and {hi} {unit}")


@dataclass(frozen=True)
class SandboxConfig:
    image: str
    privileged: bool = False
    resources: Resources = field(default_factory=Resources)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    env: dict[str, str] = field(default_factory=dict)
    image_config: ImageConfig = field(default_factory=ImageConfig)
    extra_disks: tuple[DiskMount, ...] = ()
    vfs: VFSConfig = field(default_factory=VFSConfig)

    def validate(self) -> None:
        if not self.image:
            raise UsageError("image is required (e.g., alpine:latest)")
        self.resources.validate()
        self.network.validate()
        for key in self.env:
            validate_env_key(key)
        validate_disks(self.extra_disks)
        self.vfs.validate()
        check_disk_shadowing(self.vfs, tuple(disk.guest_mount for disk in self.extra_disks))


def validate_env_key(key: str) -> None:
    if not ENV_NAME.match(key):
        raise UsageError(f"invalid environment variable name {key!r}: use letters, digits and '_'")


def parse_env_assignment(entry: str, environ: dict[str, str] | None = None, origin: str = "-e") -> tuple[str, str]:
    """`KEY=VALUE`, or `KEY` to copy the value from the host environment."""
    key, sep, value = entry.partition("=")
    key = key.strip()
    validate_env_key(key)
    if sep:
        return key, value
    source = os.environ if environ is None else environ
    if key not in source:
        raise UsageError(f"invalid environment variable {key} ({origin}): it is not set in the host environment")
    return key, source[key]


def parse_env_file(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read --env-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"--env-file {path} is not UTF-8 text (byte {exc.start}); fix: pass a KEY=VALUE text file"
        ) from None
    entries = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            entries.append(parse_env_assignment(stripped, origin=f"{path}:{number}"))
        except UsageError as exc:
            raise UsageError(f"{path}:{number}: {exc}") from None
    return entries


REDACTED = "[redacted]"


def public_config(config: SandboxConfig) -> dict:
    """The config as stored in state and shown by `get`/`inspect`: no secret values.

    Environment values can carry credentials, so only their names are kept.
    """
    network = config.network
    return {
        "image": config.image,
        "privileged": config.privileged,
        "resources": {
            "cpus": config.resources.cpus,
            "memory_mb": config.resources.memory_mb,
            "disk_size_mb": config.resources.disk_size_mb,
            "timeout_seconds": config.resources.timeout_seconds,
        },
        "network": {
            "no_network": network.no_network,
            "allowed_hosts": list(network.allowed_hosts),
            "block_private_ips": network.block_private_ips,
            "intercept": network.intercept,
            # Secret names and hosts only: values never reach disk.
            "secrets": {name: {"hosts": list(s.hosts)} for name, s in network.secrets.items()},
            "hostname": network.hostname,
            "dns_servers": list(network.dns_servers),
            "add_hosts": [{"host": m.host, "ip": m.ip} for m in network.add_hosts],
            "mtu": network.mtu,
            "interception_rules": len(network.interception.rules) if network.interception else 0,
        },
        "env": {key: REDACTED for key in config.env},
        "image_config": {
            **config.image_config.to_json(),
            **({"env": {k: REDACTED for k in config.image_config.env}} if config.image_config.env else {}),
        },
        "extra_disks": [disk.to_json() for disk in config.extra_disks],  # paths and mount points: nothing secret
        **({"vfs": config.vfs.to_json()} if config.vfs.active else {}),
    }


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str, flag: str = "duration") -> float:
    """Go-style durations ("1m30s", "500ms", "2h"); a bare number is seconds. Returns seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value:
            raise UsageError(f"invalid {flag} {text!r}: use a duration such as 10s, 1m30s or 500ms") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise UsageError(f"invalid {flag} {text!r}: must be zero or positive")
    return seconds
