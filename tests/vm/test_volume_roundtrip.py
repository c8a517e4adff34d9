"""`volume cp` into a volume, the guest's view of it through `run --disk @NAME`, and `volume cp` back out.

Owners, modes (setuid/setgid/sticky), symlinks and mtimes must survive host -> volume -> guest -> volume
-> host. Volumes live in the shared cache (`<cache>/volumes`), so the test uses a unique volume name and
always removes it. One VM.
"""

from __future__ import annotations

import os
import secrets
import stat

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

MTIME = 1_600_000_000
# relative path -> (uid, gid, permission bits); the parents come first so they exist when created.
TREE = {
    ".": (0, 0, 0o755),
    "a.txt": (1234, 5678, 0o644),
    "setuid-root": (0, 0, 0o4755),
    "shared": (65534, 65534, 0o1777),
    "shared/secret": (65534, 65534, 0o600),
    "group-dir": (1234, 5678, 0o2750),
}
LINK = ("link", "a.txt", 1234, 5678)


def _build_tree(root) -> None:
    root.mkdir()
    for rel in TREE:
        path = root / rel
        if rel in ("shared", "group-dir"):
            path.mkdir()
        elif rel != ".":
            path.write_text(f"content of {rel}\n")
    link, target, uid, gid = LINK
    os.symlink(target, root / link)
    os.lchown(root / link, uid, gid)
    # Owners and modes last, deepest first, so nothing above blocks the work below it.
    for rel, (uid, gid, mode) in reversed(TREE.items()):
        path = root / rel
        os.chown(path, uid, gid)
        os.chmod(path, mode)  # chown clears setuid/setgid, so the mode goes after it
        os.utime(path, (MTIME, MTIME))


def _guest_line(rel: str, uid: int, gid: int, mode: int) -> str:
    name = "/mnt/data" if rel == "." else f"/mnt/data/{rel}"
    return f"{uid}:{gid} {mode:o} {name} {MTIME}"  # busybox's %N quotes only symlinks


def test_owners_modes_and_links_survive_host_volume_guest_and_back(cli, tmp_path):
    tree = tmp_path / "tree"
    _build_tree(tree)
    name = f"test-roundtrip-{secrets.token_hex(4)}"
    try:
        created = cli("volume", "create", name, "--size", "64")
        assert created.returncode == 0, created
        copied = cli("volume", "cp", str(tree), f"{name}:/data")
        assert copied.returncode == 0, copied

        paths = " ".join("/mnt/data" if rel == "." else f"/mnt/data/{rel}" for rel in TREE)
        script = (
            f"stat -c '%u:%g %a %N %Y' {paths} && stat -c '%u:%g %F %N' /mnt/data/link"
            " && echo written-in-guest > /mnt/data/newfile && chown 4321:8765 /mnt/data/newfile"
            " && chmod 2640 /mnt/data/newfile"
        )
        run = cli("run", "--disk", f"@{name}:/mnt", "--", "sh", "-c", script, timeout=600)
        assert run.returncode == 0, run
        lines = run.stdout.splitlines()
        assert lines[: len(TREE)] == [_guest_line(rel, *owner_mode) for rel, owner_mode in TREE.items()], run
        assert lines[len(TREE)] == "1234:5678 symbolic link '/mnt/data/link' -> 'a.txt'", run

        out = tmp_path / "newfile"
        copied_out = cli("volume", "cp", f"{name}:/data/newfile", str(out))
        assert copied_out.returncode == 0, copied_out
        info = os.lstat(out)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (4321, 8765, 0o2640)
        assert stat.S_ISREG(info.st_mode)
        assert out.read_text() == "written-in-guest\n"

        # The whole tree back out: what went in comes out unchanged, next to the guest's file.
        back = tmp_path / "back"
        whole = cli("volume", "cp", f"{name}:/data", str(back))
        assert whole.returncode == 0, whole
        for rel, (uid, gid, mode) in TREE.items():
            info = os.lstat(back / rel)
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, mode), rel
            if rel != ".":  # the guest added newfile to "." and so rightly changed its mtime
                assert int(info.st_mtime) == MTIME, rel
            if stat.S_ISREG(info.st_mode):
                assert (back / rel).read_text() == f"content of {rel}\n"
        link, target, uid, gid = LINK
        info = os.lstat(back / link)
        assert stat.S_ISLNK(info.st_mode) and os.readlink(back / link) == target
        assert (info.st_uid, info.st_gid) == (uid, gid)
        assert sorted(p.name for p in back.iterdir()) == sorted(
            ["a.txt", "setuid-root", "shared", "group-dir", "link", "newfile"]
        )
    finally:
        cli("volume", "rm", name)
