"""The core flows as an ordinary user that the test creates, and a second user who must not reach them.

Two users are made with `useradd` for this module and removed at its end. Root runs the one
privileged step, `matchlock setup linux` (the host is put back as it was afterwards). The first
user gets copies of the built kernel, the guest Python runtime and busybox's package in their own
cache (a few tens of MB), then, as themselves: pulls images from the test registry on loopback
(their disks are built under fakeroot, owners exact), runs one, starts one detached sandbox with a
published port and TLS interception towards the stand-in internet, and execs into it. The second
user then tries to list, exec into, kill and read that sandbox, and must fail at each. Last, the
first user keeps data on a named volume and a raw ext4 disk across two runs, which the second user
cannot read. Four VMs boot.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netclient import build_client_image
from netfixtures import DNS_SERVER, HOSTS, body_json, json_lines

from matchlock.api.paths import cache_dir
from matchlock.image.archive import host_arch
from matchlock.kernel import resolve
from registry_support import Registry, busybox_layer, skopeo_push
from support.cli import CLIResult, run_matchlock
from support.images import make_image, write_oci_layout
from support.ports import echo_round_trip, free_port
from support.rootless import as_user, environment, interpreter
from support.tarballs import entry, layer

pytestmark = [pytest.mark.vm, pytest.mark.registry, pytest.mark.usefixtures("vm_prerequisites")]

ADD_HOSTS = tuple(arg for name, ip in HOSTS.items() for arg in ("--add-host", f"{name}:{ip}"))
ECHO_SERVER = ("nc", "-ll", "-p", "8080", "-e", "/bin/cat")


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        """A login-like environment: nothing of the test session's MATCHLOCK_* variables."""
        base = {k: v for k, v in environment().items() if not k.startswith("MATCHLOCK_")}
        return {**base, "HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, **extra}

    def matchlock(self, *args: str, wrap=None, timeout: float = 300, **extra: str) -> CLIResult:
        argv = [interpreter(), "-m", "matchlock", *args]
        setpriv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]
        proc = subprocess.run(wrap(setpriv) if wrap else setpriv, capture_output=True, text=True, timeout=timeout,
                              env=self.env(**extra), cwd="/")  # fmt: skip
        return CLIResult(proc.returncode, proc.stdout, proc.stderr)

    def python(self, script: str, **extra: str) -> subprocess.CompletedProcess:
        return as_user(self.uid, self.gid, [interpreter(), "-c", script], env=self.env(**extra))


def _processes_of(uid: int) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def _make_user(tag: str) -> User:
    name = f"mlkt-{tag}-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name], check=True)
    entry_ = pwd.getpwnam(name)
    return User(name, entry_.pw_uid, entry_.pw_gid, Path(entry_.pw_dir))


def _remove_user(user: User) -> None:
    # Everything these uids run was started by this module (their sandboxes): end it, by PID.
    for pid in _processes_of(user.uid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["userdel", "--remove", user.name], capture_output=True)


@pytest.fixture(scope="module")
def set_up_host() -> Iterator[None]:
    """`matchlock setup linux` as root, as a user's one sudo; the host is put back afterwards."""
    tun_mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    rule = Path("/etc/udev/rules.d/60-matchlock-tun.rules")
    had_rule = rule.exists()
    result = run_matchlock("setup", "linux")
    assert result.returncode == 0, result
    again = run_matchlock("setup", "linux", "--check")
    assert again.returncode == 0 and "Nothing to do" in again.stdout, again
    yield
    os.chmod("/dev/net/tun", tun_mode)
    if not had_rule:
        rule.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def users(set_up_host) -> Iterator[tuple[User, User]]:
    owner, other = _make_user("a"), _make_user("b")
    try:
        # The expensive, machine-wide artefacts, copied (not linked: they must be the user's own files).
        cache = owner.home / ".cache" / "matchlock"
        kernel = resolve(build_fallback=True).path.parent
        shutil.copytree(kernel, cache / "kernels" / kernel.name)
        runtime = cache_dir() / "runtime"
        (cache / "runtime").mkdir(parents=True)
        for source in [*runtime.glob("python-*"), runtime / "python.current"]:
            copy = shutil.copytree if source.is_dir() else shutil.copy2
            copy(source, cache / "runtime" / source.name)
        subprocess.run(["chown", "-R", f"{owner.uid}:{owner.gid}", str(owner.home / ".cache")], check=True)
        yield owner, other
    finally:
        _remove_user(owner)
        _remove_user(other)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("registry"), host="localhost") as registry:
        yield registry


