"""Guest-local overlay mounts in real VMs: the guest's own overlayfs over a read-only host lower.

Two sandboxes on one host directory, alive together: the first has no interception, so its overlay
is the guest's kernel overlayfs; the second has a block rule on the mount, so it keeps the host-side
overlay. The host directory is byte-for-byte unchanged (contents, modes, owners, mtimes) after both.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from matchlock.api.config import SandboxConfig
from matchlock.api.vfs import MountConfig, VFSConfig, VFSHookRule, VFSInterceptionConfig
from matchlock.sandbox.sandbox import ExecSpec, Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

IMAGE = "matchlock/busybox:builtin"


def _digest(root: Path) -> dict[str, tuple[int, int, int, int, int, str]]:
    """Every entry below and including root: mode, uid, gid, size, mtime_ns and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["."] + dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            body = os.fsencode(os.readlink(path)) if path.is_symlink() else path.read_bytes() if path.is_file() else b""
            key = str(path.relative_to(root))
            out[key] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, hashlib.sha256(body).hexdigest())
    return out


def _host_tree(root: Path, src: Path) -> dict[str, str]:
    """The mounted directory (with a tarball of `src` in it); returns src's files' md5 by relative path."""
    sums = {}
    for d in range(4):
        for f in range(25):
            path = src / f"pkg{d}" / f"mod{f}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(100 + 37 * f))
            sums[f"./pkg{d}/mod{f}.py"] = hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - busybox md5sum
    (src / "pkg0" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    sums["./pkg0/run.sh"] = hashlib.md5(b"#!/bin/sh\necho hi\n").hexdigest()  # noqa: S324
    with tarfile.open(root / "src.tar", "w") as tar:
        tar.add(src, arcname=".")
    (root / "keep.txt").write_text("original\n")
    (root / "gone.txt").write_text("delete me\n")
    (root / "sub").mkdir()
    (root / "sub" / "deep.txt").write_text("deep\n")
    (root / "owned.txt").write_text("owned\n")
    os.chown(root / "owned.txt", 1234, 5678)
    (root / "owned.txt").chmod(0o640)
    (root / "sub").chmod(0o750)
    (root / "link").symlink_to("keep.txt")
    os.utime(root / "keep.txt", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    return sums


LOCAL_SCRIPT = r"""
cd /data
echo "fstype=$(awk '$2=="/data" {print $3}' /proc/mounts)"
echo "fuse_mounts=$(grep -c 'fuse\.matchlock' /proc/self/mountinfo)"
ls /run/matchlock/vfs-lower >/dev/null 2>&1; echo "lower_ls=$?"
ls /run/matchlock/rt/run/boot/upperfs >/dev/null 2>&1; echo "upper_ls=$?"
echo "owned_before=$(stat -c %u:%g:%a owned.txt) sub=$(stat -c %u:%g:%a sub) keep_mtime=$(stat -c %Y keep.txt)"
mkdir out && tar xf src.tar -C out && echo untar=ok
echo "sums=$(cd out && find . -type f -exec md5sum {} + | sort -k2 | tr ' \n' ':,')"
echo more >> keep.txt && echo new > new.txt && rm gone.txt && mv keep.txt kept.txt && mv sub moved
chmod 600 owned.txt && rm -r out/pkg3
echo "owned_after=$(stat -c %u:%g:%a owned.txt)"
echo "kept=$(cat kept.txt | tr '\n' ' ') deep=$(cat moved/deep.txt) link=$(readlink link)"
echo "ls=$(ls | tr '\n' ' ')"
sync
"""

SEES_SCRIPT = r"""
cd /data
echo "fstype=$(awk '$2=="/data" {print $3}' /proc/mounts)"
echo "ls=$(ls | tr '\n' ' ')"
echo "keep=$(cat keep.txt)"
touch /data/id.key 2>/tmp/err; echo "blocked=$? $(grep -c 'not permitted' /tmp/err)"
echo "owned=$(stat -c %u:%g:%a owned.txt)"
"""


def _run(box: Sandbox, loop_thread, script: str) -> dict[str, str]:
    result = loop_thread.run(box.exec(ExecSpec(script)))
    assert result.exit_code == 0, result
    return dict(line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)


def test_a_local_overlay_is_the_guests_own_and_an_intercepted_one_stays_on_the_host(
    tmp_path: Path, loop_thread, state_dir
) -> None:
    host, src = tmp_path / "host", tmp_path / "src"
    host.mkdir()
    sums = _host_tree(host, src)
    before = _digest(host)
    local = VFSConfig(mounts={"/data": MountConfig("overlay", str(host))})
    rule = VFSHookRule(name="no-keys", phase="before", ops=("create",), path="/data/*.key", action="block")
    intercepted = VFSConfig(
        mounts={"/data": MountConfig("overlay", str(host))}, interception=VFSInterceptionConfig(rules=(rule,))
    )

    first = loop_thread.run(Sandbox.create(SandboxConfig(image=IMAGE, vfs=local)))
    try:
        out = _run(first, loop_thread, LOCAL_SCRIPT)
        assert out["fstype"] == "overlay"  # the guest kernel's overlayfs, not the host-side FUSE overlay
        # The raw lower is unreachable: no FUSE mount in the workload's mount table, and its hidden
        # path (under /run/matchlock, detached for workloads) is neither there nor reaches it.
        assert out["fuse_mounts"] == "0"
        assert out["lower_ls"] != "0" and out["upper_ls"] != "0"
        assert out["owned_before"] == "1234:5678:640 sub=0:0:750 keep_mtime=1600000000"
        assert out["untar"] == "ok"
        guest_sums = dict(item.split("::")[::-1] for item in out["sums"].strip(",").split(","))
        assert guest_sums == sums
        assert out["owned_after"] == "1234:5678:600"  # copy-up keeps the owner
        assert out["kept"] == "original more  deep=deep link=keep.txt"
        assert out["ls"] == "kept.txt link moved new.txt out owned.txt src.tar "
        assert _digest(host) == before

        second = loop_thread.run(Sandbox.create(SandboxConfig(image=IMAGE, vfs=intercepted)))
        try:
            seen = _run(second, loop_thread, SEES_SCRIPT)
        finally:
            loop_thread.run(second.aclose())
        assert seen["fstype"] == "fuse.matchlock"  # a rule applies: the host-side overlay
        assert seen["ls"] == "gone.txt keep.txt link owned.txt src.tar sub "  # none of the first's changes
        assert seen["keep"] == "original"
        assert seen["blocked"] == "1 1"  # EPERM from the block rule
        assert seen["owned"] == "1234:5678:640"
        assert _ls_kept(first, loop_thread) == "kept.txt"  # the first still has its own view
    finally:
        loop_thread.run(first.aclose())
    assert _digest(host) == before
    assert not (host / "id.key").exists()


def _ls_kept(box: Sandbox, loop_thread) -> str:
    result = loop_thread.run(box.exec(ExecSpec("ls /data | grep kept")))
    return result.stdout.decode().strip()
