"""Images pulled from a real registry on loopback boot and run.

The image is busybox (from Debian's busybox-static) plus a file, pushed with
skopeo to Debian's docker-registry on localhost. VMs boot one at a time.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from matchlock.image.archive import host_arch
from registry_support import Registry, busybox_layer, skopeo_push
from support.cli import run_matchlock
from support.images import make_image, write_oci_layout
from support.tarballs import tar_layer

pytestmark = [pytest.mark.vm, pytest.mark.registry, pytest.mark.usefixtures("vm_prerequisites")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with Registry(tmp_path_factory.mktemp("registry"), host="localhost") as registry:
        yield registry


@pytest.fixture(scope="module")
def busybox(busybox_path) -> bytes:
    return busybox_layer(busybox_path.read_bytes())


def push(registry: Registry, busybox: bytes, tmp: Path, repo: str, text: str) -> str:
    image = make_image([busybox, tar_layer({"hello.txt": text})], arch=host_arch(), kind="gzip",
                       config={"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"})  # fmt: skip
    skopeo_push(write_oci_layout(tmp / f"layout-{uuid.uuid4().hex[:6]}", image, "v1"), "v1", registry, repo)
    return f"{registry.address}/{repo}:v1"


@pytest.fixture
def repo():
    name = f"test/pulled-{uuid.uuid4().hex[:8]}"
    yield name
    # The shared image cache is the user's: leave nothing of ours behind.
    for line in run_matchlock("image", "ls").stdout.splitlines():
        if name in line:
            run_matchlock("image", "rm", line.split()[0])


def test_pull_then_run(cli, registry, busybox, repo, tmp_path):
    ref = push(registry, busybox, tmp_path, repo, "hello from the registry\n")
    pulled = cli("pull", ref)
    assert pulled.returncode == 0, pulled
    result = cli("run", "--image", ref, "--", "cat", "/hello.txt")
    assert result.returncode == 0, result
    assert result.stdout == "hello from the registry\n"


def test_run_pulls_on_cache_miss_and_run_pull_refreshes(cli, registry, busybox, repo, tmp_path):
    ref = push(registry, busybox, tmp_path, repo, "first\n")
    first = cli("run", "--image", ref, "--", "cat", "/hello.txt")  # not cached: run pulls it
    assert first.returncode == 0, first
    assert first.stdout == "first\n"
    push(registry, busybox, tmp_path, repo, "second\n")  # the tag moves
    refreshed = cli("run", "--pull", "--image", ref, "--", "cat", "/hello.txt")
    assert refreshed.returncode == 0, refreshed
    assert refreshed.stdout == "second\n"
