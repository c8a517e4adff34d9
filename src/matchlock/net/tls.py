"""The per-sandbox certificate authority and the TLS contexts built from it.

Each sandbox gets its own CA, created in memory when the sandbox starts and
never written to disk (only its certificate goes into the guest). Leaf
certificates are minted per server name on first use and cached. ECDSA P-256
keys keep minting fast (well under a millisecond, against tens of
milliseconds for RSA-2048) and are accepted by every current TLS client.

The guest chooses the server names, so the caches are bounded (least
recently used first out, as mitmproxy's STORE_CAP), and a name the policy
refuses gets no leaf at all: one fixed refusal certificate answers them all.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..util.fs import memfd_holding

CA_NAME = "Sandbox MITM CA"
UPSTREAM_CA_ENV = "MATCHLOCK_UPSTREAM_CA_FILE"
CACHE_SIZE = 100
# Matches no real name (RFC 6761 .invalid): a verifying guest rejects it, which is the point.
REFUSAL_NAME = "refused.matchlock.invalid"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "matchlock")])  # fmt: skip


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    """A mapping that forgets its least recently used entry beyond `size`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def ca_certificate(
    key: ec.EllipticCurvePrivateKey, common_name: str, not_before: datetime.datetime, not_after: datetime.datetime
) -> x509.Certificate:
    """A self-signed CA certificate that signs leaves only (path length 0); the tests' stand-in CA uses it too."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


class CertificateAuthority:
    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(minutes=5)
        self._not_after = now + datetime.timedelta(days=3650)
        self.certificate = ca_certificate(self._key, CA_NAME, self._not_before, self._not_after)
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode()
        self._contexts: _LRU[tuple[str, tuple[str, ...]], ssl.SSLContext] = _LRU(cache_size)
        self._leaves: _LRU[str, tuple[bytes, bytes]] = _LRU(cache_size)
        self._refusal: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    @property
    def cached_names(self) -> int:
        """How many minted leaves are held (bounded by the cache size)."""
        return len(self._leaves)

    def _leaf(self, server_name: str) -> tuple[bytes, bytes]:
        cached = self._leaves.get(server_name)
        if cached is None:
            cached = self._mint(server_name)
            self._leaves.put(server_name, cached)
        return cached

    def _mint(self, server_name: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(server_name))
        except ValueError:
            alternative = x509.DNSName(server_name)
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(server_name[:64]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=365), self._not_after))
            .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        chain = certificate.public_bytes(serialization.Encoding.PEM) + self.pem.encode()
        return chain, _pem_key(key)

    def server_context(self, server_name: str, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """A server-side context presenting a certificate for `server_name`."""
        key = (server_name, alpn)
        with self._lock:
            context = self._contexts.get(key)
            if context is not None:
                return context
            context = _server_context(*self._leaf(server_name), alpn)
            self._contexts.put(key, context)
            return context

    def refusal_context(self) -> ssl.SSLContext:
        """The one context for every name the policy refuses: minting nothing per name keeps the
        guest from growing host memory one SNI at a time. A guest that does not verify still
        reads the 403 that follows."""
        with self._lock:
            if self._refusal is None:
                self._refusal = _server_context(*self._mint(REFUSAL_NAME), ())
            return self._refusal


def _server_context(chain: bytes, private_key: bytes, alpn: tuple[str, ...]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: they arrive after the handshake, and a guest that reads and writes one
    # connection from two threads (websockets' sync client; Python's ssl before 3.13 does not serialise
    # them) can lose the record it is writing while OpenSSL takes in a ticket: a wss upgrade that never
    # leaves the guest. Resuming would only spare a guest its handshake with the proxy.
    context.num_tickets = 0
    _load_chain(context, chain, private_key)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def _load_chain(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    # The ssl module loads certificates only from paths. Anonymous memory files
    # reached through /proc keep private keys off every disk.
    fds = []
    try:
        for data in (chain, key):
            fds.append(memfd_holding("matchlock-tls", data))
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


class UpstreamTLS:
    """Client contexts that verify upstream servers: system roots plus an optional extra bundle
    (stand-in servers in tests), one context per ALPN offer, owned by one proxy."""

    def __init__(self, extra_ca_file: str | None = None) -> None:
        self.extra_ca_file = extra_ca_file
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}  # at most a few ALPN offers

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> UpstreamTLS:
        return cls(environ.get(UPSTREAM_CA_ENV) or None)

    def context(self, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        context = self._contexts.get(alpn)
        if context is None:
            context = ssl.create_default_context()
            if self.extra_ca_file:
                context.load_verify_locations(cafile=self.extra_ca_file)
            if alpn:
                context.set_alpn_protocols(list(alpn))
            self._contexts[alpn] = context
        return context
