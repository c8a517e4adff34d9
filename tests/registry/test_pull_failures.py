"""Pulls that go wrong leave a store that is consistent and never trusts bad bytes."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from matchlock.image.archive import host_arch
from registry_support import CuttingProxy, push_image
from support.images import make_image
from support.tarballs import tar_layer

pytestmark = pytest.mark.registry


def assert_store_consistent(store: Path, expect_rows: int) -> None:
    """Every stored layer blob hashes to its name; no half-written file is anywhere."""
    layers = store / "layers" / "sha256"
    for blob in layers.iterdir() if layers.is_dir() else ():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    leftovers = [p for p in (store / "tmp").rglob("*")] if (store / "tmp").is_dir() else []
    assert leftovers == []
    blobs = sorted((store / "blobs").iterdir()) if (store / "blobs").is_dir() else []
    assert len(blobs) == expect_rows and not any(b.name.endswith(".tmp") for b in blobs)


def rows(env) -> list[str]:
    return env.run("image", "ls").stdout.splitlines()[1:]


def test_corrupted_blob_is_rejected_and_nothing_cached(plain_registry, env):
    image = make_image([tar_layer({"good": "x"}), tar_layer({"data": os.urandom(100_000)})], arch=host_arch())
    push_image(plain_registry, "test/corrupt", "v1", image)
    served = plain_registry.blob_file(image.layer_digests[1])
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the digest can tell
    served.write_bytes(bytes(data))
    result = env.run("pull", f"{plain_registry.address}/test/corrupt:v1")
    assert result.returncode == 1
    assert (
        f"blob {image.layer_digests[1]} of {plain_registry.address}/test/corrupt failed verification" in result.stderr
    )
    assert "nothing was cached" in result.stderr
    assert rows(env) == []
    assert not (env.store / "layers/sha256" / image.layer_digests[1].split(":")[1]).exists()
    assert_store_consistent(env.store, expect_rows=0)


def test_pull_cut_off_midway_then_retried(plain_registry, env):
    big = tar_layer({"big": os.urandom(3_000_000)})
    image = make_image([tar_layer({"small": "s"}), big], arch=host_arch())
    push_image(plain_registry, "test/cut", "v1", image)
    proxy = CuttingProxy(plain_registry.port, limit=256 * 1024)  # cuts every connection past 256 KiB
    try:
        ref = f"localhost:{proxy.port}/test/cut:v1"
        failed = env.run("pull", ref, extra={"MATCHLOCK_PULL_RETRIES": "3"})
        assert failed.returncode == 1
        assert f"network failure talking to registry localhost:{proxy.port}" in failed.stderr, failed.stderr
        assert proxy.cuts == 3 and proxy.saw(b"Range: bytes=")  # each retry resumed where the last one stopped
        assert rows(env) == []
        # The small layer arrived whole and verified; the cut one left nothing behind.
        stored = [p.name for p in (env.store / "layers/sha256").iterdir()]
        assert stored == [image.layer_digests[0].split(":")[1]]
        assert_store_consistent(env.store, expect_rows=0)
        gc = env.run("image", "gc")
        assert gc.stdout == "Removed 1 unreferenced blobs\n"

        proxy.cut = False  # the network recovers
        retried = env.run("pull", ref)
        assert retried.returncode == 0, retried.stderr
        assert f"Digest: {image.digest}" in retried.stdout.splitlines()
        assert rows(env)[0].split()[:2] == [ref, "registry"]
        assert_store_consistent(env.store, expect_rows=1)
        assert env.run("image", "gc").stdout == "Removed 0 unreferenced blobs\n"
    finally:
        proxy.close()


def test_transient_cut_resumes_within_one_pull(plain_registry, env):
    image = make_image([tar_layer({"big": os.urandom(2_000_000)})], arch=host_arch())
    push_image(plain_registry, "test/resume", "v1", image)
    proxy = CuttingProxy(plain_registry.port, limit=512 * 1024, cuts_left=1)
    try:
        result = env.run("pull", f"localhost:{proxy.port}/test/resume:v1")
        assert result.returncode == 0, result.stderr
        assert proxy.cuts == 1 and proxy.saw(b"Range: bytes=")
        assert_store_consistent(env.store, expect_rows=1)
    finally:
        proxy.close()


def test_not_found_and_network_errors(plain_registry, env):
    missing_repo = env.run("pull", f"{plain_registry.address}/test/nothing-here:v1")
    assert missing_repo.returncode == 1
    assert missing_repo.stderr.startswith(f"Error: image not found: {plain_registry.address}/test/nothing-here:v1")
    push_image(plain_registry, "test/exists", "v1", make_image([tar_layer({"a": "b"})], arch=host_arch()))
    missing_tag = env.run("pull", f"{plain_registry.address}/test/exists:v2")
    assert missing_tag.returncode == 1 and "MANIFEST_UNKNOWN" in missing_tag.stderr

    port = plain_registry.port + 1 if plain_registry.port < 65535 else plain_registry.port - 1
    unreachable = env.run("pull", f"localhost:{port}/test/x:v1", extra={"MATCHLOCK_PULL_RETRIES": "2"})
    assert unreachable.returncode == 1
    assert f"network failure talking to registry localhost:{port}: ConnectError" in unreachable.stderr

    bad = env.run("pull", "Not/Valid:ref")
    assert bad.returncode == 2 and "invalid image reference 'Not/Valid:ref'" in bad.stderr
    assert rows(env) == []


class _RateLimited(http.server.BaseHTTPRequestHandler):
    """Stands in for a registry's rate limiter (docker-registry has none)."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"pull rate limit exceeded"}]}'
        self.send_response(429)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_rate_limit_is_retried_then_reported(env):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RateLimited)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        result = env.run("pull", f"127.0.0.1:{port}/test/app:v1", extra={"MATCHLOCK_PULL_RETRIES": "3"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert result.returncode == 1
    assert f"rate limited by registry 127.0.0.1:{port} (TOOMANYREQUESTS: pull rate limit exceeded)" in result.stderr
    assert _RateLimited.hits == 3  # MATCHLOCK_PULL_RETRIES attempts in all (the https probe never got past TLS)
