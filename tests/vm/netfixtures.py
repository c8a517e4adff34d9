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

One server process (this file run as a script, inside the inet namespace)
answers on every address: DNS for the *.test names, HTTP on 80, HTTPS on 443
(test CA, ALPN h2 and http/1.1), WebSocket on /ws over both, a raw TCP echo
on 7000 and a UDP sink on 9999. It appends every request, connection and
datagram it sees to a JSON-lines log, so tests can prove that something
blocked never arrived.

Name lookups of the `matchlock` process under test must reach that DNS
server and nothing else. Tests never change the host: a CLI process runs
under `unshare --mount` with a resolv.conf bind-mounted over /etc/resolv.conf
(`net_cli`), and an in-process owner runs its event loop on a thread that
entered a private mount namespace with the same bind mount (`NetLoopThread`;
mount namespaces are per thread, and the loop's executor threads and child
processes inherit it).

The guest tools: the built-in busybox image (wget, nc, nslookup), and an
image with Debian's Python 3.11 + OpenSSL and the pure-Python h2, websockets
and dnspython libraries (`netclient_image`), for what busybox cannot do:
verified TLS through the sandbox CA, HTTP/2, WebSocket, UDP, exact DNS
rcodes. It is assembled from the same cached Debian packages as the guest
runtime and imported with the real `matchlock image import`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import hashlib
import inspect
import io
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
MATCHLOCK = str(Path(sys.executable).parent / "matchlock")

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

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matchlock stand-in internet test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in HOSTS]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in INET_ADDRESSES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.test")]))
        .issuer_name(ca_name)
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
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
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
        argv = ["ip", "netns", "exec", self.name, sys.executable, str(HERE), "serve",
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
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, str(self.resolv_conf), *argv]


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


class NetLoopThread:
    """tests/conftest.py's LoopThread, on a thread that resolves names with the stand-in DNS server."""

    def __init__(self, resolv_conf: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self._entered = threading.Event()
        self._error: BaseException | None = None

        def main() -> None:
            try:
                enter_private_resolver(resolv_conf)
            except BaseException as exc:  # noqa: BLE001 - reported to the creator
                self._error = exc
                self._entered.set()
                return
            self._entered.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name="net-loop", daemon=True)
        self.thread.start()
        self._entered.wait(10)
        if self._error is not None:
            raise self._error

    def run(self, coro, timeout: float = 180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# --------------------------------------------------------------------------------------------------
# The guest client image
# --------------------------------------------------------------------------------------------------

CLIENT_DEBS = [
    "busybox-static", "libc6", "zlib1g", "libexpat1", "libffi8", "libssl3",
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
]  # fmt: skip
CLIENT_PY_PACKAGES = ("h2", "hpack", "hyperframe", "h11", "websockets", "dns")
PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian", "usr/lib/x86_64-linux-gnu/gconv",
         "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/ensurepip",
         "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/tkinter")  # fmt: skip
CLIENT_PATH = "/usr/local/bin/mlk-net"


def _tar_tree(tar: tarfile.TarFile, root: Path) -> None:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(rel == p or rel.startswith(p + "/") for p in PRUNE) or "__pycache__" in rel:
            continue
        info = tar.gettarinfo(str(path), rel)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 1_700_000_000
        if info.isreg():
            with open(path, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)


