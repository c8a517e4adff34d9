"""Reference normalisation, credentials lookup, auth challenges and platform choice.

Nothing here makes a request: registry names such as docker.io are only parsed.
"""

from __future__ import annotations

import base64
import json
import stat

import pytest

from matchlock.api.errors import ImageError, UsageError
from matchlock.image import auth
from matchlock.image.pull import Platform, select_manifest
from matchlock.image.reference import http_allowed, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text, canonical, api_host",
    [
        ("alpine", "docker.io/library/alpine:latest", "registry-1.docker.io"),
        ("alpine:3.20", "docker.io/library/alpine:3.20", "registry-1.docker.io"),
        ("docker.io/library/alpine:latest", "docker.io/library/alpine:latest", "registry-1.docker.io"),
        ("index.docker.io/library/alpine", "docker.io/library/alpine:latest", "registry-1.docker.io"),
        ("python:3.12-alpine", "docker.io/library/python:3.12-alpine", "registry-1.docker.io"),
        ("user/app", "docker.io/user/app:latest", "registry-1.docker.io"),
        (f"ghcr.io/org/app@{DIGEST}", f"ghcr.io/org/app@{DIGEST}", "ghcr.io"),
        (f"ghcr.io/org/app:v1@{DIGEST}", f"ghcr.io/org/app@{DIGEST}", "ghcr.io"),
        ("localhost:5000/team/img", "localhost:5000/team/img:latest", "localhost:5000"),
        ("localhost/img", "localhost/img:latest", "localhost"),
        ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000"),
        ("[::1]:5000/x", "[::1]:5000/x:latest", "[::1]:5000"),
        (
            "registry.example:443/my_app/sub-name.x:1.0_rc",
            "registry.example:443/my_app/sub-name.x:1.0_rc",
            "registry.example:443",
        ),
    ],
)
def test_references_normalise_like_docker(text, canonical, api_host):
    ref = parse(text)
    assert ref.canonical == canonical and str(ref) == canonical and ref.api_host == api_host


def test_alpine_spellings_share_one_key():
    assert (
        len(
            {
                parse(t).canonical
                for t in ("alpine", "alpine:latest", "library/alpine", "docker.io/library/alpine:latest")
            }
        )
        == 1
    )


@pytest.mark.parametrize(
    "bad",
    ["", " alpine", "Alpine", "alpine:", "a//b", "alpine@sha256:xyz", "alpine@md5:" + "0" * 32, "-x", "x:" + "t" * 129],
)
def test_invalid_references(bad):
    with pytest.raises(UsageError, match="invalid image reference"):
        parse(bad)


def test_http_only_for_loopback_or_listed(monkeypatch):
    monkeypatch.delenv("MATCHLOCK_INSECURE_REGISTRIES", raising=False)
    assert http_allowed("localhost:5000") and http_allowed("127.0.0.1:80") and http_allowed("[::1]:5000")
    assert not http_allowed("registry.example:5000") and not http_allowed("docker.io")
    monkeypatch.setenv("MATCHLOCK_INSECURE_REGISTRIES", "registry.example:5000, other")
    assert http_allowed("registry.example:5000") and http_allowed("other:99") and not http_allowed("third")


# ---------------------------------------------------------------------------
# credentials


def _config(tmp_path, data) -> None:
    (tmp_path / "config.json").write_text(json.dumps(data))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auths_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    _config(tmp_path, {"auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hub:pw")},
        "https://ghcr.io": {"auth": _b64("gh:tok:en")},
        "localhost:5000": {"username": "u", "password": "p"},
        "quay.io": {"identitytoken": "refresh"},
    }})  # fmt: skip
    assert auth.credentials_for("docker.io") == auth.Credentials("hub", "pw")
    assert auth.credentials_for("ghcr.io") == auth.Credentials("gh", "tok:en")
    assert auth.credentials_for("localhost:5000") == auth.Credentials("u", "p")
    assert auth.credentials_for("quay.io") == auth.Credentials("<token>", "refresh")
    assert auth.credentials_for("other.example") is None
    assert "pw" not in repr(auth.credentials_for("docker.io"))


