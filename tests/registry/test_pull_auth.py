"""Credentials, TLS trust and bearer tokens against real registries on loopback.

- `secure_registry`: TLS from a test CA and htpasswd basic auth;
- `token_registry`: the registry's token mode, with a token server made here
  (anonymous pulls of public/*, everything else needs the user's password).
"""

from __future__ import annotations

import os
import stat

import pytest

from matchlock.image.archive import host_arch
from registry_support import PASSWORD, USER, Registry, TokenServer, push_image, skopeo_push
from support.images import make_image, write_oci_layout
from support.tarballs import tar_layer

pytestmark = pytest.mark.registry


@pytest.fixture(scope="module")
def secure_image(secure_registry, tmp_path_factory):
    image = make_image([tar_layer({"secret.txt": "classified\n"})], arch=host_arch())
    layout = write_oci_layout(tmp_path_factory.mktemp("layout"), image, "v1")
    skopeo_push(layout, "v1", secure_registry, "private/app", creds=f"{USER}:{PASSWORD}")
    return f"{secure_registry.address}/private/app:v1"


def test_basic_auth_success(secure_registry, secure_image, env):
    env.trust(secure_registry)
    env.login(secure_registry.address)
    result = env.run("pull", secure_image)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Pulling {secure_image}...\nDigest: sha256:")


def test_missing_credentials_say_how_to_log_in(secure_registry, secure_image, env):
    env.trust(secure_registry)
    result = env.run("pull", secure_image)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: unauthorized: {secure_registry.address} refused to serve private/app")
    assert "no credentials were found" in result.stderr
    assert result.stderr.rstrip().endswith(f"Log in with: docker login {secure_registry.address}")


def test_wrong_password_is_rejected_clearly(secure_registry, secure_image, env):
    env.trust(secure_registry)
    env.login(f"https://{secure_registry.address}", password="Not-The-Pass-7")  # any spelling of the key matches
    result = env.run("pull", secure_image)
    assert result.returncode == 1
    assert (
        f"the credentials for {secure_registry.address} in {env.docker_config}/config.json were rejected"
        in result.stderr
    )
    assert "Not-The-Pass-7" not in result.stderr  # never echo the secret
    assert not (env.store / "layers").exists() or not any((env.store / "layers").rglob("*"))


def _helper(tmp_path, name: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    helper = bin_dir / f"docker-credential-{name}"
    helper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || exit 1\nread server\n'
        f'case "$server" in *127.0.0.1*) echo \'{{"ServerURL":"\'$server\'","Username":"{USER}","Secret":"{PASSWORD}"}}\';;\n'
        "*) echo 'credentials not found in native keychain'; exit 1;;\nesac\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
def test_credential_helpers(secure_registry, secure_image, env, tmp_path, key):
    env.trust(secure_registry)
    path = _helper(tmp_path, "mltest")
    env.write_config(
        {"credHelpers": {secure_registry.address: "mltest"}} if key == "credHelpers" else {"credsStore": "mltest"}
    )
    result = env.run("pull", secure_image, extra={"PATH": path})
    assert result.returncode == 0, result.stderr


def test_untrusted_tls_is_refused_unless_listed_insecure(secure_registry, secure_image, env):
    env.login(secure_registry.address)
    refused = env.run("pull", secure_image)
    assert refused.returncode == 1
    assert f"TLS certificate of registry {secure_registry.address} is not trusted" in refused.stderr
    assert f"certs.d/{secure_registry.address}/ca.crt" in refused.stderr
    allowed = env.run(
        "pull", secure_image, extra={"MATCHLOCK_INSECURE_REGISTRIES": f"other:1,{secure_registry.address}"}
    )
    assert allowed.returncode == 0, allowed.stderr


@pytest.fixture(scope="module")
def token_registry(plain_registry, tmp_path_factory):
    """Token auth over the plain registry's storage, so the tests push there without auth."""
    root = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(root, USER, PASSWORD)
    registry = Registry(root, token=tokens, storage=plain_registry.storage)
    image = make_image([tar_layer({"who": "token\n"})], arch=host_arch())
    push_image(plain_registry, "public/app", "v1", image)
    push_image(plain_registry, "private/app", "v1", image)
    registry.start()
    yield registry, tokens
    registry.stop()
    tokens.close()


def test_bearer_token_anonymous_and_with_credentials(token_registry, env):
    registry, tokens = token_registry
    public = env.run("pull", f"{registry.address}/public/app:v1")
    assert public.returncode == 0, public.stderr
    assert "repository:public/app:pull" in tokens.scopes

    private = f"{registry.address}/private/app:v1"
    denied = env.run("pull", private)
    assert (
        denied.returncode == 1
        and "unauthorized" in denied.stderr
        and f"docker login {registry.address}" in denied.stderr
    )

    env.login(registry.address)
    allowed = env.run("pull", private)
    assert allowed.returncode == 0, allowed.stderr
    env.login(registry.address, password="nope")
    rejected = env.run("pull", "--force", private)
    assert rejected.returncode == 1 and "were rejected" in rejected.stderr