def _entry(tar: tarfile.TarFile, name: str, data: bytes | None = None, mode: int = 0o644,
           kind: bytes = tarfile.REGTYPE, linkname: str = "") -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, linkname, 1_700_000_000
    info.size = len(data) if data is not None else 0
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def client_image_key() -> str:
    versions = subprocess.run(["dpkg-query", "-W", *CLIENT_DEBS], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256(versions.encode())
    h.update(CLIENT_SCRIPT.encode())
    h.update(inspect.getsource(build_client_image).encode())
    for name in CLIENT_PY_PACKAGES:
        module = __import__(name)
        h.update(f"{name}={getattr(module, '__version__', '')}".encode())
    return h.hexdigest()[:12]


def build_client_image(work: Path, tag: str) -> Path:
    """A `docker save` tarball: Debian's python3.11 + OpenSSL + busybox, the client libs and mlk-net.

    The files come from the host's installed Debian packages (scripts/setup.sh
    installs python3 and busybox-static), because the test session has no
    network to download anything.
    """
    root = work / "rootfs"
    for package in CLIENT_DEBS:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
        for name in listing.splitlines():
            source = Path(name)
            if not name.startswith("/") or source.is_dir() or not source.exists():
                continue
            target = root / name.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() and not target.is_symlink():
                shutil.copy2(source, target, follow_symlinks=False)
    # Debian 12 is merged-/usr: the packages ship /lib64 and /lib paths that are symlinks in a real system.
    for top in ("lib", "lib64", "bin", "sbin"):
        src = root / top
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, root / "usr" / top, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(src)
    site = root / "usr/lib/python3/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    for name in CLIENT_PY_PACKAGES:
        source = Path(__import__(name).__file__).parent
        shutil.copytree(source, site / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for top in ("lib", "lib64", "bin", "sbin"):
            _entry(tar, top, kind=tarfile.SYMTYPE, linkname=f"usr/{top}", mode=0o777)
        _tar_tree(tar, root)
        for directory in ("etc", "etc/ssl", "etc/ssl/certs", "tmp", "root", "proc", "sys", "dev", "run", "usr/local/bin"):
            _entry(tar, directory, kind=tarfile.DIRTYPE, mode=0o1777 if directory == "tmp" else 0o755)
        for applet in ("sh", "wget", "nc", "nslookup", "cat", "env", "grep", "ls", "timeout", "echo", "sleep", "tr",
                       "hostname", "head", "id", "ps", "wc", "sed", "find", "xargs", "sort", "seq"):  # fmt: skip
            _entry(tar, f"usr/bin/{applet}", kind=tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        _entry(tar, "usr/bin/python3", kind=tarfile.SYMTYPE, linkname="python3.11", mode=0o777)
        _entry(tar, CLIENT_PATH.lstrip("/"), CLIENT_SCRIPT.encode(), mode=0o755)
        _entry(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
        _entry(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        # An (empty) system bundle: the sandbox CA is appended to it and SSL_CERT_FILE points here.
        _entry(tar, "etc/ssl/certs/ca-certificates.crt", b"")
    layer_bytes = layer.getvalue()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]},
    }
    config_bytes = json.dumps(config).encode()
    archive = work / "netclient.tar"
    with tarfile.open(archive, "w") as tar:
        _entry(tar, "layer/layer.tar", layer_bytes)
        config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
        _entry(tar, config_name, config_bytes)
        manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]}]
        _entry(tar, "manifest.json", json.dumps(manifest).encode())
    return archive


def ensure_client_image(work: Path) -> str:
    """Import the client image once per content (the tag carries a hash of what is inside)."""
    from matchlock.image.store import ImageStore

    tag = f"test/netclient:{client_image_key()}"
    if ImageStore().get(tag) is not None:
        return tag
    archive = build_client_image(work, tag)
    with open(archive, "rb") as stdin:
        result = subprocess.run([MATCHLOCK, "image", "import", tag], stdin=stdin, capture_output=True, text=True,
                                timeout=300)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"importing {tag} failed: {result.stderr}")
    return tag


