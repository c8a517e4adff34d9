"""Rootless pieces without a VM: descriptor passing from the namespace helper, private state
directories, and image disks with exact ownership built by an ordinary user."""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from matchlock.api import paths
from matchlock.api.errors import SetupError, UsageError
from matchlock.image import layers, unprivileged
from matchlock.net import namespace as ns
from support.images import sha256
from support.rootless import as_user, environment, interpreter
from support.sample_image import assert_sample_tree, mounted, sample_layers

NOBODY = 65534


def test_helper_hands_back_namespaces_tap_and_listeners_in_the_new_namespace():
    namespace = ns.SandboxNamespace(1400)
    namespace.create()
    try:
        assert namespace.fd is not None and namespace.userns_fd is not None and namespace.tap_fd is not None
        assert os.readlink(f"/proc/self/fd/{namespace.fd}") == f"net:[{namespace.inode}]"
        assert namespace.inode != os.stat("/proc/self/ns/net").st_ino
        assert os.readlink(f"/proc/self/fd/{namespace.userns_fd}").startswith("user:[")
        assert os.readlink(f"/proc/self/fd/{namespace.tap_fd}") == "/dev/net/tun"
        http = namespace.listen_tcp(ns.PORTS.http)
        dns = namespace.bind_udp(ns.PORTS.dns)
        with http, dns:
            assert http.getsockname() == ("0.0.0.0", ns.PORTS.http) and http.type == socket.SOCK_STREAM
            assert dns.getsockname() == ("0.0.0.0", ns.PORTS.dns) and dns.type == socket.SOCK_DGRAM

            # The listener lives in the sandbox namespace: from there it answers, with the MTU applied.
            def dial() -> str:
                with socket.create_connection(("127.0.0.1", ns.PORTS.http), timeout=5):
                    pass
                return subprocess.run(["ip", "-o", "link", "show", ns.TAP], capture_output=True, text=True).stdout

            assert " mtu 1400 " in namespace.run_inside(dial)
        with pytest.raises(SetupError, match="no listening socket for port 10080"):
            namespace.listen_tcp(ns.PORTS.http)
    finally:
        namespace.close()
    assert namespace.fd is None and namespace.tap_fd is None and namespace.userns_fd is None
    namespace.close()  # idempotent


def test_a_failed_helper_closes_every_descriptor_and_names_the_fix():
    namespace = ns.SandboxNamespace(1500)
    stray = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(SetupError, match=r"cannot open /dev/net/tun: Permission denied.*sudo matchlock setup linux"):
        namespace._adopt(b"error: cannot open /dev/net/tun: Permission denied [errno 13]", [stray], 1)
    with pytest.raises(OSError):
        os.fstat(stray)
    with pytest.raises(SetupError, match="unshare failed: Operation not permitted; root needs CAP_SYS_ADMIN"):
        namespace._adopt(b"error: unshare: unshare failed: Operation not permitted", [], 1)
    user = ns.explain("unshare: unshare failed: Operation not permitted", root=False)
    assert user.endswith(
        "cannot create a user namespace; fix: sudo matchlock setup linux"
        " (enables unprivileged user namespaces); `matchlock diagnose` shows which setting is off"
    )
    with pytest.raises(SetupError, match="helper exit status -9"):
        namespace._adopt(b"", [], -9)


def test_helper_runs_as_an_ordinary_user(tmp_path):
    """The same helper, run as nobody, builds the namespace and passes the descriptors back."""
    script = (
        "import json, os; from matchlock.net import namespace as ns\n"
        "n = ns.SandboxNamespace(1500); n.create()\n"
        "print(json.dumps([os.getuid(), os.readlink(f'/proc/self/fd/{n.tap_fd}'), n.inode is not None]))\n"
    )
    proc = as_user(NOBODY, NOBODY, [interpreter(), "-c", script])
    tun_open = stat.S_IMODE(os.stat("/dev/net/tun").st_mode) & 0o006 == 0o006
    if tun_open:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f'[{NOBODY}, "/dev/net/tun", true]'
    else:  # the machine is not set up: the error must say how to fix it
        assert "sudo matchlock setup linux" in proc.stderr and "/dev/net/tun" in proc.stderr


def test_state_and_cache_directories_are_private(tmp_path, monkeypatch):
    monkeypatch.delenv("MATCHLOCK_STATE_DIR", raising=False)
    monkeypatch.delenv("MATCHLOCK_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.state_dir() == tmp_path / ".matchlock"
    assert stat.S_IMODE((tmp_path / ".matchlock").stat().st_mode) == 0o700
    loose = tmp_path / ".cache" / "matchlock"
    loose.mkdir(parents=True, mode=0o755)
    os.chmod(loose, 0o755)  # made by an older version
    assert paths.cache_dir() == loose and stat.S_IMODE(loose.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(shared))
    assert paths.state_dir() == shared and stat.S_IMODE(shared.stat().st_mode) == 0o755  # the user's choice


def test_home_ignores_a_home_that_belongs_to_someone_else(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, NOBODY, NOBODY)
    monkeypatch.setenv("HOME", str(other))
    import pwd

    assert paths.home() == Path(pwd.getpwuid(os.geteuid()).pw_dir)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.home() == tmp_path


def test_another_users_state_directory_is_refused_with_the_fix(tmp_path, monkeypatch):
    script = "from matchlock.api import paths; paths.vms_dir()"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o755)
    proc = as_user(
        NOBODY, NOBODY, [interpreter(), "-c", script], env=environment(MATCHLOCK_STATE_DIR=str(private / "state"))
    )
    assert proc.returncode != 0
    assert "permission denied; fix: point MATCHLOCK_STATE_DIR at a directory of your own" in proc.stderr
    with pytest.raises(UsageError, match="not a directory"):
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(tmp_path / "file"))
        paths.state_dir()


