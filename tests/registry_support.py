"""Test support: Debian's docker-registry on loopback, pushers, a cutting proxy, a token server.

Everything here listens on 127.0.0.1 only, on ports the kernel picks, and
every process started is stopped by its PID. Images are built from bytes
the tests make (support.images), pushed either with skopeo (a real
third-party client) or with `push_image` (the distribution API done by
hand, for combinations skopeo would rewrite: zstd, uncompressed layers,
hand-made indexes).
"""

from __future__ import annotations

import datetime
import json
import select
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from support.images import OCI_INDEX, Image
from support.ports import free_port
from support.tarballs import tar_layer

USER, PASSWORD = "tester", "s3cret-pass"  # the one account of the secure and token registries

# ---------------------------------------------------------------------------
# TLS and htpasswd


@dataclass
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path) -> TLSFiles:
    """A test CA and a server certificate for 127.0.0.1 and localhost."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matchlock test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    files = TLSFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    return files


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    # docker-registry accepts bcrypt entries only (-B).
    subprocess.run(["htpasswd", "-Bbc", str(path), user, password], check=True, capture_output=True)
    return path


# ---------------------------------------------------------------------------
# The registry process


class Registry:
    """`docker-registry serve` on 127.0.0.1:<free port> with storage in a temp dir."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", tls: TLSFiles | None = None,
                 htpasswd: Path | None = None, token: TokenServer | None = None,
                 storage: Path | None = None) -> None:  # fmt: skip
        self.root, self.tls, self.host = root, tls, host
        self.port = free_port()
        self.storage = storage or root / "storage"
        self.log = root / "registry.log"
        http: dict = {"addr": f"127.0.0.1:{self.port}", "secret": "matchlock-test"}
        if tls:
            http["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
        config: dict = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": http,
        }
        if htpasswd:
            config["auth"] = {"htpasswd": {"realm": "matchlock-test", "path": str(htpasswd)}}
        if token:
            config["auth"] = {"token": {"realm": token.realm, "service": TokenServer.SERVICE,
                                        "issuer": TokenServer.ISSUER, "rootcertbundle": str(token.cert)}}  # fmt: skip
        self.config = root / "config.yml"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def client(self, auth: tuple[str, str] | None = None) -> httpx.Client:
        import ssl

        verify = ssl.create_default_context(cafile=str(self.tls.ca)) if self.tls else False
        return httpx.Client(base_url=self.url, verify=verify, auth=auth, timeout=30)

    def start(self) -> Registry:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=log, stderr=log)
        with self.client() as client:
            for _ in range(100):  # bounded: 10 s
                if self.proc.poll() is not None:
                    raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
                try:
                    client.get("/v2/")
                    return self
                except httpx.TransportError:
                    time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


# ---------------------------------------------------------------------------
# Images


def push_image(registry: Registry, repo: str, tag: str, image: Image, *, index: bytes | None = None,
               others: list[Image] = ()) -> None:  # fmt: skip
    """Push blobs and manifests through the distribution API (monolithic uploads)."""
    with registry.client() as client:
        for img in [image, *others]:
            for digest, data in img.blobs.items():
                if client.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
                    continue
                start = client.post(f"/v2/{repo}/blobs/uploads/")
                assert start.status_code == 202, start.text
                location = start.headers["location"]  # carries upload state in its query: append, do not replace
                done = client.put(f"{location}{'&' if '?' in location else '?'}digest={digest}", content=data,
                                  headers={"Content-Type": "application/octet-stream"})  # fmt: skip
                assert done.status_code == 201, done.text
            if index is not None:  # children by digest first, then the index under the tag
                put = client.put(f"/v2/{repo}/manifests/{img.digest}", content=img.manifest,
                                 headers={"Content-Type": img.media_type})  # fmt: skip
                assert put.status_code == 201, put.text
        body, media_type = (index, OCI_INDEX) if index is not None else (image.manifest, image.media_type)
        put = client.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": media_type})
        assert put.status_code == 201, put.text