@pytest.fixture(scope="module")
def owned_image(registry, busybox_path, tmp_path_factory) -> str:
    """busybox plus files with other owners, a set-id bit and a device: what only root could write."""
    extra = layer([entry("data", "dir"), entry("data/owned", data=b"mine\n", uid=1000, gid=1000, mode=0o4750),
                   entry("data/null", "chr", mode=0o666, dev=(1, 3))])  # fmt: skip
    image = make_image([busybox_layer(busybox_path.read_bytes()), extra], arch=host_arch(), kind="gzip",
                       config={"Env": ["PATH=/bin"], "Cmd": ["sh"]})  # fmt: skip
    layout = write_oci_layout(tmp_path_factory.mktemp("owned") / "layout", image, "v1")
    skopeo_push(layout, "v1", registry, "test/owned")
    return f"{registry.address}/test/owned:v1"


@pytest.fixture(scope="module")
def client_ref(registry, tmp_path_factory) -> str:
    """The network tests' client image (Python + OpenSSL + mlk-net), served by the test registry."""
    archive = build_client_image(tmp_path_factory.mktemp("netclient"), "test/netclient:v1")
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            f"docker-archive:{archive}", f"docker://127.0.0.1:{registry.port}/test/netclient:v1"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return f"{registry.address}/test/netclient:v1"


@pytest.fixture(scope="module")
def upstream_ca(users, inet) -> str:
    """The stand-in internet's CA where the user can read it (the test's own directories are root's)."""
    owner, _ = users
    copy = owner.home / "upstream-ca.pem"
    shutil.copy(inet.ca, copy)
    os.chmod(copy, 0o644)
    return str(copy)


@pytest.fixture(scope="module")
def detached(users, inet, client_ref, upstream_ca) -> Iterator[tuple[str, int]]:
    """The first user's detached sandbox: an echo server on a published port, TLS intercepted."""
    owner, _ = users
    pulled = owner.matchlock("pull", client_ref)
    assert pulled.returncode == 0, pulled
    port = free_port()
    result = owner.matchlock("run", "-d", "--image", client_ref, "-p", f"{port}:8080", "--allow-host", "api.test",
                             "--dns-servers", DNS_SERVER, *ADD_HOSTS, "--", *ECHO_SERVER,
                             wrap=inet.wrap, MATCHLOCK_UPSTREAM_CA_FILE=upstream_ca)  # fmt: skip
    assert result.returncode == 0, result
    vm_id = result.stdout.strip()
    assert vm_id.startswith("vm-"), result
    yield vm_id, port
    owner.matchlock("kill", vm_id)
    owner.matchlock("rm", vm_id)


def test_an_ordinary_user_has_nothing_left_to_fix(users):
    owner, _ = users
    result = owner.matchlock("diagnose", "--json")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["rootless"]["status"] == "pass", checks
    assert not [name for name in checks if name.startswith("rootless-")], checks