# The client that runs in the guest (Debian python3.11). Prints one JSON object; exit 0 unless it crashed.
CLIENT_SCRIPT = r'''#!/usr/bin/python3.11
"""mlk-net: network probes from inside a matchlock guest. Every command prints one JSON object."""
import json, socket, ssl, sys, time, urllib.parse

def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")

def context(insecure=False, alpn=None):
    ctx = ssl.create_default_context()  # honours SSL_CERT_FILE
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx

def options(argv):
    opts = {"H": [], "connect": None, "method": "GET", "insecure": False, "no_sni": False, "timeout": 10.0, "data": None}
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-H": opts["H"].append(argv[i + 1]); i += 2
        elif a == "--connect": opts["connect"] = argv[i + 1]; i += 2
        elif a == "-X": opts["method"] = argv[i + 1]; i += 2
        elif a == "-d": opts["data"] = argv[i + 1].encode(); i += 2
        elif a == "--timeout": opts["timeout"] = float(argv[i + 1]); i += 2
        elif a == "-k": opts["insecure"] = True; i += 1
        elif a == "--no-sni": opts["no_sni"] = True; opts["insecure"] = True; i += 1
        else: rest.append(a); i += 1
    return opts, rest

def open_socket(url, opts, alpn=None):
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme in ("https", "wss") else 80)
    sock = socket.create_connection((opts["connect"] or u.hostname, port), timeout=opts["timeout"])
    if u.scheme in ("https", "wss"):
        ctx = context(opts["insecure"], alpn)
        sock = ctx.wrap_socket(sock, server_hostname=None if opts["no_sni"] else u.hostname)
    return u, sock

def headers_of(opts, u):
    hs = [tuple(x.strip() for x in h.split(":", 1)) for h in opts["H"]]
    if not any(k.lower() == "host" for k, _ in hs):
        hs.insert(0, ("Host", u.netloc))
    return hs

def http1(url, opts, stream=False):
    import http.client
    u, sock = open_socket(url, opts, ["http/1.1"])
    conn = http.client.HTTPConnection(u.hostname, timeout=opts["timeout"])
    conn.sock = sock
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    conn.putrequest(opts["method"], target, skip_host=True, skip_accept_encoding=True)
    for k, v in headers_of(opts, u):
        conn.putheader(k, v)
    if opts["data"] is not None:
        conn.putheader("Content-Length", str(len(opts["data"])))
    conn.endheaders(opts["data"])
    r = conn.getresponse()
    result = {"status": r.status, "headers": [[k, v] for k, v in r.getheaders()],
              "alpn": sock.selected_alpn_protocol() if isinstance(sock, ssl.SSLSocket) else None}
    if stream:
        start, lines, times = time.monotonic(), [], []
        while True:
            line = r.readline()
            if not line:
                break
            lines.append(line.decode(errors="replace"))
            times.append(round(time.monotonic() - start, 3))
        result.update(lines=lines, times=times)
    else:
        result["body"] = r.read().decode(errors="replace")
    return result

def h2get(url, opts):
    import h2.connection, h2.config, h2.events
    u, sock = open_socket(url, opts, ["h2", "http/1.1"])
    alpn = sock.selected_alpn_protocol()
    if alpn != "h2":
        return {"alpn": alpn, "error": "server did not negotiate h2"}
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    hs = [(":method", opts["method"]), (":scheme", "https"), (":authority", u.netloc), (":path", target)]
    hs += [(k.lower(), v) for k, v in headers_of(opts, u) if k.lower() != "host"]
    conn.send_headers(1, hs, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, headers, body, done = None, [], b"", False
    while not done:
        data = sock.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                headers = [[k, v] for k, v in ev.headers]
                status = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                done = True
        sock.sendall(conn.data_to_send())
    return {"alpn": alpn, "status": status, "headers": headers, "body": body.decode(errors="replace")}

def ws(url, messages, opts):
    from websockets.sync.client import connect
    kwargs = {"open_timeout": opts["timeout"]}
    if url.startswith("wss:"):
        kwargs["ssl"] = context(opts["insecure"])
    replies = []
    with connect(url, **kwargs) as c:
        for m in messages:
            c.send(m)
            replies.append(c.recv(timeout=opts["timeout"]))
    return {"replies": replies}

def latency(url, count, opts):
    """Median and all samples of `count` GETs on one kept-alive connection (after 10 warm-ups)."""
    import http.client
    u, sock = open_socket(url, opts, ["http/1.1"])
    conn = http.client.HTTPConnection(u.hostname, timeout=opts["timeout"])
    conn.sock = sock
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    samples = []
    for i in range(10 + count):
        t = time.perf_counter()
        conn.request("GET", target, headers={"Host": u.netloc})
        conn.getresponse().read()
        if i >= 10:
            samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {"median_ms": samples[len(samples) // 2], "samples": len(samples)}

def main():
    if sys.argv[1] == "multi":  # several commands, one interpreter start (Python starts slowly under TCG)
        import shlex
        for line in sys.argv[2:]:
            words = shlex.split(line)
            run(words[0], words[1:])
            sys.stdout.flush()
    else:
        run(sys.argv[1], sys.argv[2:])

def run(cmd, argv):
    opts, rest = options(argv)
    try:
        if cmd == "get":
            out(http1(rest[0], opts))
        elif cmd == "stream":
            out(http1(rest[0], opts, stream=True))
        elif cmd == "h2":
            out(h2get(rest[0], opts))
        elif cmd == "ws":
            out(ws(rest[0], rest[1:], opts))
        elif cmd == "latency":
            out(latency(rest[0], int(rest[1]), opts))
        elif cmd == "tcp":
            s = socket.create_connection((rest[0], int(rest[1])), timeout=opts["timeout"])
            s.sendall(rest[2].encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            out({"received": data.decode(errors="replace")})
        elif cmd == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sent = s.sendto(rest[2].encode(), (rest[0], int(rest[1])))
            s.settimeout(2)
            try:
                reply = s.recv(65536).decode(errors="replace")
            except OSError as exc:
                reply = None
            out({"sent": sent, "reply": reply})
        elif cmd == "dns":
            import dns.message, dns.query, dns.rcode, dns.rdatatype
            server = rest[1] if len(rest) > 1 else next(
                l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
            q = dns.message.make_query(rest[0], rest[2] if len(rest) > 2 else "A")
            try:
                r = dns.query.udp(q, server, timeout=5)
            except Exception as exc:
                out({"error": f"{type(exc).__name__}: {exc}"})
                return
            answers = [rd.to_text() for rrset in r.answer for rd in rrset]
            out({"rcode": dns.rcode.to_text(r.rcode()), "answers": answers})
        else:
            out({"error": f"unknown command {cmd}"})
    except Exception as exc:
        out({"error": f"{type(exc).__name__}: {exc}"})

main()
'''


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
        return ensure_client_image(tmp_path_factory.mktemp("netclient"))

    @pytest.fixture
    def net_cli(state_dir, inet):
        """`matchlock` as a user runs it, resolving names with the stand-in DNS server."""

        def run(*args: str, input: str | None = None, timeout: float = 180, env: dict | None = None):
            full_env = {**os.environ, **inet.env(), **(env or {})}
            proc = subprocess.run(inet.wrap([MATCHLOCK, *args]), input=input, capture_output=True, text=True,
                                  timeout=timeout, env=full_env)  # fmt: skip
            return Result(proc.returncode, proc.stdout, proc.stderr)

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
            states = [json.loads(r.stdout)["status"] for r in map(lambda v: net_cli("get", v), started) if r.returncode == 0]
            if "running" not in states:
                break
            time.sleep(0.3)
        net_cli("prune")

    @pytest.fixture(scope="module")
    def net_loop(inet):
        """An event loop whose lookups go to the stand-in DNS server, for in-process sandbox owners."""
        from matchlock.net import tls

        old = os.environ.get("MATCHLOCK_UPSTREAM_CA_FILE")
        os.environ["MATCHLOCK_UPSTREAM_CA_FILE"] = str(inet.ca)
        tls._upstream_contexts.clear()  # contexts are cached with the CA bundle they were built with
        thread = NetLoopThread(inet.resolv_conf)
        yield thread
        thread.close()
        tls._upstream_contexts.clear()
        if old is None:
            os.environ.pop("MATCHLOCK_UPSTREAM_CA_FILE", None)
        else:
            os.environ["MATCHLOCK_UPSTREAM_CA_FILE"] = old


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:
        return f"<rc={self.returncode} stdout={self.stdout[-3000:]!r} stderr={self.stderr[-2000:]!r}>"


