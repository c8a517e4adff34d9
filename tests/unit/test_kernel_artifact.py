"""Kernel artifact layers without a registry: extraction, the kernel check, and the explicit kernel override."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
from pathlib import Path

import pytest

from matchlock.api.errors import ImageError
from matchlock.image import kernel_artifact
from matchlock.image.kernel_artifact import _extract, check_kernel
from matchlock.kernel.resolve import resolve
from support.kernel_artifacts import fake_kernel, pack
from support.tarballs import entry, layer, tar_layer

ARCH = kernel_artifact.host_arch()


def layer_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "layer"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("form", ["tar.gz", "tar", "raw"])
def test_every_form_yields_the_kernel(tmp_path, form):
    kernel = fake_kernel(ARCH)
    extracted = _extract(layer_file(tmp_path, pack(kernel, form, ARCH)), tmp_path, "layer")
    assert extracted.read_bytes() == kernel
    check_kernel(extracted, "layer")


def test_this_hosts_boot_image_format_passes_the_check(tmp_path):
    image = bytearray(4096)
    if ARCH == "amd64":  # bzImage: boot sector signature and setup header magic
        image[0x1FE:0x200], image[0x202:0x206] = b"\x55\xaa", b"HdrS"
    else:  # arm64 Image header magic
        image[0x38:0x3C] = b"ARM\x64"
    check_kernel(layer_file(tmp_path, bytes(image)), "layer")
    with pytest.raises(ImageError, match="is not a kernel: it is 4096 bytes starting with 00 00"):
        check_kernel(layer_file(tmp_path, bytes(4096)), "layer")


def test_a_big_endian_elf_is_refused(tmp_path):
    elf = b"\x7fELF\x02\x02\x01" + bytes(9) + struct.pack(">HH", 2, 62) + bytes(100)
    with pytest.raises(ImageError, match="not a little-endian one"):
        check_kernel(layer_file(tmp_path, elf), "layer")


def test_a_member_named_kernel_must_be_a_regular_file(tmp_path):
    name = kernel_artifact.kernel_file_name()
    tar = layer([entry(name, "sym", link="/etc/passwd")])
    with pytest.raises(ImageError, match=f"without a regular file named {name}"):
        _extract(layer_file(tmp_path, tar), tmp_path, "layer")


def test_a_gzip_bomb_stops_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_artifact, "MAX_KERNEL", 1 << 20)
    bomb = gzip.compress(tar_layer({"filler": bytes(4 << 20)}), compresslevel=1)
    with pytest.raises(ImageError, match="expands to more than 2 MiB"):
        _extract(layer_file(tmp_path, bomb), tmp_path, "layer")


def test_an_explicit_kernel_path_wins_over_the_environment(tmp_path, monkeypatch):
    env_kernel, explicit = tmp_path / "env-vmlinux", tmp_path / "explicit-vmlinux"
    env_kernel.write_bytes(b"x")
    explicit.write_bytes(b"y")
    monkeypatch.setenv("MATCHLOCK_KERNEL", str(env_kernel))
    monkeypatch.delenv("MATCHLOCK_KERNEL_INITRD", raising=False)
    image = resolve(kernel_path=explicit)
    assert (image.path, image.kind, image.initrd) == (explicit.resolve(), "override", None)


def test_scratch_left_by_a_killed_pull_is_removed(cache_dir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = kernel_artifact.artifact_root() / "tmp"
    (tmp / f"pull-{dead.pid}-abc").mkdir(parents=True)
    (tmp / f"pull-{dead.pid}-abc" / "layer").write_bytes(b"partial")
    live = tmp / f"pull-{os.getpid()}-def"
    live.mkdir()
    with kernel_artifact._workdir(kernel_artifact.artifact_root()) as work:
        assert sorted(p.name for p in tmp.iterdir()) == sorted([live.name, work.name])
