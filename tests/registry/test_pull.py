"""`matchlock pull` and the image commands against a real registry on loopback.

Images are built here from bytes the tests make, pushed with skopeo (Docker
schema 2) or through the distribution API (OCI manifests, zstd and
uncompressed layers, multi-platform indexes), then pulled with the real CLI.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from matchlock.image.archive import host_arch
from registry_support import extract_lower, push_image, skopeo_push, stored_bytes
from support.cli import MATCHLOCK
from support.images import Image, make_image, make_index, sha256, write_oci_layout
from support.tarballs import tar_layer

pytestmark = pytest.mark.registry
OTHER_ARCH = "arm64" if host_arch() == "amd64" else "amd64"


def image_rows(env) -> list[list[str]]:
    result = env.run("image", "ls")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["TAG", "SOURCE", "SIZE", "CREATED"]
    return [row.split() for row in rows]


def lower_of(env, name: str) -> Path:
    conn = sqlite3.connect(env.store / "metadata.db")
    try:
        (path,) = conn.execute("SELECT rootfs_path FROM images WHERE tag = ?", (name,)).fetchone()
    finally:
        conn.close()
    return Path(path)


def size_line(env, name: str) -> str:
    return f"Size: {lower_of(env, name).stat().st_size / 1048576:.1f} MB"


def two_layer_image(tag_text: str, kind: str = "gzip", **kwargs) -> Image:
    base = tar_layer({"etc/os-release": "ID=test\n", "bin/tool": os.urandom(200_000)}, dirs=("etc", "bin"))
    top = tar_layer({"app/version": tag_text, ".wh.gone": ""}, dirs=("app",))
    return make_image([base, top], arch=host_arch(), kind=kind, **kwargs)


def test_pull_docker_schema2_pushed_by_skopeo(plain_registry, env, tmp_path):
    image = two_layer_image("v1\n")
    skopeo_push(write_oci_layout(tmp_path / "layout", image, "v1"), "v1", plain_registry, "test/app", fmt="v2s2")
    ref = f"{plain_registry.address}/test/app:v1"
    result = env.run("pull", ref)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Pulling {ref}..." and lines[1].startswith("Digest: sha256:")
    assert lines[2] == size_line(env, ref) and len(lines) == 3
    # Not a terminal: no bars, but a line per layer.
    assert [line.split(": ", 1)[1].split(" (")[0] for line in result.stderr.splitlines()] == ["downloaded"] * 2
    with plain_registry.client() as client:  # skopeo converted it to schema 2; the digest is the registry's
        head = client.head(
            "/v2/test/app/manifests/v1", headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        )
    assert lines[1] == f"Digest: {head.headers['docker-content-digest']}"
    assert [row[:3] for row in image_rows(env)] == [[ref, "registry", lines[2].split()[1]]]
    root = extract_lower(lower_of(env, ref), tmp_path / "root")
    assert (root / "app/version").read_text() == "v1\n" and (root / "etc/os-release").read_text() == "ID=test\n"
    assert not (root / "gone").exists() and not (root / ".wh.gone").exists()


@pytest.mark.parametrize("kind", ["zstd", "none", "docker-gzip"])
def test_pull_oci_zstd_uncompressed_and_docker_layers(plain_registry, env, tmp_path, kind):
    image = two_layer_image(f"{kind}\n", kind=kind, docker=kind == "docker-gzip")
    push_image(plain_registry, f"test/{kind}", "v1", image)
    ref = f"{plain_registry.address}/test/{kind}:v1"
    result = env.run("pull", ref)
    assert result.returncode == 0, result.stderr
    assert f"Digest: {image.digest}" in result.stdout.splitlines()
    assert (extract_lower(lower_of(env, ref), tmp_path / "root") / "app/version").read_text() == f"{kind}\n"
    # The layer blobs are stored exactly as served, named by their digest.
    stored = sorted(p.name for p in (env.store / "layers/sha256").iterdir())
    assert stored == sorted(d.split(":")[1] for d in image.layer_digests)


def test_spellings_of_one_reference_share_one_cache_entry(plain_registry, env):
    push_image(plain_registry, "test/same", "latest", two_layer_image("same\n"))
    first = env.run("pull", f"{plain_registry.address}/test/same")
    assert first.returncode == 0, first.stderr
    plain_registry.stop()  # the second spelling must be answered from the cache
    try:
        again = env.run("pull", f"{plain_registry.address}/test/same:latest")
    finally:
        plain_registry.start()
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1:] == first.stdout.splitlines()[1:]
    assert [row[0] for row in image_rows(env)] == [f"{plain_registry.address}/test/same:latest"]


def test_multi_platform_index_picks_the_platform(plain_registry, env, tmp_path):
    images = {arch: make_image([tar_layer({"platform": arch})], arch=arch) for arch in (host_arch(), OTHER_ARCH)}
    index = make_index(images)
    push_image(plain_registry, "test/multi", "v1", images[host_arch()], index=index, others=[images[OTHER_ARCH]])
    ref = f"{plain_registry.address}/test/multi:v1"

    default = env.run("pull", ref)
    assert default.returncode == 0, default.stderr
    assert f"Digest: {images[host_arch()].digest}" in default.stdout.splitlines()
    assert (extract_lower(lower_of(env, ref), tmp_path / "host") / "platform").read_text() == host_arch()

    other = env.run("pull", "--platform", f"linux/{OTHER_ARCH}", ref)  # a different platform is not a cache hit
    assert other.returncode == 0, other.stderr
    assert f"Digest: {images[OTHER_ARCH].digest}" in other.stdout.splitlines()
    assert (extract_lower(lower_of(env, ref), tmp_path / "other") / "platform").read_text() == OTHER_ARCH

    missing = env.run("pull", "--force", "--platform", "linux/s390x", ref)
    assert missing.returncode == 1
    assert "has no linux/s390x variant" in missing.stderr and f"linux/{host_arch()}" in missing.stderr

    bad = env.run("pull", "--platform", "linux", ref)
    assert bad.returncode == 2 and "invalid --platform 'linux'" in bad.stderr


def test_digest_pinning(plain_registry, env):
    images = {arch: make_image([tar_layer({"platform": arch})], arch=arch) for arch in (host_arch(), OTHER_ARCH)}
    index = make_index(images)
    push_image(plain_registry, "test/pinned", "v1", images[host_arch()], index=index, others=[images[OTHER_ARCH]])
    name = f"{plain_registry.address}/test/pinned"
    pinned = env.run("pull", f"{name}@{images[host_arch()].digest}")
    assert pinned.returncode == 0, pinned.stderr
    assert f"Digest: {images[host_arch()].digest}" in pinned.stdout.splitlines()
    by_index = env.run("pull", f"{name}:v1@{sha256(index)}")  # a tag next to a digest: the digest wins
    assert by_index.returncode == 0, by_index.stderr
    assert f"Digest: {images[host_arch()].digest}" in by_index.stdout.splitlines()
    assert sorted(row[0] for row in image_rows(env)) == sorted(
        [f"{name}@{images[host_arch()].digest}", f"{name}@{sha256(index)}"]
    )
    absent = env.run("pull", f"{name}@sha256:{'0' * 64}")
    assert absent.returncode == 1 and "image not found" in absent.stderr, absent.stderr


def test_tag_alias_shares_bytes_and_rm_twice_fails(plain_registry, env):
    push_image(plain_registry, "test/alias", "v1", two_layer_image("alias\n"))
    ref = f"{plain_registry.address}/test/alias:v1"
    assert env.run("pull", ref).returncode == 0
    before = stored_bytes(env.store)
    assert before > 200_000

    tagged = env.run("pull", "-t", "myapp:dev", ref)
    assert tagged.returncode == 0, tagged.stderr
    assert tagged.stdout.splitlines()[:2] == [f"Pulling {ref}...", "Tagged: myapp:dev"]
    assert stored_bytes(env.store) == before  # the alias is a row, not a copy
    rows = image_rows(env)
    assert [row[:2] for row in rows] == [["myapp:dev", "tag"], [ref, "registry"]]  # local scope first
    assert rows[0][2:4] == rows[1][2:4]

    removed = env.run("image", "rm", ref)
    assert removed.returncode == 0 and removed.stdout == f"Removed {ref}\n"
    assert stored_bytes(env.store) == before and lower_of(env, "myapp:dev").is_file()  # the alias still needs them
    assert env.run("image", "rm", "myapp:dev").returncode == 0
    assert stored_bytes(env.store) == 0
    again = env.run("image", "rm", "myapp:dev")
    assert again.returncode == 1 and again.stderr == "Error: image not found: myapp:dev\n"


def test_layers_dedupe_across_images_and_gc_frees_unreferenced(plain_registry, env):
    base = tar_layer({"shared": os.urandom(300_000)})
    push_image(plain_registry, "test/one", "v1", make_image([base, tar_layer({"one": "1"})], arch=host_arch()))
    push_image(plain_registry, "test/two", "v1", make_image([base, tar_layer({"two": "2"})], arch=host_arch()))
    one, two = (f"{plain_registry.address}/test/{n}:v1" for n in ("one", "two"))
    assert env.run("pull", one).returncode == 0 and env.run("pull", two).returncode == 0
    layers = env.store / "layers/sha256"
    assert len(list(layers.iterdir())) == 3  # the shared base once

    # While a pull runs, removing an image cannot prune layer blobs (the pull may need
    # them); `image gc` frees them afterwards.
    fd = os.open(env.store / ".pull.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert env.run("image", "rm", one).returncode == 0
        assert len(list(layers.iterdir())) == 3
    finally:
        os.close(fd)
    gc = env.run("image", "gc")
    assert gc.returncode == 0 and gc.stdout == "Removed 1 unreferenced blobs\n"
    assert len(list(layers.iterdir())) == 2 and lower_of(env, two).is_file()
    assert env.run("image", "gc").stdout == "Removed 0 unreferenced blobs\n"


def test_concurrent_pulls_of_one_image(plain_registry, env):
    image = make_image([tar_layer({"big": os.urandom(2_000_000)}), tar_layer({"small": "x"})], arch=host_arch())
    push_image(plain_registry, "test/concurrent", "v1", image)
    ref = f"{plain_registry.address}/test/concurrent:v1"
    procs = [
        subprocess.Popen(
            [MATCHLOCK, "pull", ref],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], results
    assert len({out.splitlines()[1] for out, _ in results}) == 1
    assert [row[0] for row in image_rows(env)] == [ref]
    assert sorted(p.name for p in (env.store / "layers/sha256").iterdir()) == sorted(
        d.split(":")[1] for d in image.layer_digests
    )
    assert len(list((env.store / "blobs").iterdir())) == 1
    assert list((env.store / "tmp").iterdir()) == []
