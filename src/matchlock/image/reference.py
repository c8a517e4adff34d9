"""Image references, normalised the way Docker does.

`alpine` -> `docker.io/library/alpine:latest`, `ghcr.io/o/a@sha256:...`,
`localhost:5000/team/img`. The canonical string is the registry-cache key,
so every spelling of one image shares one cache entry.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass

from ..api.errors import UsageError
from ..api.image import DEFAULT_IMAGE

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
EXAMPLE = "team/app:1.0"


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


def parse(text: str, what: str = "image reference") -> Reference:
    """Parse and normalise an image reference; UsageError names the value and the rule it broke.

    `what` names the value in errors: local tags (`image import`, `pull -t`) obey the same grammar.
    """
    original = _shown(text)
    if not text or text != text.strip() or len(text) > 4 * _MAX_NAME:
        raise UsageError(
            f"invalid {what} {original!r}: it must be a non-empty reference without spaces, e.g. {EXAMPLE}"
        )
    digest = ""
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise UsageError(f"invalid {what} {original!r}: digest must be sha256:<64 hex digits>")
    tag = ""
    slash, colon = text.rfind("/"), text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.match(tag):
            raise UsageError(
                f"invalid {what} {original!r}: bad tag {_shown(tag)!r}; a tag is 1-128 letters, digits, _ . - "
                f"and does not start with . or -, e.g. {EXAMPLE}"
            )
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _HOST.match(registry):
            raise UsageError(
                f"invalid {what} {original!r}: bad registry host {_shown(registry)!r}; write host[:port]/repository, "
                "e.g. localhost:5000/team/app:1.0"
            )
        if registry == "index.docker.io":
            registry = DOCKER_HUB
    else:
        registry, path = DOCKER_HUB, text
    if not path:
        raise UsageError(f"invalid {what} {original!r}: the repository name is missing, e.g. {EXAMPLE}")
    # Docker bounds the name as written, before `library/` is implied.
    if len(text) > _MAX_NAME:
        raise UsageError(f"invalid {what} {original!r}: the name is longer than {_MAX_NAME} characters")
    if not all(_COMPONENT.match(part) for part in path.split("/")):
        raise UsageError(
            f"invalid {what} {original!r}: repository names are lowercase letters and digits "
            f"separated by single . _ - or /, e.g. {EXAMPLE}"
        )
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not tag and not digest:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def _shown(text: str) -> str:
    """The value as errors quote it: a runaway value is cut, not echoed in full."""
    return text if len(text) <= 100 else text[:100] + "..."


def validate_tag(tag: str) -> str:
    """A name to look an image up by: the grammar `pull` accepts, so a tag can never become a path."""
    parse(tag, "image tag")
    return tag


def is_builtin(name: str) -> bool:
    """Whether `name` is any spelling of the built-in image's reserved name."""
    ref = try_parse(name)
    return ref is not None and ref.canonical == parse(DEFAULT_IMAGE).canonical


def validate_new_tag(tag: str) -> str:
    """A tag an image is saved under (`image import`, `pull -t`): not a digest, never the built-in name."""
    if parse(tag, "image tag").digest:
        raise UsageError(f"invalid image tag {_shown(tag)!r}: a digest names content, not a tag; use e.g. {EXAMPLE}")
    if is_builtin(tag):
        raise UsageError(
            f"image tag {tag!r} is reserved for the built-in image; choose another tag, e.g. matchlock/busybox:mine "
            "(`matchlock setup` rebuilds the built-in image)"
        )
    return tag


def close_matches(name: str, known: list[str], limit: int = 5) -> list[str]:
    """Local names a typo of `name` probably meant: the same repository first, then similar spellings."""
    ref = try_parse(name)
    same_repo = []
    if ref is not None:
        same_repo = [k for k in known if (other := try_parse(k)) is not None and other.name == ref.name]
    similar = difflib.get_close_matches(name, known, n=limit, cutoff=0.6)
    return list(dict.fromkeys(same_repo + similar))[:limit]


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