def test_pull_and_run_keep_exact_ownership_and_mount_a_host_directory(users, owned_image):
    owner, _ = users
    pulled = owner.matchlock("pull", owned_image)
    assert pulled.returncode == 0, pulled
    shared = owner.home / "shared"  # a host directory of the user's, mounted through the VFS
    shared.mkdir()
    (shared / "in.txt").write_text("from the host\n")
    for path in (shared, shared / "in.txt"):
        os.chown(path, owner.uid, owner.gid)
    result = owner.matchlock("run", "-v", f"{shared}:/mnt/shared:host_fs", "--image", owned_image, "--",
                             "sh", "-c", "id -u; ls -ln /data/owned /data/null /bin/busybox; cat /data/owned; "
                             "cat /mnt/shared/in.txt; echo made > /mnt/shared/out.txt")  # fmt: skip
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[5] == "from the host", lines
    made = shared / "out.txt"
    assert (made.read_text(), made.stat().st_uid) == ("made\n", owner.uid)
    assert lines[0] == "0"  # root in the guest, though the host user is not
    listed = {line.split()[-1]: line.split() for line in lines[1:4]}
    owned, null, busybox = listed["/data/owned"], listed["/data/null"], listed["/bin/busybox"]
    assert (owned[0], owned[2], owned[3]) == ("-rwsr-x---", "1000", "1000"), lines
    assert null[0].startswith("crw-rw-rw-") and null[4:6] == ["1,", "3"], lines
    assert (busybox[2], busybox[3]) == ("0", "0"), lines
    assert lines[4] == "mine"
    state = owner.home / ".matchlock"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((owner.home / ".cache" / "matchlock").stat().st_mode) == 0o700
    assert {p.stat().st_uid for p in [state, *state.rglob("*")]} == {owner.uid}


def test_exec_into_the_detached_sandbox_with_tls_interception(users, detached, inet):
    owner, _ = users
    vm_id, _ = detached
    mark = inet.mark()
    result = owner.matchlock("exec", vm_id, "--", "mlk-net", "multi", "get https://api.test/echo?x=1",
                             "get https://other.test/echo")  # fmt: skip
    assert result.returncode == 0, result
    allowed, blocked = json_lines(result.stdout)
    assert allowed["status"] == 200, allowed
    assert (body_json(allowed)["tls"], body_json(allowed)["query"]) == (True, "x=1")
    assert blocked.get("status") == 403 or "error" in blocked, blocked
    assert [e["host"] for e in inet.served_since(mark, kind="http")] == ["api.test"]
    # QEMU and the owner run as the user, in the host's namespaces, with no capabilities.
    listed = json.loads(owner.matchlock("get", vm_id).stdout)
    for pid in (listed["pid"], *_children(listed["pid"])):
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"Uid:\t{owner.uid}\t{owner.uid}" in status and "CapEff:\t0000000000000000" in status, status


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_published_port_forwards_to_the_guest(detached):
    _, port = detached
    payload = os.urandom(64 * 1024)
    assert echo_round_trip(port, payload) == payload


def test_the_user_snapshots_the_sandbox_from_its_memory_mapping_and_restores_it(users, detached, inet):
    owner, _ = users
    vm_id, _ = detached
    made = owner.matchlock("snapshot", "create", vm_id, "--name", "user-snap")
    assert made.returncode == 0, made
    (log,) = owner.home.glob(f"**/vms/{vm_id}/logs/vm.log")
    assert "RAM is streamed" not in log.read_text(errors="replace")  # copied from QEMU's mapping, as for root
    restored = owner.matchlock("run", "-d", "--from-snapshot", "user-snap", wrap=inet.wrap)
    assert restored.returncode == 0, restored
    clone = restored.stdout.strip()
    try:
        shown = owner.matchlock("exec", clone, "--", "echo", "restored")
        assert shown.returncode == 0 and shown.stdout == "restored\n", shown
    finally:
        owner.matchlock("rm", "-f", clone)
        owner.matchlock("snapshot", "rm", "user-snap")