def skopeo_push(layout: Path, tag: str, registry: Registry, repo: str, *, creds: str | None = None,
                fmt: str = "v2s2") -> None:  # fmt: skip
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--format", fmt]
    if registry.tls:
        certs = layout.parent / f"certs-{registry.port}"
        certs.mkdir(exist_ok=True)
        shutil.copy(registry.tls.ca, certs / "ca.crt")
        argv += ["--dest-cert-dir", str(certs)]
    else:
        argv += ["--dest-tls-verify=false"]
    argv += ["--dest-creds", creds] if creds else []
    argv += [f"oci:{layout}:{tag}", f"docker://127.0.0.1:{registry.port}/{repo}:{tag}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def busybox_layer(busybox: bytes) -> bytes:
    applets = ("sh", "cat", "ls", "echo", "uname", "id")
    return tar_layer({"bin/busybox": busybox}, dirs=("bin", "etc", "tmp"),
                     symlinks={f"bin/{a}": "busybox" for a in applets}, modes={"bin/busybox": 0o755})  # fmt: skip


def stored_bytes(root: Path) -> int:
    """Allocated bytes of every blob in an image store (what duplicate data would grow)."""
    return sum(p.stat().st_blocks * 512 for sub in ("blobs", "layers") for p in (root / sub).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------
# A TCP proxy that can cut transfers midway


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to a registry; in `cut` mode it drops a connection
    once `limit` response bytes have passed, like a network failing mid-blob.
    `cuts_left` bounds how many connections it cuts (None: all of them)."""

    def __init__(self, upstream_port: int, limit: int, cuts_left: int | None = None) -> None:
        self.upstream_port, self.limit, self.cuts_left = upstream_port, limit, cuts_left
        self.cut = True
        self.cuts = 0
        self.requests: list[bytes] = []
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._pipe, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _should_cut(self) -> bool:
        with self._lock:
            if not self.cut or self.cuts_left == 0:
                return False
            if self.cuts_left is not None:
                self.cuts_left -= 1
            self.cuts += 1
            return True

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        sent = 0
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        self.requests.append(data)
                        upstream.sendall(data)
                        continue
                    if sent + len(data) > self.limit and self._should_cut():
                        client.sendall(data[: max(0, self.limit - sent)])
                        return
                    sent += len(data)
                    client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def saw(self, needle: bytes) -> bool:
        return any(needle.lower() in chunk.lower() for chunk in self.requests)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._accepter.join(5)
        for thread in self._threads:
            thread.join(5)


def extract_lower(blob: Path, dest: Path) -> Path:
    """Unpack an erofs lower disk without mounting it."""
    proc = subprocess.run(["fsck.erofs", f"--extract={dest}", str(blob)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return dest


# ---------------------------------------------------------------------------
# A token server for bearer auth (the registry's `auth: token` mode)


class TokenServer:
    """Issues ES256 JWTs the registry verifies against `cert` (sent in the x5c header).

    Anonymous callers may pull `public/*`; `user`/`password` may pull anything;
    other credentials get 401. `scopes` records what clients asked for.
    """

    SERVICE = "matchlock-test-registry"
    ISSUER = "matchlock-test-issuer"

    def __init__(self, directory: Path, user: str, password: str) -> None:
        import base64
        import http.server

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matchlock test token signer")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(self._key, hashes.SHA256())
        )  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        self.cert = directory / "token-signer.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.user = user
        self.scopes: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlsplit

                query = parse_qs(urlsplit(self.path).query)
                scope = query.get("scope", [""])[0]
                server.scopes.append(scope)
                given = self.headers.get("Authorization")
                if given is not None and given != server.expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                repo = scope.split(":")[1] if scope.count(":") == 2 else ""
                allowed = given is not None or repo.startswith("public/")
                body = json.dumps({"token": server.token(repo if allowed else "", given is not None)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def token(self, repo: str, authenticated: bool) -> str:
        import base64
        import secrets

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": self.ISSUER, "sub": self.user if authenticated else "", "aud": self.SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8),
            "access": [{"type": "repository", "name": repo, "actions": ["pull"]}] if repo else [],
        }  # fmt: skip
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
