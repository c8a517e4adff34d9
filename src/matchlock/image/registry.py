"""A client for the OCI distribution API (v2): manifests and blobs over httpx.

- Scheme: HTTPS, verified against the system CAs plus Docker's per-registry
  `certs.d/<host:port>/*.crt`. Plain HTTP only for loopback registries or
  ones listed in MATCHLOCK_INSECURE_REGISTRIES (which also skip TLS checks).
- Auth: the challenge from `GET /v2/` decides: a bearer token from the realm
  (anonymous or with the user's credentials), or HTTP basic.
- Transfers: transient failures (connection errors, 429, 5xx) are retried
  with exponential backoff; an interrupted blob resumes with a Range request.
  Every blob is hashed while it streams and only renamed into place after
  its digest matched and it was fsynced.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ..api.errors import ImageError, NotFoundError
from . import auth
from .media import INDEX_TYPES, MANIFEST_TYPES
from .reference import Reference, http_allowed, is_loopback, listed_insecure

RETRIES_ENV = "MATCHLOCK_PULL_RETRIES"
BACKOFF_ENV = "MATCHLOCK_PULL_BACKOFF"
CERTS_ENV = "MATCHLOCK_REGISTRY_CERTS_DIR"
DEFAULT_CERTS_DIR = "/etc/docker/certs.d"
_MANIFEST_LIMIT = 4 << 20
_CHUNK = 1 << 20
_TRANSIENT = {408, 429, 500, 502, 503, 504}
_MAX_RETRY_AFTER = 30.0


def _larger_reads() -> None:
    """httpcore reads 64 KiB per recv(), each through h11's pure-Python parser; with 1 MiB
    reads blob downloads went from 0.65x to 0.9x curl's throughput (benchmarks/bench_pull.py).
    A tunable class attribute, not API: if a release drops it, pulls only get slower."""
    try:
        from httpcore._sync.http11 import HTTP11Connection
    except ImportError:
        return
    if isinstance(getattr(HTTP11Connection, "READ_NUM_BYTES", None), int):
        HTTP11Connection.READ_NUM_BYTES = max(HTTP11Connection.READ_NUM_BYTES, _CHUNK)


_larger_reads()


def _env_number(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, default)))
    except ValueError:
        return default


def load_system_cas(ctx: ssl.SSLContext) -> None:
    """SSL_CERT_FILE / SSL_CERT_DIR, else the system's hashed CA directory, else certifi."""
    paths = ssl.get_default_verify_paths()
    cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR") or paths.capath
    if cafile:
        ctx.load_verify_locations(cafile=cafile)
    elif capath and os.path.isdir(capath) and any(name.endswith(".0") for name in os.listdir(capath)):
        ctx.load_verify_locations(capath=capath)  # looked up per certificate, not loaded whole
    else:
        import certifi  # httpx's own dependency: a fallback on hosts without ca-certificates

        ctx.load_verify_locations(
            cafile=paths.cafile if paths.cafile and os.path.exists(paths.cafile) else certifi.where()
        )


