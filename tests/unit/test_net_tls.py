"""Bounded MITM certificate caches, the refusal certificate, explicit upstream trust, and task supervision."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from matchlock.net.tasks import Supervisor
from matchlock.net.tls import REFUSAL_NAME, UPSTREAM_CA_ENV, CertificateAuthority, UpstreamTLS
from proxy_harness import TLSInterceptProxy, make_policy
from proxy_upstreams import UpstreamCA

pytestmark = pytest.mark.timeout(60)


def test_leaf_and_context_caches_forget_the_least_recently_used():
    ca = CertificateAuthority(cache_size=5)
    first = ca.server_context("n0.test")
    for i in range(1, 20):
        ca.server_context(f"n{i}.test")
        ca.server_context("n0.test")  # kept warm: never the least recently used
    assert ca.cached_names == 5 and len(ca._contexts) == 5
    assert ca.server_context("n0.test") is first
    assert ca.server_context("n1.test") is not None and ca.cached_names == 5  # evicted long ago: minted again


def test_refusal_context_is_one_context_for_every_refused_name():
    ca = CertificateAuthority()
    assert ca.refusal_context() is ca.refusal_context()
    assert ca.cached_names == 0


def peer_common_name(der: bytes) -> str:
    name = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(name[0].value)


async def test_many_refused_server_names_mint_nothing(tmp_path):
    policy, events = make_policy(allowed_hosts=("api.test",))
    async with TLSInterceptProxy(policy, 9, UpstreamCA(tmp_path)) as proxy:  # port 9: never dialled
        context = proxy.client_context(("http/1.1",))
        context.check_hostname = False  # to read the 403 behind the refusal certificate
        names, statuses = set(), set()
        for i in range(40):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, ssl=context,
                                                           server_hostname=f"n{i}.refused.test")  # fmt: skip
            names.add(peer_common_name(writer.get_extra_info("ssl_object").getpeercert(binary_form=True)))
            writer.write(f"GET / HTTP/1.1\r\nHost: n{i}.refused.test\r\n\r\n".encode())
            statuses.add((await reader.readline()).decode().strip())
            writer.close()
        minted = proxy.ca.cached_names
    assert names == {REFUSAL_NAME} and statuses == {"HTTP/1.1 403"}
    assert minted == 0
    assert len(events) == 40 and all(e.blocked and e.status_code == 403 for e in events)


def test_upstream_trust_is_explicit_per_instance(tmp_path):
    ca = UpstreamCA(tmp_path)
    trusting, plain = UpstreamTLS(str(ca.ca_file)), UpstreamTLS()
    assert trusting.context() is trusting.context(), "one context per ALPN offer"
    assert trusting.context(("h2",)) is not trusting.context()
    subjects = [dict(item[0] for item in c["subject"]) for c in trusting.context().get_ca_certs()]
    assert {"commonName": "proxy test upstream CA"} in subjects
    assert {"commonName": "proxy test upstream CA"} not in [
        dict(item[0] for item in c["subject"]) for c in plain.context().get_ca_certs()
    ]
    assert UpstreamTLS.from_environment({UPSTREAM_CA_ENV: str(ca.ca_file)}).extra_ca_file == str(ca.ca_file)
    assert UpstreamTLS.from_environment({}).extra_ca_file is None
    assert trusting.context().verify_mode == ssl.CERT_REQUIRED


async def test_supervisor_cancels_and_awaits_every_child_and_isolates_failures():
    supervisor = Supervisor("test")
    await supervisor.start()
    started, ended = asyncio.Event(), []

    async def forever(name: str) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    async def broken() -> None:
        raise ValueError("one connection's bug")

    supervisor.spawn(broken())
    supervisor.spawn(forever("a"))
    supervisor.spawn(forever("b"))
    await started.wait()  # children start in spawn order: the broken one has already failed
    assert supervisor.active == 2  # and it ended only itself
    await supervisor.aclose()
    assert sorted(ended) == ["a", "b"] and supervisor.active == 0
    await supervisor.aclose()  # idempotent
    orphan = forever("never")
    with pytest.raises(RuntimeError, match="not running"):
        supervisor.spawn(orphan)
