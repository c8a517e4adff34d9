"""Host files in a real VM: `run -v` (host_fs, overlay, read-only, owners, mounts outside the workspace),
git in a mount, and the published SDK's mounts with wire rules and after-hooks. Three VMs in all.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import stat
import subprocess
import tarfile
import textwrap
from pathlib import Path

import pytest

from support import sdk_compat
from support.cli import MATCHLOCK
from support.git_image import git_image as support_git_image

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


def _tree_digest(root: Path) -> dict[str, tuple[int, int, int, str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            body = os.fsencode(os.readlink(path)) if path.is_symlink() else path.read_bytes() if path.is_file() else b""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size, hashlib.sha256(body).hexdigest())
    return out


def _source_tree(root: Path) -> None:
    for d in range(8):
        sub = root / f"pkg{d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(12):
            (sub.parent / f"mod{f}.py").write_text(f"# {d}/{f}\n" * (f + 1))
        (sub / "data.bin").write_bytes(os.urandom(70_000 + d))
        (sub / "run.sh").write_text("#!/bin/sh\necho hi\n")
        (sub / "run.sh").chmod(0o750)
        (sub / "link").symlink_to("../mod0.py")


def _compare_trees(left: Path, right: Path) -> list[str]:
    """Differences in names, contents, permission bits and symlink targets."""
    problems = []
    cmp = filecmp.dircmp(left, right)
    stack = [cmp]
    while stack:
        c = stack.pop()
        problems += [f"only in one: {c.left}: {c.left_only} {c.right_only}"] if c.left_only or c.right_only else []
        for name in c.common_files:
            a, b = Path(c.left, name), Path(c.right, name)
            if a.is_symlink() or b.is_symlink():
                if os.readlink(a) != os.readlink(b):
                    problems.append(f"link {a}")
            elif a.read_bytes() != b.read_bytes() or stat.S_IMODE(a.stat().st_mode) != stat.S_IMODE(b.stat().st_mode):
                problems.append(f"differs: {a}")
        stack.extend(c.subdirs.values())
    return problems


GUEST_SCRIPT = r"""
cd /workspace
echo "cwd=$(pwd)"
echo "from_host=$(cat rw/from-host.txt)"
echo guest-wrote > rw/from-guest.txt
mkdir -p rw/out && tar xf rw/src.tar -C rw/out && echo untar=ok
echo appended >> rw/from-host.txt
: > rw/trunc.txt && truncate -s 123457 rw/trunc.txt 2>/dev/null || dd if=/dev/zero of=rw/trunc.txt bs=1 count=0 seek=123457 2>/dev/null
ln -s from-guest.txt rw/sym && echo "sym=$(readlink rw/sym)"
mv rw/from-guest.txt rw/renamed.txt && echo rename=ok
echo "ovl_before=$(cat ovl/keep.txt)"
echo changed > ovl/keep.txt && rm ovl/gone.txt && mkdir ovl/newdir && echo x > ovl/newdir/f && mv ovl/sub ovl/moved
echo "ovl_after=$(cat ovl/keep.txt) $(ls ovl | tr '\n' ' ')"
echo "ro_read=$(cat /root/ro/config)"
echo x > /root/ro/config 2>/dev/null; echo "ro_write=$?"
touch /root/ro/new 2>/dev/null; echo "ro_create=$?"
rm /root/ro/config 2>/dev/null; echo "ro_remove=$?"
chmod 777 /root/ro/config 2>/dev/null; echo "ro_chmod=$?"
echo "owned=$(stat -c %u:%g owned/file)"
cat rw/escape/secret 2>/dev/null; echo "escape_link=$?"
cat rw/../../etc/hostname >/dev/null 2>&1; echo "dotdot=guest-own-etc"
sync
"""


def test_run_volumes_read_write_overlay_readonly_owners(cli, tmp_path: Path) -> None:
    rw, ovl, ro, owned, outside = (tmp_path / n for n in ("rw", "ovl", "ro", "owned", "outside"))
    for d in (rw, ovl, ro, owned, outside):
        d.mkdir()
    (rw / "from-host.txt").write_text("hello from host\n")
    src = tmp_path / "src"
    _source_tree(src)
    with tarfile.open(rw / "src.tar", "w") as tar:
        tar.add(src, arcname="src")
    (outside / "secret").write_text("host secret\n")
    (rw / "escape").symlink_to(outside)  # the guest's kernel resolves it in the guest, never the host
    (ovl / "keep.txt").write_text("original\n")
    (ovl / "gone.txt").write_text("delete me\n")
    (ovl / "sub").mkdir()
    (ovl / "sub" / "deep.txt").write_text("deep\n")
    (ro / "config").write_text("ro-content\n")
    (owned / "file").write_text("owned\n")
    overlay_before = _tree_digest(ovl)
    ro_before = _tree_digest(ro)

    result = cli(
        "run", "--no-network", "--workspace", "/workspace",
        "-v", f"{rw}:rw:host_fs", "-v", f"{ovl}:/workspace/ovl", "-v", f"{ro}:/root/ro:ro",
        "-v", f"{owned}:owned:host_fs,uid=1000,gid=1000",
        "--", "sh", "-c", GUEST_SCRIPT,
    )  # fmt: skip
    assert result.returncode == 0, result
    out = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert out["cwd"] == "/workspace"  # the workspace is the default working directory
    assert out["from_host"] == "hello from host"
    assert (rw / "renamed.txt").read_text() == "guest-wrote\n"
    assert (rw / "from-host.txt").read_text() == "hello from host\nappended\n"
    assert (rw / "trunc.txt").stat().st_size == 123457
    assert out["sym"] == "from-guest.txt" and os.readlink(rw / "sym") == "from-guest.txt"
    assert out["untar"] == "ok"
    assert _compare_trees(src, rw / "out" / "src") == []
    assert out["ovl_before"] == "original"
    assert out["ovl_after"] == "changed keep.txt moved newdir "
    assert _tree_digest(ovl) == overlay_before  # the host is byte-for-byte unchanged
    assert out["ro_read"] == "ro-content"
    assert [out[k] for k in ("ro_write", "ro_create", "ro_remove", "ro_chmod")] == ["1", "1", "1", "1"]
    assert _tree_digest(ro) == ro_before
    assert out["owned"] == "1000:1000"
    assert out["escape_link"] != "0"
    assert os.listdir(outside) == ["secret"]


SDK_PROGRAM = textwrap.dedent(
    """
    import json, sys, threading
    from matchlock import Client, Sandbox, VFSHookRule, VFSInterceptionConfig

    shared, snapshot = sys.argv[1], sys.argv[2]
    seen, lock = [], threading.Lock()

    def after(event):
        with lock:
            seen.append([event.op, event.path, event.size])

    rules = [
        VFSHookRule(name="no-keys", phase="before", ops=["create"], path="/workspace/shared/*.key", action="block"),
        VFSHookRule(name="audit", phase="after", ops=["write"], path="/workspace/shared/*", hook=after),
    ]
    sandbox = (
        Sandbox("matchlock/busybox:builtin")
        .with_workspace("/workspace")
        .mount_host_dir("/workspace/shared", shared)
        .mount_overlay("/workspace/snap", snapshot)
        .mount_memory("/workspace/scratch")
        .with_vfs_interception(VFSInterceptionConfig(rules=rules))
    )
    report = {}
    with Client() as client:
        client.create(sandbox.options())
        r = client.exec("echo payload > /workspace/shared/out.txt && cat /workspace/snap/base.txt")
        report["write"] = [r.exit_code, r.stdout]
        r = client.exec("touch /workspace/shared/id.key")
        report["blocked"] = [r.exit_code, "not permitted" in r.stderr]
        client.write_file("/workspace/shared/via-sdk.txt", b"abc")
        r = client.exec("echo tmp > /workspace/scratch/t && cat /workspace/scratch/t && ls /workspace")
        report["scratch"] = r.stdout.split()
        client.exec("sync")
        import time
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                if any(p.endswith("via-sdk.txt") for _, p, _ in seen):
                    break
            time.sleep(0.1)
        with lock:
            report["events"] = sorted({(op, path) for op, path, _ in seen})
            report["sizes"] = sorted({size for op, path, size in seen if path.endswith("out.txt")})
    client.remove()
    print(json.dumps(report))
    """
)


def test_published_sdk_mounts_block_rule_and_after_hook(tmp_path: Path, state_dir) -> None:
    failure = os.environ.get(sdk_compat.ERROR_ENV)
    if failure:
        pytest.fail(f"the published SDK {sdk_compat.PUBLISHED_VERSION} is not installed: {failure}")
    python = sdk_compat.ensure()
    shared, snap = tmp_path / "shared", tmp_path / "snap"
    shared.mkdir()
    snap.mkdir()
    (snap / "base.txt").write_text("base\n")
    program = tmp_path / "program.py"
    program.write_text(SDK_PROGRAM)
    env = {**os.environ, "MATCHLOCK_BIN": MATCHLOCK}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(python), "-I", str(program), str(shared), str(snap)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["write"] == [0, "base\n"]
    assert report["blocked"][0] != 0 and report["blocked"][1], report
    assert not (shared / "id.key").exists()
    assert (shared / "out.txt").read_text() == "payload\n"
    assert (shared / "via-sdk.txt").read_bytes() == b"abc"  # write_file goes through the mount too
    assert report["scratch"] == ["tmp", "scratch", "shared", "snap"]
    assert ["write", "/workspace/shared/out.txt"] in report["events"]
    assert ["write", "/workspace/shared/via-sdk.txt"] in report["events"]
    assert all(op == "write" for op, _ in report["events"])  # the after-hook asked for writes only
    assert 8 in report["sizes"]  # "payload\n"


@pytest.fixture(scope="module")
def git_image(vm_prerequisites) -> str:
    return support_git_image(MATCHLOCK)


GIT_SCRIPT = r"""
set -e
cd /workspace/repo
git init -q
git add -A
git -c user.name=agent -c user.email=agent@example.com commit -qm "from the guest"
echo "status=$(git status --porcelain | wc -l)"
echo change >> pkg0/mod0.py
echo "dirty=$(git status --porcelain)"
git -c user.name=agent -c user.email=agent@example.com commit -qam second
echo "log=$(git log --oneline | wc -l)"
"""


def test_git_init_add_commit_in_a_mount(cli, tmp_path: Path, git_image: str) -> None:
    repo = tmp_path / "repo"
    _source_tree(repo)
    result = cli("run", "--no-network", "--image", git_image, "-v", f"{repo}:/workspace/repo:host_fs",
                 "--", "sh", "-c", GIT_SCRIPT)  # fmt: skip
    assert result.returncode == 0, result
    out = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert out == {"status": "0", "dirty": " M pkg0/mod0.py", "log": "2"}, result
    # The host's git reads what the guest's git wrote through the mount.
    host_git = ["git", "-c", f"safe.directory={repo}", "-C", str(repo)]
    fsck = subprocess.run([*host_git, "fsck", "--strict"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
    status = subprocess.run([*host_git, "status", "--porcelain"], capture_output=True, text=True, check=True)
    assert status.stdout == ""
    log = subprocess.run([*host_git, "log", "--format=%s"], capture_output=True, text=True, check=True)
    assert log.stdout.split("\n")[:2] == ["second", "from the guest"]
