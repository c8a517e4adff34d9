"""An image with the host's Debian git (it needs only libc, zlib and pcre2) and static busybox.

Shared by tests/vm/test_vfs.py and benchmarks/bench_vfs.py. It is imported into the image store once
(keyed by the git binary and the applet list), so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from support.images import docker_save, image_config
from support.tarballs import entry, layer

GIT_LIBS = ("libpcre2-8.so.0", "libz.so.1", "libc.so.6")
APPLETS = ("sh", "ls", "cat", "echo", "wc", "mkdir", "rm", "stat", "sync", "tr", "head", "tar", "find", "dd", "cp",
           "du", "true")  # fmt: skip


def git_image(matchlock: str) -> str:
    """The image's tag, importing it with `matchlock image import` if the store lacks it."""
    from matchlock.image.store import ImageStore

    git = Path("/usr/bin/git").read_bytes()
    digest = hashlib.sha256(git + " ".join(APPLETS).encode()).hexdigest()[:12]
    tag = f"test/vfs-git:{digest}"
    if ImageStore().get(tag) is not None:
        return tag
    libdir = "usr/lib/x86_64-linux-gnu"
    members = [
        *(entry(top, "sym", link=f"usr/{top}") for top in ("lib", "bin", "sbin")),
        entry("lib64", "sym", link=f"{libdir}"),
        *(
            entry(d, "dir", mode=0o1777 if d == "tmp" else 0o755)
            for d in ("etc", "tmp", "root", "proc", "sys", "dev", "run", "workspace")
        ),  # fmt: skip
        entry("usr/bin/git", data=git, mode=0o755),
        entry("usr/bin/busybox", data=Path("/usr/bin/busybox").read_bytes(), mode=0o755),
        *(entry(f"usr/bin/{a}", "sym", link="busybox") for a in APPLETS),
        entry(f"{libdir}/ld-linux-x86-64.so.2", data=Path(f"/{libdir}/ld-linux-x86-64.so.2").read_bytes(), mode=0o755),
        *(entry(f"{libdir}/{lib}", data=Path(os.path.realpath(f"/{libdir}/{lib}")).read_bytes()) for lib in GIT_LIBS),
        entry("etc/passwd", data="root:x:0:0:root:/root:/bin/sh\n"),
        entry("etc/group", data="root:x:0:\n"),
    ]
    layer_bytes = layer(members)
    config = image_config([layer_bytes], config={"Env": ["PATH=/usr/bin:/bin", "HOME=/root"], "Cmd": ["sh"]})
    with tempfile.TemporaryDirectory(prefix="matchlock-git-image-") as tmp:
        archive = Path(tmp) / "git.tar"
        archive.write_bytes(docker_save([layer_bytes], config, tag=tag))
        with open(archive, "rb") as stdin:
            done = subprocess.run([matchlock, "image", "import", tag], stdin=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"image import {tag} failed: {done.stderr}")
    return tag
