"""Registries for the pull tests: Debian's docker-registry on loopback, started here.

- `plain_registry`: plain HTTP on localhost (allowed for loopback registries);
- `secure_registry`: TLS from a test CA plus htpasswd basic auth, on 127.0.0.1.
Both live for the module and are stopped by PID in teardown. Every test gets
its own image store (MATCHLOCK_CACHE_DIR) and Docker client config (DOCKER_CONFIG).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from registry_support import Registry, make_htpasswd, make_tls

MATCHLOCK = str(Path(sys.executable).parent / "matchlock")

pytestmark = pytest.mark.registry
USER, PASSWORD = "tester", "s3cret-pass"


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
    vars: dict

    def login(self, registry: str, user: str = USER, password: str = PASSWORD) -> None:
        import base64

        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.write_config({"auths": {registry: {"auth": auth}}})

    def write_config(self, config: dict) -> None:
        self.docker_config.mkdir(parents=True, exist_ok=True)
        (self.docker_config / "config.json").write_text(json.dumps(config))

    def trust(self, registry: Registry) -> None:
        target = self.certs / registry.address
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(registry.tls.ca, target / "ca.crt")

    def run(self, *args: str, timeout: float = 120, extra: dict | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.vars, **(extra or {})}
        return subprocess.run([MATCHLOCK, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def env(tmp_path, monkeypatch) -> Env:
    values = {
        "MATCHLOCK_CACHE_DIR": str(tmp_path / "cache"),
        "DOCKER_CONFIG": str(tmp_path / "docker"),
        "MATCHLOCK_REGISTRY_CERTS_DIR": str(tmp_path / "certs.d"),
        "MATCHLOCK_PULL_BACKOFF": "0.05",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MATCHLOCK_INSECURE_REGISTRIES", raising=False)
    return Env(tmp_path / "cache" / "images", tmp_path / "docker", tmp_path / "certs.d", values)
