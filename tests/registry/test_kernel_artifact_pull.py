"""Kernel OCI artifacts pulled from Debian's docker-registry on loopback (image/kernel_artifact.py).

The artifacts are built here (support.kernel_artifacts) in every form upstream's pull accepts, pushed with
skopeo or through the distribution API, and pulled into the test's own kernel cache.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from matchlock.api.errors import ImageError, MatchlockError
from matchlock.api.paths import kernels_dir
from matchlock.image.archive import host_arch
from matchlock.image.kernel_artifact import pull_kernel
from registry_support import push_image, skopeo_push
from support.images import DOCKER_MANIFEST, make_index, write_oci_layout
from support.kernel_artifacts import fake_kernel, kernel_artifact, pack
from support.rpcwire import RpcProcess
from support.tarballs import tar_layer

pytestmark = pytest.mark.registry
ARCH = host_arch()
OTHER_ARCH = "arm64" if ARCH == "amd64" else "amd64"


def cached_files() -> list[str]:
    root = kernels_dir() / "oci"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "locks" not in p.parts)


@pytest.mark.parametrize("form", ["tar.gz", "tar", "raw"])
def test_each_layer_form_is_extracted_and_cached_by_layer_digest(plain_registry, env, form):
    kernel = fake_kernel(ARCH)
    image = kernel_artifact(pack(kernel, form, ARCH), form, ARCH)
    push_image(plain_registry, "matchlock/kernel", form.replace(".", "-"), image)
    path = pull_kernel(f"{plain_registry.address}/matchlock/kernel:{form.replace('.', '-')}")
    assert path.read_bytes() == kernel
    layer_hex = image.layer_digests[0].removeprefix("sha256:")
    assert path == kernels_dir() / "oci" / "sha256" / layer_hex / ("kernel-arm64" if ARCH == "arm64" else "kernel")
    assert [name for name in cached_files() if not name.startswith("refs/")] == [str(path.relative_to(path.parents[2]))]
    assert list((kernels_dir() / "oci" / "tmp").iterdir()) == []


def test_skopeo_pushed_tar_gz_is_cached_and_not_fetched_again(plain_registry, env, tmp_path):
    kernel = fake_kernel(ARCH)
    image = kernel_artifact(pack(kernel, "tar.gz", ARCH), "tar.gz", ARCH)
    skopeo_push(write_oci_layout(tmp_path / "layout", image, "v1"), "v1", plain_registry, "skopeo/kernel", fmt="v2s2")
    skopeo_push(tmp_path / "layout", "v1", plain_registry, "skopeo/kernel-copy", fmt="v2s2")
    ref = f"{plain_registry.address}/skopeo/kernel:v1"
    first = pull_kernel(ref)
    assert first.read_bytes() == kernel
    # With the layer blob gone only the cache can answer: another tag of the same layer fetches its
    # manifest but not the layer, and with the manifest gone too the cached tag still resolves.
    plain_registry.blob_file(image.layer_digests[0]).unlink()
    assert pull_kernel(f"{plain_registry.address}/skopeo/kernel-copy:v1") == first
    with plain_registry.client() as client:
        head = client.head("/v2/skopeo/kernel/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
        deleted = client.delete(f"/v2/skopeo/kernel/manifests/{head.headers['docker-content-digest']}")
        assert deleted.status_code == 202, deleted.text
    assert pull_kernel(ref) == first
    assert first.read_bytes() == kernel


def test_index_picks_this_hosts_platform(plain_registry, env):
    ours, theirs = fake_kernel(ARCH), fake_kernel(OTHER_ARCH)
    images = {
        OTHER_ARCH: kernel_artifact(pack(theirs, "tar", OTHER_ARCH), "tar", OTHER_ARCH),
        ARCH: kernel_artifact(pack(ours, "tar", ARCH), "tar", ARCH),
    }
    push_image(
        plain_registry, "multi/kernel", "6.1", images[ARCH], index=make_index(images), others=[images[OTHER_ARCH]]
    )
    assert pull_kernel(f"{plain_registry.address}/multi/kernel:6.1").read_bytes() == ours
    pinned = f"{plain_registry.address}/multi/kernel@{images[ARCH].digest}"
    assert pull_kernel(pinned).read_bytes() == ours


def test_concurrent_pulls_of_one_reference_share_one_file(plain_registry, env):
    kernel = fake_kernel(ARCH, size=4 << 20)
    push_image(plain_registry, "race/kernel", "v1", kernel_artifact(pack(kernel, "tar.gz", ARCH), "tar.gz", ARCH))
    ref = f"{plain_registry.address}/race/kernel:v1"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(pull_kernel(ref))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4 and len(set(results)) == 1
    assert results[0].read_bytes() == kernel


@pytest.mark.parametrize(
    ("layer", "form", "message"),
    [
        (b"#!/bin/sh\necho not a kernel\n" * 100, "raw", "is not a kernel: it is 2800 bytes starting with 23 21 2f 62"),
        (pack(b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x28\x00" + bytes(100), "tar.gz", ARCH), "tar.gz",
         "is an ELF file for machine 40"),
    ],
    ids=["script", "wrong-machine"],
)  # fmt: skip
def test_a_layer_that_is_not_a_kernel_is_refused_and_nothing_cached(plain_registry, env, layer, form, message):
    image = kernel_artifact(layer, form, ARCH)
    push_image(plain_registry, "bad/kernel", "v1", image)
    with pytest.raises(ImageError) as caught:
        pull_kernel(f"{plain_registry.address}/bad/kernel:v1")
    assert f"layer {image.layer_digests[0]} of {plain_registry.address}/bad/kernel:v1" in str(caught.value)
    assert message in str(caught.value)
    assert cached_files() == []


def test_a_tar_without_the_kernel_file_names_what_it_has(plain_registry, env):
    layer = tar_layer({"boot/vmlinuz": fake_kernel(ARCH), "README": "hi"}, dirs=("boot",))
    push_image(plain_registry, "tar/kernel", "v1", kernel_artifact(layer, "tar", ARCH))
    name = "kernel-arm64" if ARCH == "arm64" else "kernel"
    with pytest.raises(
        ImageError, match=rf"a tar archive without a regular file named {name} \(it has: boot, boot/vmlinuz"
    ):
        pull_kernel(f"{plain_registry.address}/tar/kernel:v1")
    assert cached_files() == []


def test_a_missing_tag_says_so(plain_registry, env):
    with pytest.raises(MatchlockError, match="does not exist on"):
        pull_kernel(f"{plain_registry.address}/matchlock/kernel:no-such-tag")


@pytest.fixture
def rpc(env, tmp_path):
    server = RpcProcess(env={"MATCHLOCK_STATE_DIR": str(tmp_path / "state")})
    yield server
    server.stop()
    assert server.bad_lines == []


def test_rpc_create_answers_kernel_ref_failures_before_booting(plain_registry, rpc, tmp_path):
    missing = tmp_path / "no-such-vmlinux"
    error = rpc.error("create", {"image": "matchlock/busybox:builtin", "kernel": {"ref": f"file://{missing}"}})
    assert error["code"] == -32602
    assert error["message"].startswith(f"invalid params: kernel.ref file://{missing}: no such file")
    push_image(plain_registry, "rpc/kernel", "v1", kernel_artifact(b"not a kernel", "raw", ARCH))
    ref = f"{plain_registry.address}/rpc/kernel:v1"
    error = rpc.error("create", {"image": "matchlock/busybox:builtin", "kernel": {"ref": ref}}, timeout=60)
    assert error["code"] == -32000
    assert error["message"].startswith(f"pulling kernel.ref {ref} failed: layer sha256:")
    assert "is not a kernel" in error["message"]
    error = rpc.error("create", {"image": "matchlock/busybox:builtin", "kernel": {"ref": ref + "-absent"}})
    assert error["code"] == -32000 and "does not exist on" in error["message"]
