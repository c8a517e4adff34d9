"""The built-in default image: Debian's static busybox plus a minimal /etc.

It needs no registry, only the Debian mirror. The image is a single
deterministic layer tar (every entry stamped with the busybox binary's
mtime), so its diff_id, and therefore the squashed blob, changes exactly when
the busybox-static package does.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import ImageError
from ..util import debian
from .archive import host_arch

PACKAGE = "busybox-static"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# (path, mode); parents come first once sorted.
DIRECTORIES = {
    "bin": 0o755,
    "dev": 0o755,
    "etc": 0o755,
    "etc/ssl": 0o755,
    "etc/ssl/certs": 0o755,
    "home": 0o755,
    "proc": 0o555,
    "root": 0o700,
    "run": 0o755,
    "sbin": 0o755,
    "sys": 0o555,
    "tmp": 0o1777,
    "usr": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "usr/local": 0o755,
    "usr/local/bin": 0o755,
    "usr/local/sbin": 0o755,
    "usr/share": 0o755,
    "usr/share/doc": 0o755,
    "var": 0o755,
    "var/tmp": 0o1777,
}
PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
shadow:x:42:
users:x:100:
nogroup:x:65534:
"""
SHADOW_GID = 42
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@dataclass
class PreparedImage:
    layer: io.BytesIO  # the single layer tar
    diff_id: str
    config: dict  # a full OCI image config
    digest: str  # sha256 of the canonical config JSON, like an image ID
    version: str  # busybox upstream version


def upstream_version(deb_version: str) -> str:
    """'1:1.35.0-4+deb12u1+b1' -> '1.35.0'."""
    return deb_version.split(":", 1)[-1].rsplit("-", 1)[0]


def prepare(work: Path) -> PreparedImage:
    deb = debian.download([PACKAGE])[PACKAGE]
    tree = work / "busybox-deb"
    debian.extract(deb, tree)
    deb_version = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    version = upstream_version(deb_version)
    binary = next((p for p in (tree / "bin/busybox", tree / "usr/bin/busybox") if p.is_file()), None)
    if binary is None:
        raise ImageError(f"{deb.name} has no busybox binary")
    listing = subprocess.run([str(binary), "--list-full"], capture_output=True, text=True)
    if listing.returncode != 0:
        raise ImageError(f"busybox --list-full failed: {listing.stderr.strip()}")
    applets = {line.strip().strip("/") for line in listing.stdout.splitlines() if line.strip()}
    # "bin/busybox" is in the list; linking it would replace the binary with a self-symlink.
    applets.discard("bin/busybox")
    applets.add("bin/sh")

    data = _layer(binary, applets, tree, version)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = {
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Env": [PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": f"matchlock builtin from {PACKAGE} {deb_version}"}],
    }
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(canonical).hexdigest()
    return PreparedImage(io.BytesIO(data), diff_id, config, digest, version)


def _layer(binary: Path, applets: set[str], tree: Path, version: str) -> bytes:
    mtime = int(binary.stat().st_mtime)
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def add(name: str, kind: bytes, mode: int, data: bytes | None = None, link: str = "", gid: int = 0) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.uid, info.gid = kind, mode, mtime, 0, gid
        info.uname, info.gname = "root", "shadow" if gid == SHADOW_GID else "root"
        info.linkname = link
        info.size = len(data) if data is not None else 0
        entries[name] = (info, data)

    directories = dict(DIRECTORIES)
    for applet in applets:  # every parent of an applet must exist as a directory
        parts = applet.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directories.setdefault("/".join(parts[:depth]), 0o755)
    directories["usr/share/doc/" + PACKAGE] = 0o755
    for name, mode in directories.items():
        add(name, tarfile.DIRTYPE, mode)
    add("bin/busybox", tarfile.REGTYPE, 0o755, binary.read_bytes())
    for applet in applets:
        add(applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox")
    copyright_file = tree / "usr/share/doc" / PACKAGE / "copyright"
    if copyright_file.is_file():  # busybox is GPL: ship its licence text
        add(f"usr/share/doc/{PACKAGE}/copyright", tarfile.REGTYPE, 0o644, copyright_file.read_bytes())
    os_release = (
        'NAME="matchlock busybox"\nID=busybox\n'
        f'VERSION_ID={version}\nPRETTY_NAME="matchlock built-in image (busybox {version})"\n'
    )
    shadow = "".join(f"{line.split(':', 1)[0]}:*::0:99999:7:::\n" for line in PASSWD.splitlines())
    for name, text, mode, gid in (
        ("etc/passwd", PASSWD, 0o644, 0),
        ("etc/group", GROUP, 0o644, 0),
        ("etc/shadow", shadow, 0o640, SHADOW_GID),
        ("etc/os-release", os_release, 0o644, 0),
        ("etc/hostname", "matchlock\n", 0o644, 0),
        ("etc/hosts", HOSTS, 0o644, 0),
    ):
        add(name, tarfile.REGTYPE, mode, text.encode(), gid=gid)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            info, data = entries[name]
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()
