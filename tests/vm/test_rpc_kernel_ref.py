"""`matchlock rpc` boots a kernel pulled as an OCI artifact (`kernel.ref`) from a loopback registry.

The artifact is the real tuned kernel, pushed as upstream publishes it (a tar.gz layer holding `kernel`).
The rpc server gets a cache whose kernels directory is private and empty, so the guest can only be running
the pulled kernel: without it the server would have had to fall back to Debian's kernel.
"""

from __future__ import annotations

import json
import shutil

import pytest

from matchlock.api.paths import cache_dir
from matchlock.image.archive import host_arch
from matchlock.image.kernel_artifact import kernel_file_name
from matchlock.kernel import resolve
from registry_support import Registry, push_image
from support.kernel_artifacts import kernel_artifact, pack
from support.rpcwire import RpcProcess, unb64

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

IMAGE = "matchlock/busybox:builtin"
SHARED = ("debs", "images", "runtime", "host-tsc-khz")  # everything but kernels and templates


@pytest.fixture
def registry(tmp_path):
    if shutil.which("docker-registry") is None:
        pytest.fail("this test needs docker-registry: run scripts/setup.sh")
    with Registry(tmp_path / "registry", host="localhost") as running:
        yield running


def test_create_boots_a_kernel_pulled_from_a_registry(registry, state_dir, tmp_path):
    tuned = resolve()
    assert tuned.kind == "tuned", f"this test pushes the tuned kernel; run `matchlock kernel build` ({tuned.reason})"
    release = json.loads((tuned.path.parent / "build.json").read_text())["kernel_release"]
    arch = host_arch()
    image = kernel_artifact(pack(tuned.path.read_bytes(), "tar.gz", arch), "tar.gz", arch)
    push_image(registry, "matchlock/kernel", "test", image)

    shared = cache_dir()
    private = tmp_path / "cache"
    private.mkdir()
    for name in SHARED:
        if (shared / name).exists():
            (private / name).symlink_to(shared / name)
    env = {"MATCHLOCK_CACHE_DIR": str(private), "MATCHLOCK_NO_TEMPLATES": "1", "MATCHLOCK_RPC_LOG": "INFO"}
    server = RpcProcess(env=env, stderr_path=tmp_path / "rpc.log")
    try:
        ref = f"{registry.address}/matchlock/kernel:test"
        created = server.result(
            "create", {"image": IMAGE, "network": {"no_network": True}, "kernel": {"ref": ref}}, timeout=300
        )
        assert created["id"].startswith("vm-")
        result = server.result("exec", {"command": "uname -r"})
        assert result["exit_code"] == 0 and unb64(result["stdout"]).decode().strip() == release
        pulled = (
            private / "kernels" / "oci" / "sha256" / image.layer_digests[0].removeprefix("sha256:") / kernel_file_name()
        )
        assert pulled.read_bytes() == tuned.path.read_bytes()
        assert server.result("close", {"timeout_seconds": 2}) == {}
        assert server.wait_exit(60) == 0
    finally:
        server.stop()
    assert server.bad_lines == []
