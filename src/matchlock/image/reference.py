"""Image references, normalised the way Docker does.

`alpine` -> `docker.io/library/alpine:latest`, `ghcr.io/o/a@sha256:...`,
`localhost:5000/team/img`. The canonical string is the registry-cache key,
so every spelling of one image shares one cache entry.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from ..api.errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
# ~/.docker/config.json keys Docker Hub credentials by its legacy index URL.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
DEFAULT_TAG = "latest"
INSECURE_ENV = "MATCHLOCK_INSECURE_REGISTRIES"

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as users write it; docker.io for Docker Hub
    repository: str  # e.g. library/alpine
    tag: str  # "" when only a digest was given
    digest: str  # "sha256:<hex>" or ""

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def canonical(self) -> str:
        """The cache key: a digest pins the content, so it wins over a tag."""
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"

    @property
    def manifest_ref(self) -> str:
        return self.digest or self.tag

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        return self.canonical


def parse(text: str) -> Reference:
    """Parse and normalise an image reference; UsageError says what is wrong."""
    original = text
    if not text or text != text.strip() or len(text) > 4 * _MAX_NAME:
        raise UsageError(f"invalid image reference {original!r}")
    digest = ""
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise UsageError(f"invalid image reference {original!r}: digest must be sha256:<64 hex digits>")
    tag = ""
    slash, colon = text.rfind("/"), text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise UsageError(f"invalid image reference {original!r}: bad tag {tag!r}")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _HOST.match(registry):
            raise UsageError(f"invalid image reference {original!r}: bad registry host {registry!r}")
        if registry == "index.docker.io":
            registry = DOCKER_HUB
    else:
        registry, path = DOCKER_HUB, text
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or len(path) > _MAX_NAME or not all(_COMPONENT.match(part) for part in path.split("/")):
        raise UsageError(
            f"invalid image reference {original!r}: repository names are lowercase letters, digits and . _ - separators"
        )
    if not tag and not digest:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def try_parse(text: str) -> Reference | None:
    try:
        return parse(text)
    except UsageError:
        return None


def host_only(registry: str) -> str:
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def is_loopback(registry: str) -> bool:
    host = host_only(registry)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_registries() -> set[str]:
    return {item.strip() for item in os.environ.get(INSECURE_ENV, "").split(",") if item.strip()}


def listed_insecure(registry: str) -> bool:
    listed = insecure_registries()
    return registry in listed or host_only(registry) in listed


def http_allowed(registry: str) -> bool:
    """Plain HTTP only for loopback registries or ones the user listed as insecure."""
    return is_loopback(registry) or listed_insecure(registry)
