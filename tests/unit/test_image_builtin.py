"""The built-in busybox image, built from scratch in a temp cache.

The busybox-static package comes from the shared cache that `scripts/setup.sh`
filled: tests run without network access.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

from matchlock.api.image import DEFAULT_IMAGE
from matchlock.image import builtin
from matchlock.image.store import ImageStore
from support.sample_image import mounted


def test_upstream_version():
    assert builtin.upstream_version("1:1.35.0-4+deb12u1+b1") == "1.35.0"
    assert builtin.upstream_version("1.36.1-9") == "1.36.1"


def test_builtin_image(busybox_cache, tmp_path):
    store = ImageStore()
    assert store.get(DEFAULT_IMAGE) is None
    info = store.resolve(DEFAULT_IMAGE)
    assert info.source == "builtin" and info.layers == 1 and info.lower_fstype == "erofs"
    assert info.config.cmd == ("sh",) and info.config.working_dir == "/"
    assert info.config.env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    assert any((busybox_cache / "debs").glob("busybox-static_*.deb"))

    # Second use: the row and blob are reused as they are.
    mtime = info.lower_path.stat().st_mtime_ns
    assert store.resolve(DEFAULT_IMAGE) == info and info.lower_path.stat().st_mtime_ns == mtime

    with mounted(info.lower_path, tmp_path / "mnt") as root:
        busybox = os.lstat(root / "bin/busybox")
        assert stat.S_ISREG(busybox.st_mode) and stat.S_IMODE(busybox.st_mode) == 0o755
        assert os.readlink(root / "bin/sh") == "/bin/busybox"
        listing = subprocess.run([str(root / "bin/busybox"), "--list-full"], capture_output=True, text=True, check=True)
        applets = [line for line in listing.stdout.split() if line != "bin/busybox"]
        assert len(applets) > 100
        for applet in applets:
            assert os.readlink(root / applet) == "/bin/busybox", applet

        passwd = (root / "etc/passwd").read_text().splitlines()
        assert passwd[0] == "root:x:0:0:root:/root:/bin/sh"
        assert "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" in passwd
        group = (root / "etc/group").read_text()
        for entry in ("root:x:0:", "tty:x:5:", "users:x:100:", "nogroup:x:65534:", "shadow:x:42:"):
            assert entry in group
        shadow = os.lstat(root / "etc/shadow")
        assert stat.S_IMODE(shadow.st_mode) == 0o640 and (shadow.st_uid, shadow.st_gid) == (0, 42)
        release = (root / "etc/os-release").read_text()
        assert 'NAME="matchlock busybox"' in release and "ID=busybox" in release
        version = release.split("VERSION_ID=")[1].split()[0]
        assert f'PRETTY_NAME="matchlock built-in image (busybox {version})"' in release
        assert (root / "etc/hostname").is_file()
        modes = {"root": 0o700, "tmp": 0o1777, "var/tmp": 0o1777, "home": 0o755, "etc/ssl/certs": 0o755}
        for rel, mode in modes.items():
            assert stat.S_IMODE(os.lstat(root / rel).st_mode) == mode, rel
        for rel in ("dev", "proc", "sys", "run", "usr/bin", "usr/sbin", "sbin"):
            assert stat.S_ISDIR(os.lstat(root / rel).st_mode), rel

        # The image really works: run its shell in a chroot (we are root).
        out = subprocess.run(
            [
                shutil.which("chroot") or "/usr/sbin/chroot",
                str(root),
                "/bin/sh",
                "-c",
                "echo $(id -un):$(basename $(readlink /bin/ls))",
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/bin:/usr/bin"},
        )
        assert out.returncode == 0 and out.stdout == "root:busybox\n", out.stderr

    # Removing it and resolving again rebuilds the identical blob (deterministic layer).
    store.remove(DEFAULT_IMAGE)
    assert not info.lower_path.exists()
    rebuilt = store.resolve(DEFAULT_IMAGE)
    assert rebuilt.lower_path == info.lower_path and rebuilt.digest == info.digest
