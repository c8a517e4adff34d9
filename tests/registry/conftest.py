"""Registries for the pull tests: Debian's docker-registry on loopback, started here.

- `plain_registry`: plain HTTP on localhost (allowed for loopback registries);
- `secure_registry`: TLS from a test CA plus htpasswd basic auth, on 127.0.0.1.
Both live for the module and are stopped by PID in teardown. Every test gets
its own image store (the `cache_dir` fixture) and Docker client config (DOCKER_CONFIG).
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry_support import PASSWORD, USER, Registry, make_htpasswd, make_tls
from support.cli import CLIResult, run_matchlock

pytestmark = pytest.mark.registry


@pytest.fixture(scope="session", autouse=True)
def registry_tools() -> None:
    missing = [tool for tool in ("docker-registry", "skopeo", "htpasswd", "zstd") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"registry tests need {', '.join(missing)}: run scripts/setup.sh")


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory):
    with Registry(tmp_path_factory.mktemp("plain-registry"), host="localhost") as registry:
        yield registry


@pytest.fixture(scope="module")
def secure_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure-registry")
    tls = make_tls(root / "tls")
    with Registry(root, tls=tls, htpasswd=make_htpasswd(root / "htpasswd", USER, PASSWORD)) as registry:
        yield registry


@dataclass
class Env:
    """An isolated image store and Docker config; `run` drives the real CLI in them."""

    store: Path
    docker_config: Path
    certs: Path

    def login(self, registry: str, user: str = USER, password: str = PASSWORD) -> None:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.write_config({"auths": {registry: {"auth": auth}}})

    def write_config(self, config: dict) -> None:
        self.docker_config.mkdir(parents=True, exist_ok=True)
        (self.docker_config / "config.json").write_text(json.dumps(config))

    def trust(self, registry: Registry) -> None:
        target = self.certs / registry.address
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(registry.tls.ca, target / "ca.crt")

    def run(self, *args: str, timeout: float = 120, extra: dict | None = None) -> CLIResult:
        return run_matchlock(*args, timeout=timeout, env=extra)


@pytest.fixture
def env(cache_dir, tmp_path, monkeypatch) -> Env:
    env = Env(cache_dir / "images", tmp_path / "docker", tmp_path / "certs.d")
    monkeypatch.setenv("DOCKER_CONFIG", str(env.docker_config))
    monkeypatch.setenv("MATCHLOCK_REGISTRY_CERTS_DIR", str(env.certs))
    monkeypatch.setenv("MATCHLOCK_PULL_BACKOFF", "0.05")
    monkeypatch.delenv("MATCHLOCK_INSECURE_REGISTRIES", raising=False)
    return env
