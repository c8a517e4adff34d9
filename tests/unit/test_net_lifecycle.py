"""A sandbox network's lifetime: start, serve, `aclose()` (twice), and nothing left behind.

Runs a real `SandboxNetwork` (anonymous namespace, nftables, proxy, DNS
forwarder) inside the test session's private namespace; no VM.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from matchlock.api.network import NetworkConfig
from matchlock.net.namespace import PORTS, namespace_alive
from matchlock.sandbox.network import SandboxNetwork

pytestmark = pytest.mark.timeout(60)


async def request_inside(network: SandboxNetwork, port: int, request: bytes) -> bytes:
    """Send `request` from inside the sandbox namespace; all the proxy answers until it closes."""

    def attempt() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            return reply

    return await asyncio.to_thread(network.namespace.run_inside, attempt)  # the loop must keep serving


async def test_sandbox_network_aclose_releases_everything_and_is_idempotent():
    events: list = []
    network = SandboxNetwork(NetworkConfig(allowed_hosts=("api.test",), dns_servers=("192.0.2.53",)), events.append)
    await network.start()
    assert network.proxy is not None and network.ca_pem.startswith("-----BEGIN CERTIFICATE-----")
    inode = network.namespace.inode
    assert inode is not None and namespace_alive(inode)
    reply = await request_inside(network, PORTS.http, b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403 ") and reply.endswith(b"host evil.test is not in the allow-list\n")
    assert [(e.host, e.blocked) for e in events] == [("evil.test", True)]
    fds_before = len(os.listdir("/proc/self/fd"))

    await network.aclose()
    await network.aclose()  # idempotent
    assert network.namespace.fd is None and not namespace_alive(inode)
    assert network.proxy._tasks.active == 0 and not network.proxy._tasks.running
    assert len(os.listdir("/proc/self/fd")) < fds_before  # listeners, DNS socket and namespace released
