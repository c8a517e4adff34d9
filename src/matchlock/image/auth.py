"""Registry credentials and authentication challenges.

Credentials come from Docker's client config (`$DOCKER_CONFIG/config.json`,
else `~/.docker/config.json`): `credHelpers` for the registry, else
`credsStore`, else the inline `auths` entry, so whatever `docker login` set
up works here unchanged. Secrets are only held in memory.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..api.errors import ImageError
from .reference import DOCKER_HUB, DOCKER_HUB_AUTH_KEY

_HELPER_TIMEOUT = 30
_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str  # or an identity token when username is "<token>"

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lowercased
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a WWW-Authenticate header (registries send one)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in _PARAM.finditer(rest)}
    params = {k: re.sub(r"\\(.)", r"\1", v) for k, v in params.items()}
    return Challenge(scheme.lower(), params)


def config_path() -> Path:
    directory = os.environ.get("DOCKER_CONFIG")
    return Path(directory) / "config.json" if directory else Path.home() / ".docker" / "config.json"


def _auth_keys(registry: str) -> list[str]:
    if registry == DOCKER_HUB:
        return [DOCKER_HUB_AUTH_KEY, "index.docker.io", "docker.io", "registry-1.docker.io"]
    return [registry, f"https://{registry}", f"http://{registry}"]


def _key_host(key: str) -> str:
    """`https://host:port/v1/` -> `host:port`, so any spelling of a key matches."""
    return urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]


def _find(table: object, registry: str) -> object | None:
    if not isinstance(table, dict):
        return None
    keys = _auth_keys(registry)
    for key in keys:
        if key in table:
            return table[key]
    hosts = {_key_host(k) for k in keys}
    for key, value in table.items():
        if _key_host(str(key)) in hosts:
            return value
    return None


def credentials_for(registry: str, path: Path | None = None) -> Credentials | None:
    path = path or config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read registry credentials from {path}: {exc}") from None
    if not isinstance(config, dict):
        return None
    helper = _find(config.get("credHelpers"), registry) or config.get("credsStore")
    if isinstance(helper, str) and helper:
        found = _from_helper(helper, registry)
        if found is not None:
            return found
    entry = _find(config.get("auths"), registry)
    return _from_entry(entry, registry, path) if isinstance(entry, dict) else None


def _from_entry(entry: dict, registry: str, path: Path) -> Credentials | None:
    if entry.get("identitytoken"):
        return Credentials("<token>", str(entry["identitytoken"]))
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ImageError(f"{path}: the auth entry for {registry} is not base64 'user:password'") from None
        if not sep:
            raise ImageError(f"{path}: the auth entry for {registry} is not base64 'user:password'")
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


def _from_helper(helper: str, registry: str) -> Credentials | None:
    """Ask `docker-credential-<helper> get`; None when it has nothing for this registry."""
    program = f"docker-credential-{helper}"
    server = DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry
    try:
        proc = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=_HELPER_TIMEOUT)
    except FileNotFoundError:
        raise ImageError(f"credential helper {program} (named in {config_path()}) is not installed") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"credential helper {program} did not answer within {_HELPER_TIMEOUT} s") from None
    if proc.returncode != 0:
        if "not found" in (proc.stdout + proc.stderr).lower():
            return None
        raise ImageError(f"credential helper {program} failed: {(proc.stderr or proc.stdout).strip()}")
    try:
        data = json.loads(proc.stdout)
        return Credentials(str(data["Username"]), str(data["Secret"]))
    except (ValueError, KeyError, TypeError):
        raise ImageError(f"credential helper {program} printed something other than its JSON answer") from None


def basic_header(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