def ssl_context(registry: str, *, system_cas: bool = True) -> ssl.SSLContext:
    """A verifying context with Docker's per-registry `certs.d/<host:port>/*.crt` added."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks
    if system_cas:
        load_system_cas(ctx)
    certs = Path(os.environ.get(CERTS_ENV) or DEFAULT_CERTS_DIR) / registry
    if certs.is_dir():
        for ca in sorted(certs.glob("*.crt")):
            ctx.load_verify_locations(cafile=str(ca))
    if listed_insecure(registry):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _error_detail(resp: httpx.Response) -> str:
    try:
        errors = json.loads(resp.read()[:65536]).get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
    except (ValueError, AttributeError, httpx.HTTPError):
        return ""


class RegistryClient:
    """One repository on one registry. Thread-safe: blobs download concurrently."""

    def __init__(self, ref: Reference, on_retry: Callable[[float, str], None] = lambda delay, reason: None) -> None:
        self.ref = ref
        self._on_retry = on_retry  # told (delay, reason) before every backoff: a silent wait looks hung
        self.attempts = max(1, int(_env_number(RETRIES_ENV, 5)))
        self.backoff = _env_number(BACKOFF_ENV, 0.5)
        # Loading the system CAs costs ~17 ms when SSL_CERT_FILE names a bundle: where plain
        # HTTP may turn out to be the answer (loopback), load them only once TLS is spoken.
        self._system_cas = not http_allowed(ref.registry)
        self._ssl = ssl_context(ref.registry, system_cas=self._system_cas)
        self._client = httpx.Client(
            verify=self._ssl,
            timeout=httpx.Timeout(30.0, read=60.0),
            follow_redirects=True,  # blob URLs often redirect to a CDN; httpx drops Authorization across origins
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            headers={"User-Agent": "matchlock"},
        )
        self._lock = threading.Lock()
        self._base: str | None = None
        self._authorization: str | None = None
        self._credentials: auth.Credentials | None = None
        self._used_credentials = False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connection and auth ---------------------------------------------

    def _network_error(self, exc: Exception) -> ImageError:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return ImageError(
                f"TLS certificate of registry {self.ref.registry} is not trusted ({text}); put its CA in "
                f"{DEFAULT_CERTS_DIR}/{self.ref.registry}/ca.crt, or list it in MATCHLOCK_INSECURE_REGISTRIES"
            )
        return ImageError(
            f"network failure talking to registry {self.ref.registry}: {type(exc).__name__}: {text or 'no detail'}"
        )

    def _ensure_base(self) -> str:
        with self._lock:
            if self._base is None:
                self._base = self._probe()
            return self._base

    def _probe(self) -> str:
        """Find the scheme with `GET /v2/` and answer its auth challenge up front."""
        host = self.ref.api_host
        try:
            try:
                resp = self._retrying(lambda: self._client.get(f"https://{host}/v2/"))
            except ImageError as exc:
                if self._system_cas or "CERTIFICATE_VERIFY_FAILED" not in str(exc.__cause__):
                    raise
                load_system_cas(self._ssl)  # it speaks TLS after all: verify it for real
                self._system_cas = True
                resp = self._retrying(lambda: self._client.get(f"https://{host}/v2/"))
            base = f"https://{host}"
        except ImageError as exc:
            cause = exc.__cause__
            # A plain-HTTP server answers the TLS hello with garbage: fall back only where allowed.
            if (
                not http_allowed(self.ref.registry)
                or not isinstance(cause, httpx.ConnectError)
                or ("CERTIFICATE_VERIFY_FAILED" in str(cause))
            ):
                raise
            resp = self._retrying(lambda: self._client.get(f"http://{host}/v2/"))
            base = f"http://{host}"
        if resp.status_code == 401:
            self._authenticate(resp.headers.get("www-authenticate", ""))
        elif resp.status_code >= 400 and resp.status_code != 404:
            self._fail(resp, "the registry API (/v2/)")
        return base

    def _authenticate(self, header: str) -> None:
        challenge = auth.parse_challenge(header)
        if challenge is None:
            return
        if not self._used_credentials:
            self._credentials = auth.credentials_for(self.ref.registry)
            self._used_credentials = True
        creds = self._credentials
        if challenge.scheme == "basic":
            if creds is not None:
                self._authorization = auth.basic_header(creds)
        elif challenge.scheme == "bearer":
            self._authorization = "Bearer " + self._token(challenge.params, creds)

    def _token(self, params: dict[str, str], creds: auth.Credentials | None) -> str:
        realm = params.get("realm", "")
        parts = httpx.URL(realm) if realm else None
        if (
            parts is None
            or parts.scheme not in ("https", "http")
            or (parts.scheme == "http" and not (is_loopback(parts.host) or http_allowed(parts.netloc.decode())))
        ):
            raise ImageError(f"registry {self.ref.registry} named an unusable token realm {realm!r}")
        scope = f"repository:{self.ref.repository}:pull"
        query = {"service": params.get("service", ""), "scope": scope}
        query = {k: v for k, v in query.items() if v}

        def fetch() -> httpx.Response:
            if creds is not None and creds.username == "<token>":
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.password,
                    "client_id": "matchlock",
                    **query,
                }
                return self._client.post(realm, data=form)
            headers = {"Authorization": auth.basic_header(creds)} if creds is not None else {}
            return self._client.get(realm, params=query, headers=headers)

        resp = self._retrying(fetch)
        if resp.status_code in (401, 403):
            self._unauthorized(resp)
        if resp.status_code != 200:
            self._fail(resp, f"a token from {realm}")
        try:
            data = resp.json()
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"token server {realm} answered without a token")
        return token

    # -- requests -----------------------------------------------------------

    def _sleep(self, attempt: int, reason: str, resp: httpx.Response | None = None) -> None:
        delay = self.backoff * (2**attempt) * (0.5 + random.random() / 2)
        if resp is not None and resp.headers.get("retry-after", "").isdigit():
            delay = max(delay, float(resp.headers["retry-after"]))
        delay = min(delay, _MAX_RETRY_AFTER)
        self._on_retry(delay, f"{self.ref.registry}: {reason}")
        time.sleep(delay)

    @staticmethod
    def _reason(exc: Exception) -> str:
        return f"{type(exc).__name__}: {str(exc) or 'no detail'}"

    def _retrying(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        """Send, retrying transport errors and transient statuses with backoff."""
        for attempt in range(self.attempts):
            last = attempt + 1 == self.attempts
            try:
                resp = send()
            except httpx.TransportError as exc:
                # A TLS handshake failure is not transient: retrying only delays the answer.
                if last or (isinstance(exc, httpx.ConnectError) and "SSL" in str(exc)):
                    raise self._network_error(exc) from exc
                self._sleep(attempt, self._reason(exc))
                continue
            if resp.status_code in _TRANSIENT and not last:
                resp.close()
                self._sleep(attempt, f"HTTP {resp.status_code}", resp)
                continue
            return resp
        raise AssertionError("unreachable")

    def _open(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """A streaming GET with auth; re-authenticates once on 401 (tokens expire)."""
        url = self._ensure_base() + path

        def send() -> httpx.Response:
            sent = dict(headers or {})
            if self._authorization:
                sent["Authorization"] = self._authorization
            return self._client.send(self._client.build_request("GET", url, headers=sent), stream=True)

        resp = self._retrying(send)
        if resp.status_code == 401:
            used = self._authorization
            with self._lock:
                if self._authorization == used:  # another thread may have refreshed it already
                    self._authenticate(resp.headers.get("www-authenticate", ""))
            resp.close()
            resp = self._retrying(send)
        return resp

    def _unauthorized(self, resp: httpx.Response) -> None:
        detail = _error_detail(resp)
        registry = self.ref.registry
        who = (
            f"the credentials for {registry} in {auth.config_path()} were rejected"
            if self._credentials is not None
            else "no credentials were found for it"
        )
        raise ImageError(
            f"unauthorized: {registry} refused to serve {self.ref.repository}{f' ({detail})' if detail else ''}; "
            f"{who}. Log in with: docker login {registry}"
        )

    def _fail(self, resp: httpx.Response, what: str) -> None:
        status = resp.status_code
        if status in (401, 403):
            self._unauthorized(resp)
        detail = _error_detail(resp)
        suffix = f" ({detail})" if detail else ""
        if status == 404:
            raise NotFoundError(f"image not found: {what} does not exist on {self.ref.registry}{suffix}")
        if status == 429:
            raise ImageError(
                f"rate limited by registry {self.ref.registry}{suffix}; wait and retry, "
                f"or log in (docker login {self.ref.registry}) for a higher limit"
            )
        raise ImageError(f"registry {self.ref.registry} answered HTTP {status} for {what}{suffix}")

    # -- API ------------------------------------------------------------

    def _read_small(self, path: str, what: str, headers: dict[str, str] | None = None) -> tuple[bytes, httpx.Headers]:
        """A whole small response body (manifest, config), refusing anything over the limit."""
        resp = self._open(path, headers)
        try:
            if resp.status_code != 200:
                self._fail(resp, what)
            body = b""
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > _MANIFEST_LIMIT:
                    raise ImageError(f"{what} is larger than {_MANIFEST_LIMIT} bytes")
        except httpx.TransportError as exc:
            raise self._network_error(exc) from exc
        finally:
            resp.close()
        return body, resp.headers

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, sha256 digest) of a manifest or index, verified."""
        accept = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
        what = f"{self.ref.name}@{reference}" if ":" in reference else f"{self.ref.name}:{reference}"
        body, headers = self._read_small(f"/v2/{self.ref.repository}/manifests/{reference}", what, {"Accept": accept})
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        stated = headers.get("docker-content-digest", "")
        for expected, source in ((reference, "the pinned digest"), (stated, "the registry's Docker-Content-Digest")):
            if expected.startswith("sha256:") and expected != digest:
                raise ImageError(f"manifest of {self.ref.name}: content is {digest}, not {expected} ({source})")
        media_type = headers.get("content-type", "").split(";")[0].strip()
        try:
            media_type = json.loads(body).get("mediaType") or media_type
        except (ValueError, AttributeError):
            raise ImageError(f"manifest {what} is not JSON") from None
        return body, media_type, digest

    def blob_bytes(self, digest: str) -> bytes:
        """A small blob (an image config) in memory, verified."""
        data, _ = self._read_small(f"/v2/{self.ref.repository}/blobs/{digest}", f"blob {digest} of {self.ref.name}")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ImageError(f"blob {digest} of {self.ref.name}: digest mismatch, the registry sent {actual}")
        return data

    def download_blob(self, digest: str, size: int, dest: Path, tmp: Path, progress: Callable[[int], None]) -> None:
        """Stream a blob into `tmp`, verify it, fsync and rename it to `dest`.

        On any failure `tmp` is removed, so nothing unverified is ever left behind.
        """
        hasher, written = hashlib.sha256(), 0
        path = f"/v2/{self.ref.repository}/blobs/{digest}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            for attempt in range(self.attempts):
                resp = self._open(path, {"Range": f"bytes={written}-"} if written else None)
                try:
                    if written and resp.status_code == 200:  # no range support: start over
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
                        progress(-written)
                        hasher, written = hashlib.sha256(), 0
                    elif resp.status_code not in (200, 206):
                        self._fail(resp, f"blob {digest} of {self.ref.name}")
                    for chunk in resp.iter_raw():  # as received: a cut keeps what already arrived
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                        hasher.update(chunk)
                        written += len(chunk)
                        progress(len(chunk))
                        if written > size:
                            break
                    break
                except httpx.TransportError as exc:
                    if attempt + 1 == self.attempts:
                        raise self._network_error(exc) from exc
                    self._sleep(attempt, f"blob {digest[:19]}: {self._reason(exc)}")
                finally:
                    resp.close()
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest or written != size:
                raise ImageError(
                    f"blob {digest} of {self.ref.name} failed verification: received {written} bytes "
                    f"(expected {size}) hashing to {actual}; nothing was cached"
                )
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, dest)