def test_no_config_means_anonymous(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "absent"))
    assert auth.credentials_for("docker.io") is None


def test_broken_auth_entry_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    _config(tmp_path, {"auths": {"r.example": {"auth": _b64("no-colon")}}})
    with pytest.raises(ImageError, match="not base64 'user:password'"):
        auth.credentials_for("r.example")


def _helper(tmp_path, monkeypatch, name: str, script: str) -> None:
    helper = tmp_path / "bin" / f"docker-credential-{name}"
    helper.parent.mkdir(exist_ok=True)
    helper.write_text("#!/bin/sh\n" + script)
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{helper.parent}:/usr/bin:/bin")


def test_cred_helpers_and_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    _helper(tmp_path, monkeypatch, "fake", 'read s; [ "$s" = https://index.docker.io/v1/ ] || [ "$s" = r.example ] || '
            '{ echo "credentials not found in native keychain"; exit 1; }\necho "{\\"Username\\":\\"$s\\",\\"Secret\\":\\"x\\"}"\n')  # fmt: skip
    _config(tmp_path, {"credHelpers": {"r.example": "fake"}, "auths": {"s.example": {"auth": _b64("inline:pw")}}})
    assert auth.credentials_for("r.example") == auth.Credentials("r.example", "x")
    assert auth.credentials_for("s.example") == auth.Credentials("inline", "pw")
    _config(tmp_path, {"credsStore": "fake", "auths": {"s.example": {"auth": _b64("inline:pw")}}})
    assert auth.credentials_for("docker.io") == auth.Credentials("https://index.docker.io/v1/", "x")
    assert auth.credentials_for("s.example") == auth.Credentials("inline", "pw")  # helper had none: fall back
    _config(tmp_path, {"credsStore": "absent"})
    with pytest.raises(ImageError, match="docker-credential-absent .* is not installed"):
        auth.credentials_for("docker.io")


def test_challenges():
    bearer = auth.parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'
    )
    assert bearer == auth.Challenge(
        "bearer",
        {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:a/b:pull,push"},
    )
    assert auth.parse_challenge('Basic realm="x"') == auth.Challenge("basic", {"realm": "x"})
    assert auth.parse_challenge("") is None


# ---------------------------------------------------------------------------
# platforms


def _index(*platforms) -> dict:
    return {"manifests": [{"digest": f"sha256:{i:064x}", "size": 1, "platform": p} for i, p in enumerate(platforms)]}


def test_platform_selection():
    index = _index(
        {"os": "linux", "architecture": "arm", "variant": "v7"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
        {"os": "linux", "architecture": "amd64"},
        {"os": "unknown", "architecture": "unknown"},
        {"os": "windows", "architecture": "amd64"},
    )
    assert select_manifest(index, Platform.parse("linux/amd64"))["platform"]["architecture"] == "amd64"
    assert select_manifest(index, Platform.parse("linux/arm64"))["platform"]["architecture"] == "arm64"
    assert select_manifest(index, Platform.parse("linux/arm64/v8"))["platform"]["architecture"] == "arm64"
    assert select_manifest(index, Platform.parse("linux/arm/v7"))["platform"]["variant"] == "v7"
    assert select_manifest(index, Platform.parse("windows/amd64"))["platform"]["os"] == "windows"
    with pytest.raises(
        ImageError, match=r"no linux/arm/v6 variant \(it has: linux/arm/v7, linux/arm64/v8, linux/amd64"
    ):
        select_manifest(index, Platform.parse("linux/arm/v6"))
    attestation = {"manifests": [{"digest": "sha256:" + "0" * 64, "size": 1, "platform": {"os": "linux", "architecture": "amd64"},
                                  "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}]}  # fmt: skip
    with pytest.raises(ImageError):
        select_manifest(attestation, Platform.parse("linux/amd64"))


@pytest.mark.parametrize("bad", ["linux", "linux/", "/amd64", "a/b/c/d"])
def test_bad_platforms(bad):
    with pytest.raises(UsageError, match="invalid --platform"):
        Platform.parse(bad)
