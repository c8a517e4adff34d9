"""An imported multi-layer image boots with its filesystem exactly as built.

The image is made here with `tarfile` in `docker save` layout (two layers,
whiteouts, an opaque directory, special modes and owners), imported with the
real CLI and inspected from inside a real VM.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from matchlock import debian

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

APPLETS = ("sh", "stat", "ls", "cat", "head", "readlink", "id", "echo", "test", "sort", "wc")


def _entry(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, mode: int = 0o644, uid: int = 0,
           gid: int = 0, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, gid, linkname
    info.mtime = 1_700_000_000
    info.size = len(data) if data is not None else 0
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _layer(build) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return buffer.getvalue()


def _busybox(tmp_path: Path) -> bytes:
    deb = debian.download(["busybox-static"])["busybox-static"]
    debian.extract(deb, tmp_path / "bb")
    return (tmp_path / "bb" / "bin" / "busybox").read_bytes()


def _image_tarball(tmp_path: Path, tag: str) -> Path:
    busybox = _busybox(tmp_path)

    def base(tar):
        _entry(tar, "bin", kind=tarfile.DIRTYPE, mode=0o755)
        _entry(tar, "bin/busybox", data=busybox, mode=0o755)
        for applet in APPLETS:
            _entry(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        _entry(tar, "etc", kind=tarfile.DIRTYPE, mode=0o755)
        _entry(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/data:/bin/sh\n")
        _entry(tar, "etc/shadow", data=b"root:*:19000::::::\n", mode=0o640, gid=42)
        _entry(tar, "data", kind=tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000)
        _entry(tar, "data/owned", data=b"owned\n", mode=0o640, uid=1000, gid=1000)
        _entry(tar, "data/suid", data=b"#!/bin/sh\n", mode=0o4755)
        _entry(tar, "data/sgid-dir", kind=tarfile.DIRTYPE, mode=0o2775, gid=50)
        _entry(tar, "data/sticky", kind=tarfile.DIRTYPE, mode=0o1777)
        _entry(tar, "data/hard-a", data=b"shared inode\n")
        _entry(tar, "data/hard-b", kind=tarfile.LNKTYPE, linkname="data/hard-a")
        _entry(tar, "data/link", kind=tarfile.SYMTYPE, linkname="../etc/passwd", mode=0o777)
        _entry(tar, "data/dangling", kind=tarfile.SYMTYPE, linkname="/nowhere", mode=0o777)
        _entry(tar, "removed-file", data=b"gone\n")
        _entry(tar, "removed-dir", kind=tarfile.DIRTYPE, mode=0o755)
        _entry(tar, "removed-dir/inner", data=b"gone too\n")
        _entry(tar, "opaque", kind=tarfile.DIRTYPE, mode=0o755)
        _entry(tar, "opaque/old", data=b"hidden by the opaque marker\n")

    def top(tar):
        _entry(tar, ".wh.removed-file")
        _entry(tar, ".wh.removed-dir")
        _entry(tar, "opaque", kind=tarfile.DIRTYPE, mode=0o755)
        _entry(tar, "opaque/.wh..wh..opq")
        _entry(tar, "opaque/new", data=b"from the top layer\n")
        _entry(tar, "data/owned", data=b"replaced\n", mode=0o600, uid=1000, gid=1000)

    layers = [_layer(base), _layer(top)]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "FROM_IMAGE=yes"],
            "Cmd": ["sh", "-c", "echo default-cmd"],
            "WorkingDir": "/data",
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]},
    }
    config_bytes = json.dumps(config).encode()
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        names = []
        for index, layer in enumerate(layers):
            names.append(f"layer{index}/layer.tar")
            _entry(tar, names[-1], data=layer)
        config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
        _entry(tar, config_name, data=config_bytes)
        manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": names}]
        _entry(tar, "manifest.json", data=json.dumps(manifest).encode())
    return archive


@pytest.fixture(scope="module")
def imported_tag(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fidelity")
    tag = f"test/fidelity:{uuid.uuid4().hex[:8]}"
    archive = _image_tarball(tmp, tag)
    matchlock = str(Path(__import__("sys").executable).parent / "matchlock")
    with open(archive, "rb") as stdin:
        result = subprocess.run([matchlock, "image", "import", tag], stdin=stdin, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"Imported: {tag}" in result.stdout and "Layers: 2" in result.stdout
    yield tag
    subprocess.run([matchlock, "image", "rm", tag], capture_output=True)


def test_ownership_modes_and_links(cli, imported_tag):
    script = (
        "cd /; for p in data data/owned data/suid data/sgid-dir data/sticky data/hard-a etc/shadow; do "
        "stat -c '%n %u:%g %a %h' $p; done; readlink data/link; readlink data/dangling; cat data/link | head -c 4; echo; "
        "stat -c %i data/hard-a data/hard-b | sort -u | wc -l; cat data/owned"
    )
    result = cli("run", "--image", imported_tag, "--", "sh", "-c", script)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[:7] == [
        "data 1000:1000 750 4",
        "data/owned 1000:1000 600 1",
        "data/suid 0:0 4755 1",
        "data/sgid-dir 0:50 2775 2",
        "data/sticky 0:0 1777 2",
        "data/hard-a 0:0 644 2",
        "etc/shadow 0:42 640 1",
    ]
    assert lines[7:] == ["../etc/passwd", "/nowhere", "root", "1", "replaced"]


def test_whiteouts_and_opaque_directories(cli, imported_tag):
    result = cli("run", "--image", imported_tag, "--", "sh", "-c",
                 "ls -A /; echo --; ls -A /opaque; test -e /removed-dir/inner && echo LEAK || echo clean")  # fmt: skip
    assert result.returncode == 0, result
    root, rest = result.stdout.split("--\n")
    assert "removed-file" not in root.split() and "removed-dir" not in root.split()
    assert not any(name.startswith(".wh.") for name in root.split())
    assert rest.splitlines() == ["new", "clean"]


def test_image_config_is_applied(cli, imported_tag):
    default = cli("run", "--image", imported_tag)
    assert default.stdout == "default-cmd\n", default
    env_and_cwd = cli("run", "--image", imported_tag, "--", "sh", "-c", "pwd; echo $FROM_IMAGE; id -un")
    assert env_and_cwd.stdout.splitlines() == ["/data", "yes", "root"], env_and_cwd
    as_app = cli("run", "--image", imported_tag, "-u", "app", "--", "sh", "-c", "id -u; cat /data/owned")
    assert as_app.stdout.splitlines() == ["1000", "replaced"], as_app
