"""A stand-in internet for the network tests, and the tools to reach it.

Topology (everything lives inside the isolated test session; see tests/conftest.py):

    test session netns                      mlk-inet-<random> netns (made here)
    ──────────────────                      ───────────────────────────────────
    matchlock owner/proxy ── veth 192.0.2.1 ══ veth 192.0.2.10 api.test
    (dials upstream from here)                    192.0.2.11 api-eu.test
    routes: 198.51.100.0/24, 203.0.113.0/24,      192.0.2.53 DNS server (UDP 53)
            10.0.0.5 via 192.0.2.10               198.51.100.20 other.test
                                                  203.0.113.30 third.test, .31 sub.test, .32 www.sub.test
                                                  10.0.0.5 private.test (a "private" host)

One server process (netservers.py run as a script, inside the inet namespace)
answers on every address: DNS for the *.test names, HTTP on 80, HTTPS on 443
(test CA, ALPN h2 and http/1.1), WebSocket on /ws over both, a raw TCP echo
on 7000 and a UDP sink on 9999. It appends every request, connection and
datagram it sees to a JSON-lines log, so tests can prove that something
blocked never arrived.

Name lookups of the `matchlock` process under test must reach that DNS
server and nothing else. Tests never change the host: a CLI process runs
under `unshare --mount` with a resolv.conf bind-mounted over /etc/resolv.conf
(`net_cli`), and an in-process owner runs its event loop on a thread that
entered a private mount namespace with the same bind mount (`net_loop_thread`;
mount namespaces are per thread, and the loop's executor threads and child
processes inherit it).

The guest tools: the built-in busybox image (wget, nc, nslookup), and the
client image of netclient.py (`client_image`), for what busybox cannot do.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from support.loop_thread import LoopThread

SERVERS_SCRIPT = Path(__file__).resolve().with_name("netservers.py")

SESSION_ADDRESS = "192.0.2.1"
INET_ADDRESS = "192.0.2.10"
DNS_SERVER = "192.0.2.53"
PRIVATE_ADDRESS = "10.0.0.5"
HOSTS = {
    "api.test": "192.0.2.10",
    "api-eu.test": "192.0.2.11",
    "other.test": "198.51.100.20",
    "third.test": "203.0.113.30",
    "sub.test": "203.0.113.31",
    "www.sub.test": "203.0.113.32",
    "private.test": PRIVATE_ADDRESS,
}
INET_ADDRESSES = sorted({*HOSTS.values(), INET_ADDRESS, DNS_SERVER})
ROUTED_NETWORKS = ("198.51.100.0/24", "203.0.113.0/24", f"{PRIVATE_ADDRESS}/32")
ECHO_PORT = 7000
UDP_SINK_PORT = 9999


# --------------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------------


def make_test_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and one server certificate for every stand-in name and address: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from matchlock.net.tls import ca_certificate

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = "matchlock stand-in internet test CA"
    ca = ca_certificate(ca_key, ca_name, now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in HOSTS]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in INET_ADDRESSES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.test")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


# --------------------------------------------------------------------------------------------------
# The stand-in internet (namespace + server process)
# --------------------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


@dataclass
class StandInInternet:
    """A named namespace joined to this one by a veth pair, with the servers running in it."""

    directory: Path
    name: str = ""
    veth: str = ""
    process: subprocess.Popen | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "served.jsonl"

    @property
    def resolv_conf(self) -> Path:
        return self.directory / "resolv.conf"

    def start(self) -> StandInInternet:
        token = secrets.token_hex(3)
        self.name, self.veth = f"mlk-inet-{token}", f"mlkv{token}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca, self.cert, self.key = make_test_pki(self.directory)
        self.resolv_conf.write_text(f"nameserver {DNS_SERVER}\noptions timeout:2 attempts:1\n")
        self.log_path.write_text("")
        try:
            self._make_namespace()
            self._start_servers()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_namespace(self) -> None:
        peer = self.veth + "p"
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", peer, "netns", self.name)
        _ip("addr", "add", f"{SESSION_ADDRESS}/24", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        for network in ROUTED_NETWORKS:
            _ip("route", "add", network, "via", INET_ADDRESS, "dev", self.veth)
        inside = ["-n", self.name]
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "addr", "add", f"{INET_ADDRESS}/24", "dev", peer)
        for address in INET_ADDRESSES:
            if address != INET_ADDRESS:
                _ip(*inside, "addr", "add", f"{address}/32", "dev", peer)
        _ip(*inside, "link", "set", peer, "up")

    def _start_servers(self) -> None:
        argv = ["ip", "netns", "exec", self.name, sys.executable, str(SERVERS_SCRIPT), "serve",
                "--log", str(self.log_path), "--cert", str(self.cert), "--key", str(self.key)]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(self.directory / "servers.err", "wb"))
        deadline = time.monotonic() + 30
        line = b""
        while time.monotonic() < deadline and self.process.poll() is None:
            line = self.process.stdout.readline()
            if line.strip() == b"ready":
                return
        raise RuntimeError(
            f"stand-in servers did not start: {line!r} {(self.directory / 'servers.err').read_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.veth:
            _ip("link", "del", self.veth, check=False)
        if self.name:
            _ip("netns", "del", self.name, check=False)

    # --- what the servers saw ------------------------------------------------------------------

    def served(self) -> list[dict]:
        entries = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def mark(self) -> int:
        """Position in the log; `served_since(mark)` returns what came after."""
        return len(self.served())

    def served_since(self, mark: int, **match) -> list[dict]:
        return [e for e in self.served()[mark:] if all(e.get(k) == v for k, v in match.items())]

    def env(self) -> dict[str, str]:
        """Environment for matchlock processes: trust the test CA upstream."""
        return {"MATCHLOCK_UPSTREAM_CA_FILE": str(self.ca)}

    def wrap(self, argv: list[str]) -> list[str]:
        """Run argv in a private mount namespace whose /etc/resolv.conf names the stand-in DNS server."""
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            str(self.resolv_conf),
            *argv,
        ]


# --------------------------------------------------------------------------------------------------
# Resolver isolation for an in-process sandbox owner
# --------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.unshare.argtypes = (ctypes.c_int,)
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000


def enter_private_resolver(resolv_conf: Path) -> None:
    """Give the calling thread its own mount namespace with `resolv_conf` over /etc/resolv.conf.

    unshare(CLONE_NEWNS) on one thread of a multi-threaded process moves only
    that thread (it gets its own fs_struct); threads and processes it starts
    later inherit the namespace. Nothing changes for the rest of the session.
    """
    for call, what in (
        (lambda: _libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)"),
        (lambda: _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private"),
        (lambda: _libc.mount(str(resolv_conf).encode(), b"/etc/resolv.conf", None, MS_BIND, None), "bind resolv.conf"),
    ):
        if call() != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")


def net_loop_thread(resolv_conf: Path) -> LoopThread:
    """An event loop on a thread that resolves names with the stand-in DNS server."""
    # Imported here: netservers.py imports this module in a process that has no tests/ on sys.path.
    from support.loop_thread import LoopThread

    return LoopThread(setup=lambda: enter_private_resolver(resolv_conf), name="net-loop")


# --------------------------------------------------------------------------------------------------
# pytest fixtures (test modules import them by name)
# --------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the server process and the benchmark do not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def inet(tmp_path_factory):
        """The stand-in internet, for one test module."""
        internet = StandInInternet(tmp_path_factory.mktemp("inet")).start()
        yield internet
        internet.stop()

    @pytest.fixture(scope="session")
    def client_image(tmp_path_factory, vm_prerequisites) -> str:
        from netclient import ensure_client_image

        return ensure_client_image(tmp_path_factory.mktemp("netclient"))

    @pytest.fixture
    def net_cli(state_dir, inet):
        """`matchlock` as a user runs it, resolving names with the stand-in DNS server."""

        from support.cli import run_matchlock

        def run(*args: str, input: str | None = None, timeout: float = 180, env: dict | None = None):
            return run_matchlock(*args, input=input, timeout=timeout, env={**inet.env(), **(env or {})}, wrap=inet.wrap)

        return run

    @pytest.fixture
    def net_detached(net_cli):
        """`run -d` sandboxes (at most two at a time); killed and pruned afterwards."""
        started: list[str] = []

        def start(*args: str, env: dict | None = None) -> str:
            assert len(started) < 2, "never more than two VMs at once on the test hosts"
            result = net_cli("run", "-d", *args, env=env)
            assert result.returncode == 0, result
            vm_id = result.stdout.strip()
            assert vm_id.startswith("vm-"), result
            started.append(vm_id)
            return vm_id

        yield start
        for vm_id in started:
            net_cli("kill", vm_id)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [
                json.loads(r.stdout)["status"] for r in map(lambda v: net_cli("get", v), started) if r.returncode == 0
            ]
            if "running" not in states:
                break
            time.sleep(0.3)
        net_cli("prune")

    @pytest.fixture(scope="module")
    def net_loop(inet):
        """An event loop whose lookups go to the stand-in DNS server, for in-process sandbox owners."""
        old = os.environ.get("MATCHLOCK_UPSTREAM_CA_FILE")
        os.environ["MATCHLOCK_UPSTREAM_CA_FILE"] = str(inet.ca)  # each sandbox's proxy reads it as it starts
        thread = net_loop_thread(inet.resolv_conf)
        yield thread
        thread.close()
        if old is None:
            os.environ.pop("MATCHLOCK_UPSTREAM_CA_FILE", None)
        else:
            os.environ["MATCHLOCK_UPSTREAM_CA_FILE"] = old


def json_lines(text: str) -> list[dict]:
    """The JSON objects `mlk-net` printed, in order."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def body_json(reply: dict) -> dict:
    return json.loads(reply["body"])
