"""What a pull tells a user who is not at a terminal, and what a local typo says, against a loopback registry."""

from __future__ import annotations

import pytest

from matchlock.image.archive import host_arch
from matchlock.image.progress import short
from registry_support import push_image
from support.images import make_image
from support.tarballs import tar_layer

pytestmark = pytest.mark.registry


def test_pull_prints_a_line_per_layer_off_a_terminal(plain_registry, env):
    image = make_image([tar_layer({"a": "1" * 5000}), tar_layer({"b": "2" * 7000})], arch=host_arch())
    push_image(plain_registry, "test/lines", "v1", image)
    ref = f"{plain_registry.address}/test/lines:v1"
    first = env.run("pull", ref)
    assert first.returncode == 0, first.stderr
    assert sorted(first.stderr.splitlines()) == sorted(
        f"{short(digest)}: downloaded ({len(image.blobs[digest]) / 1024:.1f} kB)" for digest in image.layer_digests
    )
    again = env.run("pull", "--force", ref)  # the blobs are stored: each layer says so
    assert again.returncode == 0, again.stderr
    assert (
        sorted(line.split(": ", 1)[1].split(" (")[0] for line in again.stderr.splitlines()) == ["already present"] * 2
    )


def test_run_with_a_tag_typo_names_the_local_images_close_to_it(plain_registry, env):
    push_image(plain_registry, "test/typo", "v1", make_image([tar_layer({"a": "b"})], arch=host_arch()))
    have = f"{plain_registry.address}/test/typo:v1"
    assert env.run("pull", have).returncode == 0
    want = f"{plain_registry.address}/test/typo:v2"
    result = env.run("run", "--image", want, "--", "true")
    assert result.returncode == 1, result
    missed = f"no local image matched {want} (close local images: {have})"
    lines = result.stderr.splitlines()
    assert lines[0] == f"{missed}; pulling {want}"
    assert lines[-1].startswith(f"Error: {missed}; pulling {want} failed: image not found: ")
    assert "MANIFEST_UNKNOWN" in lines[-1] and len(lines) == 2
