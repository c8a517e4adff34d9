"""The three-layer sample image of the image tests, and the check of an unpacked copy.

The layers exercise what squashing must get right: whiteouts of a file and of a
directory, an opaque directory, a file replaced by a directory's worth of entries,
hard and symbolic links, set-id bits, owners, devices, a FIFO, an xattr and
implicit parent directories.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from matchlock.image.archive import host_arch
from support.images import image_config, make_image, oci_archive
from support.tarballs import MTIME, entry, layer

SAMPLE_CONFIG = {"Env": ["PATH=/usr/bin:/bin", "A=b=c"], "Cmd": ["/bin/sh"], "WorkingDir": "/w", "User": "1000"}


def sample_layers() -> list[bytes]:
    base = layer(
        [
            entry("./", "dir"),
            entry("bin", "dir"),
            entry("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
            entry("bin/sgid", data=b"x", mode=0o2711, gid=42),
            entry("etc", "dir"),
            entry("etc/conf", data=b"conf-v1"),
            entry("etc/gone", data=b"deleted later"),
            entry("home", "dir"),
            entry("home/user", "dir", uid=1000, gid=1000, mode=0o700),
            entry("home/user/file", data=b"mine", uid=1000, gid=1000, mode=0o600),
            entry("tmp", "dir", mode=0o1777),
            entry("usr", "dir"),
            entry("usr/lib", "dir"),
            entry("usr/lib/a.so", data=b"AAAA"),
            entry("usr/lib/sub", "dir"),
            entry("usr/lib/sub/deep", data=b"deep"),
            entry("opt", "dir"),
            entry("opt/old1", data=b"1"),
            entry("opt/keep", "dir"),
            entry("opt/keep/old2", data=b"2"),
            entry("var", "dir"),
            entry("var/thing", "dir"),
            entry("var/thing/child", data=b"c"),
            entry("dev", "dir"),
            entry("dev/null", "chr", mode=0o666, dev=(1, 3)),
            entry("dev/fifo", "fifo", mode=0o600),
        ]
    )
    middle = layer(
        [
            entry("bin/link-to-tool", "link", link="bin/tool"),
            entry("bin/sh", "sym", link="/bin/tool"),
            entry("bin/rel", "sym", link="../usr/lib/a.so", uid=1000, gid=1000),
            entry("etc/conf", data=b"conf-v2", uid=1000, gid=1000),
            entry("etc/.wh.gone"),
            entry("usr/lib/.wh.sub"),
            entry("opt/.wh..wh..opq"),
            entry("opt/new", data=b"new in opaque layer"),
            entry("var/thing", data=b"now a file"),
            entry("capfile", data=b"cap", xattrs={"user.note": "hello"}),
        ]
    )
    top = layer(
        [
            entry("top", data=b"top", mtime=MTIME + 100),
            entry("./usr/lib/sub2/", "dir"),
            entry("usr/lib/sub2/x", data=b"implicit parents"),
        ]
    )
    return [base, middle, top]


def sample_config(layers: list[bytes], arch: str | None = None) -> bytes:
    return image_config(layers, arch=arch or host_arch(), config=SAMPLE_CONFIG)


def sample_oci_layout(layers: list[bytes], compress: str = "gzip", platforms: list[str] | None = None,
                      corrupt_layer: int | None = None) -> bytes:  # fmt: skip
    """An OCI layout tarball with one manifest per architecture in `platforms` (default: the host's).

    `corrupt_layer` flips a byte in that layer of the first manifest but keeps its digest name.
    """
    images = {arch: make_image(layers, arch=arch, kind=compress, config=SAMPLE_CONFIG)
              for arch in platforms or [host_arch()]}  # fmt: skip
    if corrupt_layer is not None:
        first = next(iter(images.values()))
        digest = first.layer_digests[corrupt_layer]
        data = bytearray(first.blobs[digest])
        data[len(data) // 2] ^= 0xFF
        first.blobs[digest] = bytes(data)
    return oci_archive(images)


@contextlib.contextmanager
def mounted(blob: Path, where: Path) -> Iterator[Path]:
    """The erofs image `blob`, loop-mounted read-only at `where` for the block."""
    where.mkdir(exist_ok=True)
    proc = subprocess.run(
        ["mount", "-o", "loop,ro", "-t", "erofs", str(blob), str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(
            f"cannot loop-mount the erofs image: {proc.stderr.strip()}; run the tests as root on a "
            f"kernel with erofs (modprobe erofs) and loop devices (modprobe loop)"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def assert_sample_tree(root: Path) -> None:
    def st(rel: str) -> os.stat_result:
        return os.lstat(root / rel)

    tool = st("bin/tool")
    assert stat.S_IMODE(tool.st_mode) == 0o4755 and (tool.st_uid, tool.st_gid) == (0, 0)
    assert stat.S_IMODE(st("bin/sgid").st_mode) == 0o2711 and st("bin/sgid").st_gid == 42
    assert stat.S_IMODE(st("tmp").st_mode) == 0o1777
    assert st("bin/link-to-tool").st_ino == tool.st_ino and tool.st_nlink == 2
    assert os.readlink(root / "bin/sh") == "/bin/tool"
    assert os.readlink(root / "bin/rel") == "../usr/lib/a.so"
    assert (st("bin/rel").st_uid, st("bin/rel").st_gid) == (1000, 1000)
    assert (st("home/user").st_uid, st("home/user").st_gid) == (1000, 1000)
    assert stat.S_IMODE(st("home/user").st_mode) == 0o700
    assert (st("home/user/file").st_uid, st("home/user/file").st_gid) == (1000, 1000)
    assert (root / "etc/conf").read_bytes() == b"conf-v2" and st("etc/conf").st_uid == 1000
    assert not os.path.lexists(root / "etc/gone")  # whiteout of a file
    assert not os.path.lexists(root / "usr/lib/sub")  # whiteout of a directory
    assert (root / "usr/lib/a.so").read_bytes() == b"AAAA"
    assert sorted(os.listdir(root / "opt")) == ["new"]  # opaque: lower entries gone, same layer kept
    assert stat.S_ISREG(st("var/thing").st_mode) and (root / "var/thing").read_bytes() == b"now a file"
    assert stat.S_ISCHR(st("dev/null").st_mode) and os.major(st("dev/null").st_rdev) == 1
    assert os.minor(st("dev/null").st_rdev) == 3 and stat.S_IMODE(st("dev/null").st_mode) == 0o666
    assert stat.S_ISFIFO(st("dev/fifo").st_mode)
    assert st("top").st_mtime == MTIME + 100 and st("etc").st_mtime == MTIME
    assert st("usr/lib/sub2").st_mtime == MTIME  # dir mtime survives its contents being written
    # Implicit parent directories are created as root-owned 0755 directories.
    assert (root / "usr/lib/sub2/x").read_bytes() == b"implicit parents"
    assert stat.S_IMODE(st(".").st_mode) == 0o755
