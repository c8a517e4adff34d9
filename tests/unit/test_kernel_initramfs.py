"""Fallback kernel helpers: package and module resolution, signatures, cpio, /init."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from matchlock.api.errors import KernelError
from matchlock.kernel import fallback
from support.kernels import fake_fallback

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/lib/libcrc32c.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
"""


def test_parse_apt_cache_depends():
    out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert fallback.parse_depends(out) == "linux-image-6.1.0-56-cloud-amd64"
    assert fallback.parse_depends(" |Depends: linux-image-6.1.0-57-cloud-amd64\n") == "linux-image-6.1.0-57-cloud-amd64"
    assert fallback.parse_depends("linux-image-cloud-amd64\n  Recommends: x\n") is None


def test_module_names_are_normalised():
    assert fallback.module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert fallback.module_name("kernel/fs/erofs/erofs.ko") == "erofs"


def test_load_order_puts_dependencies_first():
    deps = fallback.parse_modules_dep(MODULES_DEP)
    assert deps["virtio_rng"][0] == "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
    order = fallback.load_order(["virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "erofs"], deps)
    assert len(order) == len(set(order))
    assert set(order) == {
        "virtio",
        "virtio_ring",
        "virtio_mmio",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_rng",
        "libcrc32c",
        "erofs",
    }
    for name in order:
        for dep in deps[name][1]:
            assert order.index(dep) < order.index(name), (dep, name)


def test_load_order_rejects_cycles():
    deps = {"a": ("a.ko", ["b"]), "b": ("b.ko", ["a"])}
    with pytest.raises(KernelError, match="cycle"):
        fallback.load_order(["a"], deps)


def test_strip_module_signature():
    body = b"\x7fELF" + b"module body" * 10
    signature = b"S" * 300
    info = struct.pack(">BBBBBxxxI", 0, 0, 2, 0, 0, len(signature))
    signed = body + signature + info + fallback.MODULE_SIGNATURE_MAGIC
    assert fallback.strip_module_signature(signed) == body
    assert fallback.strip_module_signature(body) == body


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev); checks the 4-byte alignment of every part."""
    entries = {}
    pos = 0
    while True:
        assert pos % 4 == 0
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        body_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[body_start : body_start + size]
        pos = body_start + size + (-size % 4)
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries[name] = (mode, body, (rmaj, rmin))


def test_initramfs_layout():
    archive = fallback.build_initramfs(
        b"BUSYBOX", ["busybox", "sh", "mount", "switch_root"], [("virtio", b"v1"), ("virtio_blk", b"blk!!")]
    )
    entries = parse_newc(archive)
    assert entries["init"][0] == 0o100755
    assert entries["init"][1].decode() == fallback.INIT_SCRIPT
    assert entries["bin/busybox"] == (0o100755, b"BUSYBOX", (0, 0))
    assert entries["bin/sh"][:2] == (0o120777, b"busybox")
    assert "bin/busybox" in entries and entries["bin/busybox"][0] != 0o120777  # no self-link
    assert entries["dev/console"] == (0o020600, b"", (5, 1))
    assert entries["lib/modules/order"][1] == b"virtio\nvirtio_blk\n"
    assert entries["lib/modules/virtio_blk.ko"][1] == b"blk!!"
    for directory in ("proc", "sys", "dev", "newroot"):
        assert entries[directory][0] == 0o040755
    # deterministic: the same inputs give the same bytes
    assert archive == fallback.build_initramfs(
        b"BUSYBOX", ["sh", "mount", "switch_root", "busybox"], [("virtio", b"v1"), ("virtio_blk", b"blk!!")]
    )


def test_initramfs_is_readable_by_gnu_cpio():
    assert shutil.which("cpio"), "cpio is missing: run scripts/setup.sh (apt-get install cpio)"
    archive = fallback.build_initramfs(b"BB", ["sh"], [("virtio", b"v")])
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True).stdout.decode()
    assert listing.split() == [
        "bin",
        "dev",
        "lib",
        "lib/modules",
        "newroot",
        "proc",
        "sys",
        "dev/console",
        "bin/busybox",
        "bin/sh",
        "lib/modules/virtio.ko",
        "lib/modules/order",
        "init",
    ]


def test_init_script_is_valid_sh():
    shell = shutil.which("busybox") or "/bin/sh"
    argv = [shell, "sh", "-n"] if shell.endswith("busybox") else [shell, "-n"]
    proc = subprocess.run(argv, input=fallback.INIT_SCRIPT.encode(), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert fallback.INIT_SCRIPT.startswith("#!/bin/sh\n")
    assert "FATAL:" in fallback.INIT_SCRIPT
    assert "exec switch_root /newroot /init" in fallback.INIT_SCRIPT


def test_input_hash_covers_init_script_and_modules(monkeypatch):
    before = fallback.input_hash()
    monkeypatch.setattr(fallback, "INIT_SCRIPT", fallback.INIT_SCRIPT + "# changed\n")
    changed_script = fallback.input_hash()
    monkeypatch.setattr(fallback, "WANTED_MODULES", fallback.WANTED_MODULES + ("vsock",))
    assert len({before, changed_script, fallback.input_hash()}) == 3


def test_cached_fallback_picks_newest_complete(cache_dir):
    assert fallback.cached_fallback() is None
    for release, mtime in (("6.1.0-55-cloud-amd64", 100), ("6.1.0-56-cloud-amd64", 200)):
        fake_fallback(cache_dir, release, mtime=mtime)
    found = fallback.cached_fallback()
    assert found is not None and found.release == "6.1.0-56-cloud-amd64"
