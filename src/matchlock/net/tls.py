"""The per-sandbox certificate authority and the TLS contexts built from it.

Each sandbox gets its own CA, created in memory when the sandbox starts and
never written to disk (only its certificate goes into the guest). Leaf
certificates are minted per server name on first use and cached. ECDSA P-256
keys keep minting fast (well under a millisecond, against tens of
milliseconds for RSA-2048) and are accepted by every current TLS client.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "Sandbox MITM CA"
UPSTREAM_CA_ENV = "MATCHLOCK_UPSTREAM_CA_FILE"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "matchlock")])  # fmt: skip


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CertificateAuthority:
    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(minutes=5)
        self._not_after = now + datetime.timedelta(days=3650)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(CA_NAME))
            .issuer_name(_name(CA_NAME))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM).decode()
        self._contexts: dict[tuple[str, tuple[str, ...]], ssl.SSLContext] = {}
        self._leaves: dict[str, tuple[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def _leaf(self, server_name: str) -> tuple[bytes, bytes]:
        cached = self._leaves.get(server_name)
        if cached is not None:
            return cached
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
        self._leaves[server_name] = (chain, _pem_key(key))
        return self._leaves[server_name]

    def server_context(self, server_name: str, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """A server-side context presenting a certificate for `server_name`."""
        key = (server_name, alpn)
        with self._lock:
            context = self._contexts.get(key)
            if context is not None:
                return context
            chain, private_key = self._leaf(server_name)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            _load_chain(context, chain, private_key)
            if alpn:
                context.set_alpn_protocols(list(alpn))
            self._contexts[key] = context
            return context


def _load_chain(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    # The ssl module loads certificates only from paths. Anonymous memory files
    # reached through /proc keep private keys off every disk.
    fds = []
    try:
        for data in (chain, key):
            fd = os.memfd_create("matchlock-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


_upstream_contexts: dict[tuple[str, ...], ssl.SSLContext] = {}


def upstream_context(alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """Client context verifying upstream servers: system roots plus an optional extra bundle."""
    context = _upstream_contexts.get(alpn)
    if context is None:
        context = ssl.create_default_context()
        extra = os.environ.get(UPSTREAM_CA_ENV)
        if extra:
            context.load_verify_locations(cafile=extra)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        _upstream_contexts[alpn] = context
    return context