def json_lines(text: str) -> list[dict]:
    """The JSON objects `mlk-net` printed, in order."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def body_json(reply: dict) -> dict:
    return json.loads(reply["body"])


# --------------------------------------------------------------------------------------------------
# The servers (run as `python netfixtures.py serve ...` inside the inet namespace)
# --------------------------------------------------------------------------------------------------

SSE_EVENTS = (
    "event: greeting\ndata: hello foo\n\n",
    "data: foo and foo\n\n",
    ": comment foo\n\n",
    'id: foo-1\ndata: {"v": "foo"}\n\n',
)
BLOCK = bytes(range(256)) * 1024  # 256 KiB


class Servers:
    def __init__(self, log_path: str, cert: str, key: str) -> None:
        self.log = open(log_path, "a", buffering=1)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.tls.set_alpn_protocols(["h2", "http/1.1"])

    def record(self, **entry) -> None:
        entry["t"] = round(time.time(), 3)
        self.log.write(json.dumps(entry) + "\n")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.start_server(lambda r, w: self.http(r, w, False), "0.0.0.0", 80, reuse_address=True)
        await asyncio.start_server(lambda r, w: self.http(r, w, True), "0.0.0.0", 443, ssl=self.tls, reuse_address=True)
        await asyncio.start_server(self.echo, "0.0.0.0", ECHO_PORT, reuse_address=True)
        await loop.create_datagram_endpoint(lambda: _Datagrams(self, self.dns_answer), local_addr=(DNS_SERVER, 53))
        await loop.create_datagram_endpoint(lambda: _Datagrams(self, None), local_addr=("0.0.0.0", UDP_SINK_PORT))

    # --- DNS ---------------------------------------------------------------------------------

    def dns_answer(self, data: bytes, local: tuple) -> bytes | None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001
            self.record(kind="udp", port=53, server_addr=local[0], data=data[:200].hex(), malformed=True)
            return None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.record(kind="dns", name=name, qtype=dns.rdatatype.to_text(question.rdtype), server_addr=local[0])
        response = dns.message.make_response(query)
        if name not in HOSTS:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, 30, "IN", "A", HOSTS[name]))
        return response.to_wire()

    # --- raw TCP echo ---------------------------------------------------------------------------

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = writer.get_extra_info("sockname")
        total = 0
        try:
            while data := await reader.read(65536):
                total += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        self.record(kind="tcp", server_addr=local[0], port=local[1], bytes=total,
                    peer=writer.get_extra_info("peername")[0])  # fmt: skip
        writer.close()

    # --- HTTP/1.1, HTTP/2, WebSocket -----------------------------------------------------------------

    async def http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        try:
            if alpn == "h2":
                await self.http2(reader, writer)
            else:
                await self.http1(reader, writer, tls)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except Exception as exc:  # noqa: BLE001 - a test server: say what broke
            self.record(kind="error", error=f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    def _request_entry(self, proto, tls, method, target, headers, writer, body=b"") -> dict:
        path, _, query = target.partition("?")
        local = writer.get_extra_info("sockname")
        host = next((v for k, v in headers if k.lower() in ("host", ":authority")), "")
        entry = dict(kind="http", proto=proto, tls=tls, method=method, path=path, query=query,
                     headers=[[k, v] for k, v in headers], host=host, server_addr=local[0], port=local[1],
                     body=body.decode(errors="replace"))  # fmt: skip
        self.record(**entry)
        return entry

    async def http1(self, reader, writer, tls: bool) -> None:
        import h11

        conn = h11.Connection(h11.SERVER)

        async def next_event():
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                conn.receive_data(await reader.read(65536))

        async def send(*events) -> None:
            for event in events:
                writer.write(conn.send(event))
            await writer.drain()

        while True:
            event = await next_event()
            if not isinstance(event, h11.Request):
                return
            headers = [(k.decode(), v.decode()) for k, v in event.headers.raw_items()]
            target = event.target.decode()
            body = b""
            while True:
                part = await next_event()
                if isinstance(part, h11.Data):
                    body += part.data
                elif isinstance(part, h11.EndOfMessage):
                    break
            entry = self._request_entry("HTTP/1.1", tls, event.method.decode(), target, headers, writer, body)
            path = entry["path"]
            params = dict(p.split("=", 1) for p in entry["query"].split("&") if "=" in p)
            upgrade = any(k.lower() == "upgrade" and v.lower() == "websocket" for k, v in headers)
            if path == "/ws" and upgrade:
                await self.websocket(reader, writer, target, headers, conn.trailing_data[0])
                return
            if path == "/close":  # unknown length: no framing headers, the end is the close
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
                for i in range(int(params.get("n", 3))):
                    writer.write(f"part-{i} foo\n".encode())
                    await writer.drain()
                    await asyncio.sleep(float(params.get("delay", 0.05)))
                return
            if path in ("/sse", "/chunked"):
                kind = "text/event-stream" if path == "/sse" else "text/plain"
                chunks = SSE_EVENTS if path == "/sse" else [f"chunk-{i} foo\n" for i in range(int(params.get("n", 5)))]
                await send(h11.Response(status_code=200, headers=[("Content-Type", kind), ("Cache-Control", "no-cache"),
                                                                  ("Transfer-Encoding", "chunked")]))  # fmt: skip
                for chunk in chunks:
                    await send(h11.Data(data=chunk.encode()))
                    await asyncio.sleep(float(params.get("delay", 0.05)))
                await send(h11.EndOfMessage())
            elif path == "/bytes":
                size = int(params.get("n", 1024))
                await send(h11.Response(status_code=200, headers=[("Content-Type", "application/octet-stream"),
                                                                  ("Content-Length", str(size))]))  # fmt: skip
                left = size
                while left:
                    piece = BLOCK[: min(left, len(BLOCK))]
                    writer.write(conn.send(h11.Data(data=piece)))
                    left -= len(piece)
                    if writer.transport.get_write_buffer_size() > 1 << 20:
                        await writer.drain()
                await send(h11.EndOfMessage())
            else:
                status, content_type, payload = self.respond(entry)
                await send(
                    h11.Response(status_code=status, headers=[("Content-Type", content_type),
                                 ("Content-Length", str(len(payload))), ("X-Served-By", "stand-in"),
                                 ("X-Upstream-Secret", "remove-me")]),  # fmt: skip
                    h11.Data(data=payload),
                    h11.EndOfMessage(),
                )
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    @staticmethod
    def respond(entry: dict) -> tuple[int, str, bytes]:
        path = entry["path"]
        if path.startswith("/status/"):
            return int(path.rsplit("/", 1)[1]), "text/plain", b"status\n"
        if path == "/body":
            return 200, "text/plain", b"foo is foo, not bar\n"
        return 200, "application/json", json.dumps(entry).encode()

    async def websocket(self, reader, writer, target: str, headers, leftover: bytes) -> None:
        from websockets.frames import Opcode
        from websockets.server import ServerProtocol

        protocol = ServerProtocol()
        # The sans-IO protocol parses the handshake itself: give it the request h11 already read.
        head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        protocol.receive_data(head.encode())
        (request,) = protocol.events_received()
        protocol.send_response(protocol.accept(request))
        writer.write(b"".join(protocol.data_to_send()))
        await writer.drain()
        data = leftover
        while True:
            if data:
                protocol.receive_data(data)
            elif data is None:
                protocol.receive_eof()
            for frame in protocol.events_received():
                if frame.opcode is Opcode.TEXT:
                    protocol.send_text(b"echo: " + frame.data)
                elif frame.opcode is Opcode.BINARY:
                    protocol.send_binary(frame.data)
            writer.write(b"".join(protocol.data_to_send()))
            await writer.drain()
            if data is None or protocol.close_expected():
                return
            data = await reader.read(65536) or None

    async def http2(self, reader, writer) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        requests: dict[int, list] = {}
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = [list(event.headers), b""]
                elif isinstance(event, h2.events.DataReceived):
                    requests[event.stream_id][1] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    headers, body = requests.pop(event.stream_id)
                    pseudo = dict(headers)
                    entry = self._request_entry("HTTP/2", True, pseudo.get(":method", ""), pseudo.get(":path", "/"),
                                                headers, writer, body)  # fmt: skip
                    status, content_type, payload = self.respond(entry)
                    conn.send_headers(event.stream_id, [(":status", str(status)), ("content-type", content_type),
                                                        ("content-length", str(len(payload)))])  # fmt: skip
                    conn.send_data(event.stream_id, payload, end_stream=True)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    writer.write(conn.data_to_send())
                    return
            writer.write(conn.data_to_send())
            await writer.drain()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, servers: Servers, answer) -> None:
        self.servers, self.answer = servers, answer

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        # Recvmsg would give the local address; the sink records the sender and payload.
        local = self.transport.get_extra_info("sockname")
        if self.answer is None:
            self.servers.record(kind="udp", port=local[1], peer=addr[0], data=data[:200].decode(errors="replace"))
            return
        reply = self.answer(data, local)
        if reply is not None:
            self.transport.sendto(reply, addr)


def _serve(argv: list[str]) -> None:
    args = dict(zip(argv[::2], argv[1::2]))
    servers = Servers(args["--log"], args["--cert"], args["--key"])
    loop = asyncio.new_event_loop()
    loop.run_until_complete(servers.start())
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    loop.run_until_complete(stop.wait())


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "serve":
    _serve(sys.argv[2:])
