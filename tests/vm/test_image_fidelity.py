"""An imported multi-layer image boots with its filesystem exactly as built.

The image is made here from bytes (support.tarballs) in `docker save` layout
(two layers, whiteouts, an opaque directory, special modes and owners),
imported with the real CLI into the shared image cache (removed afterwards)
and inspected from inside a real VM.
"""

from __future__ import annotations

import uuid

import pytest

from support.cli import run_matchlock
from support.images import docker_save, image_config
from support.tarballs import entry, layer

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

APPLETS = ("sh", "stat", "ls", "cat", "head", "readlink", "id", "echo", "test", "sort", "wc")


def image_tarball(busybox: bytes, tag: str) -> bytes:
    base = layer(
        [
            entry("bin", "dir"),
            entry("bin/busybox", data=busybox, mode=0o755),
            *(entry(f"bin/{applet}", "sym", link="busybox") for applet in APPLETS),
            entry("etc", "dir"),
            entry("etc/passwd", data="root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/data:/bin/sh\n"),
            entry("etc/shadow", data="root:*:19000::::::\n", mode=0o640, gid=42),
            entry("data", "dir", mode=0o750, uid=1000, gid=1000),
            entry("data/owned", data="owned\n", mode=0o640, uid=1000, gid=1000),
            entry("data/suid", data="#!/bin/sh\n", mode=0o4755),
            entry("data/sgid-dir", "dir", mode=0o2775, gid=50),
            entry("data/sticky", "dir", mode=0o1777),
            entry("data/hard-a", data="shared inode\n"),
            entry("data/hard-b", "link", link="data/hard-a"),
            entry("data/link", "sym", link="../etc/passwd"),
            entry("data/dangling", "sym", link="/nowhere"),
            entry("removed-file", data="gone\n"),
            entry("removed-dir", "dir"),
            entry("removed-dir/inner", data="gone too\n"),
            entry("opaque", "dir"),
            entry("opaque/old", data="hidden by the opaque marker\n"),
        ]
    )
    top = layer(
        [
            entry(".wh.removed-file"),
            entry(".wh.removed-dir"),
            entry("opaque", "dir"),
            entry("opaque/.wh..wh..opq"),
            entry("opaque/new", data="from the top layer\n"),
            entry("data/owned", data="replaced\n", mode=0o600, uid=1000, gid=1000),
        ]
    )
    runtime = {"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "Cmd": ["sh", "-c", "echo default-cmd"], "WorkingDir": "/data"}
    return docker_save([base, top], image_config([base, top], config=runtime), tag=tag)


@pytest.fixture(scope="module")
def imported_tag(busybox_path):
    tag = f"test/fidelity:{uuid.uuid4().hex[:8]}"
    result = run_matchlock("image", "import", tag, input=image_tarball(busybox_path.read_bytes(), tag))
    assert result.returncode == 0, result
    assert f"Imported: {tag}".encode() in result.stdout and b"Layers: 2" in result.stdout
    yield tag
    run_matchlock("image", "rm", tag)


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