def test_another_user_cannot_list_exec_kill_or_read_the_sandbox(users, detached):
    owner, other = users
    vm_id, _ = detached
    theirs = str(owner.home / ".matchlock")
    assert vm_id not in other.matchlock("list").stdout  # their own state: nothing of the first user's
    for args in (("list",), ("exec", vm_id, "--", "true"), ("kill", vm_id), ("log", vm_id)):
        result = other.matchlock(*args, MATCHLOCK_STATE_DIR=theirs)
        assert result.returncode != 0 and "permission denied" in result.stderr.lower(), (args, result)
        result = other.matchlock(*args)
        assert result.returncode != 0 or vm_id not in result.stdout, (args, result)
    owner_pid = json.loads(owner.matchlock("get", vm_id).stdout)["pid"]
    vm_dir = owner.home / ".matchlock" / "vms" / vm_id
    probe = (
        "import json, os, socket, sys\n"
        "out = {}\n"
        "for name in ('upper.ext4', 'logs/vm.log', 'exec.sock'):\n"
        "    try:\n"
        "        if name.endswith('.sock'):\n"
        "            socket.socket(socket.AF_UNIX).connect(os.path.join(sys.argv[1], name))\n"
        "        else:\n"
        "            open(os.path.join(sys.argv[1], name), 'rb').read(1)\n"
        "        out[name] = 'opened'\n"
        "    except OSError as exc:\n"
        "        out[name] = exc.errno\n"
        "try:\n"
        "    os.kill(int(sys.argv[2]), 15); out['kill'] = 'sent'\n"
        "except OSError as exc:\n"
        "    out['kill'] = exc.errno\n"
        "print(json.dumps(out))\n"
    )
    proc = as_user(other.uid, other.gid, [interpreter(), "-c", probe, str(vm_dir), str(owner_pid)],
                   env=other.env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"upper.ext4": 13, "logs/vm.log": 13, "exec.sock": 13, "kill": 1}
    still = owner.matchlock("exec", vm_id, "--", "echo", "still here")
    assert still.returncode == 0 and still.stdout == "still here\n", still


def test_pulled_image_is_the_users_own(users, client_ref):
    """The image store and its disks are in the user's home, unreadable by the other user."""
    owner, other = users
    images = owner.matchlock("image", "ls")
    assert "test/netclient" in images.stdout, images
    probe = other.python(f"import os; os.listdir({str(owner.home / '.cache' / 'matchlock')!r})")
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe


def test_a_volume_and_a_raw_disk_keep_data_across_runs_and_only_for_their_user(users, owned_image):
    owner, other = users
    assert owner.matchlock("pull", owned_image).returncode == 0  # a no-op once the test above pulled it
    created = owner.matchlock("volume", "create", "notes", "--size", "64", "--json")
    assert created.returncode == 0, created
    volume = Path(json.loads(created.stdout)["path"])
    raw = owner.home / "raw.ext4"
    made = as_user(owner.uid, owner.gid, ["mke2fs", "-q", "-t", "ext4", str(raw), "32M"], env=owner.env())
    assert made.returncode == 0, made.stderr
    disks = ("--disk", "@notes:/notes", "--disk", f"{raw}:/raw")
    first = owner.matchlock("run", "--image", owned_image, *disks, "--", "sh", "-c",
                            "echo kept > /notes/a && echo raw > /raw/b")  # fmt: skip
    assert first.returncode == 0, first
    read_only = ("--disk", "@notes:/notes:ro", "--disk", f"{raw}:/raw:ro")
    second = owner.matchlock("run", "--image", owned_image, *read_only, "--", "sh", "-c",
                             "cat /notes/a /raw/b; if touch /notes/c 2>/dev/null; then echo writable; "
                             "else echo read-only; fi")  # fmt: skip
    assert (second.returncode, second.stdout) == (0, "kept\nraw\nread-only\n"), second
    assert {p.stat().st_uid for p in (volume, raw)} == {owner.uid}
    listed = owner.matchlock("volume", "ls", "--json")
    assert [v["name"] for v in json.loads(listed.stdout)] == ["notes"], listed
    # The other user: none of it in their own listing, and neither the volume's data nor its store readable.
    theirs = other.matchlock("volume", "ls", "--json")
    assert theirs.returncode == 0 and json.loads(theirs.stdout) == [], theirs
    borrowed = other.matchlock("volume", "ls", MATCHLOCK_CACHE_DIR=str(owner.home / ".cache" / "matchlock"))
    assert borrowed.returncode != 0 and "permission denied" in borrowed.stderr.lower(), borrowed
    probe = other.python(f"open({str(volume)!r}, 'rb').read(1)")
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe
    removed = owner.matchlock("volume", "rm", "notes")
    assert removed.returncode == 0 and not volume.exists(), removed