def test_squashed_tree_round_trips_through_one_tar():
    tree = layers.squash([tarfile.open(fileobj=io.BytesIO(t)) for t in sample_layers()])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        unprivileged.write_tree(tree, tar)
    buffer.seek(0)
    again = layers.squash([tarfile.open(fileobj=buffer)])

    def flat(node, path=()):
        member = node.member
        fields = None if member is None else (member.type, member.mode, member.uid, member.gid, member.mtime,
                                              member.linkname, member.devmajor, member.devminor, member.size,
                                              {k: v for k, v in member.pax_headers.items() if "xattr" in k})  # fmt: skip
        yield path, fields, node.link_target
        for name in sorted(node.children or {}):
            yield from flat(node.children[name], path + (name,))

    assert list(flat(again.root)) == list(flat(tree.root))


def test_an_ordinary_user_builds_an_image_disk_with_exact_ownership(tmp_path):
    """nobody builds the sample image's erofs blob (owners, set-id bits, devices, xattrs), mounted as root."""
    work = Path(tempfile.mkdtemp(prefix="matchlock-rootless-", dir="/tmp"))
    try:
        tars = sample_layers()
        for index, data in enumerate(tars):
            (work / f"layer{index}.tar").write_bytes(data)
        os.chown(work, NOBODY, NOBODY)
        script = (
            "import sys, tarfile; from pathlib import Path; from matchlock.image import layers\n"
            "w = Path(sys.argv[1]); n = int(sys.argv[2])\n"
            "tars = [tarfile.open(w / f'layer{i}.tar') for i in range(n)]\n"
            "print(layers.build_lower(tars, sys.argv[3:], w / 'blobs', w))\n"
        )
        argv = [interpreter(), "-c", script, str(work), str(len(tars)), *[sha256(t) for t in tars]]
        proc = as_user(NOBODY, NOBODY, argv)
        assert proc.returncode == 0, proc.stderr
        blob = Path(proc.stdout.strip())
        assert blob.stat().st_uid == NOBODY
        assert sorted(p.name for p in work.iterdir()) == sorted(["blobs"] + [f"layer{i}.tar" for i in range(len(tars))])
        with mounted(blob, tmp_path / "mnt") as root:
            assert_sample_tree(root)
            assert os.getxattr(root / "capfile", "user.note") == b"hello"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=True)


def test_setup_linux_names_only_what_is_missing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from matchlock.cli import setup_linux
    from matchlock.cli.setup import setup

    tun = tmp_path / "tun"
    tun.write_text("")
    os.chmod(tun, 0o600)
    monkeypatch.setattr(setup_linux, "TUN", tun)
    sysctls = {"user.max_user_namespaces": "0", "kernel.unprivileged_userns_clone": "1"}
    monkeypatch.setattr(setup_linux, "_sysctl", sysctls.get)
    monkeypatch.setattr(setup_linux.shutil, "which", lambda name: f"/usr/bin/{name}")
    names = [need.name for need in setup_linux.needs(None)]
    assert names == ["user-namespaces", "tun"]
    result = CliRunner().invoke(setup, ["linux", "--check"])
    assert result.exit_code == 0, result.output
    assert "user.max_user_namespaces = 0 forbids unprivileged user namespaces" in result.output
    assert f"{tun} is mode 0600" in result.output
    os.chmod(tun, 0o666)
    sysctls["user.max_user_namespaces"] = "15000"
    assert setup_linux.needs(None) == []
    assert "Nothing to do" in CliRunner().invoke(setup, ["linux"]).output


def test_setup_without_a_subcommand_is_still_the_artefact_setup(monkeypatch):
    from click.testing import CliRunner

    from matchlock.cli import setup as setup_cli
    from matchlock.cli import setup_linux

    class Reached(Exception):
        pass

    steps: list[str] = []

    def first_step(label, action):
        steps.append(label)
        raise Reached

    monkeypatch.setattr(setup_cli, "_step", first_step)
    result = CliRunner().invoke(setup_cli.setup, ["--tuned", "skip"])
    assert isinstance(result.exception, Reached) and steps == ["Guest runtime disk"], result.output
    steps.clear()
    monkeypatch.setattr(setup_linux, "needs", lambda user: [])
    result = CliRunner().invoke(setup_cli.setup, ["linux"])
    assert result.exit_code == 0 and "Nothing to do" in result.output and not steps, result.output


def test_setup_help_lists_linux_and_the_artefact_options():
    from click.testing import CliRunner

    from matchlock.cli.main import cli

    result = CliRunner().invoke(cli, ["setup", "--help"])
    assert result.exit_code == 0, result.output
    # [COMMAND]: the subcommand is optional, plain `matchlock setup` is the artefact setup.
    assert result.output.startswith("Usage: cli setup [OPTIONS] [COMMAND] [ARGS]...\n"), result.output
    assert "--tuned [background|now|skip]" in result.output and "--jobs INTEGER" in result.output
    assert "\nCommands:\n  linux  Let ordinary users run sandboxes" in result.output
