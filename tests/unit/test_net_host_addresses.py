"""The host's own addresses, "this network", broadcast and multicast are never dialled unless named.

The live test adds an address to `lo` of the test session's private
namespace (never the machine's), listens on it, and dials it through the
proxy's dial path with private ranges allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess

import dns.message
import dns.rrset
import pytest

from matchlock.api.network import NetworkConfig
from matchlock.net.dns import DNSForwarder
from matchlock.net.local import host_addresses, parse_fib, parse_inet6
from matchlock.net.upstream import connect
from matchlock.policy.engine import Blocked, NetworkPolicy

pytestmark = pytest.mark.timeout(60)
HOST_ADDRESS = "203.0.113.77"  # documentation range: public-looking, so only the new check refuses it

FIB = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 198.51.100.0/24 2 0 2
           |-- 198.51.100.0
              /24 link UNICAST
           |-- 198.51.100.4
              /32 host LOCAL
"""
INET6 = """fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


def test_parse_kernel_tables():
    assert {str(a) for a in parse_fib(FIB.splitlines())} == {"127.0.0.1", "127.255.255.255", "198.51.100.4"}
    assert {str(a) for a in parse_inet6(INET6.splitlines())} == {"fe80::fc:ff:fe00:1", "::1"}


NEVER = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "224.0.0.251", "239.1.2.3", "255.255.255.255", "::", "::1", "ff02::1",
         "::ffff:0.0.0.0", "64:ff9b::7f00:1", "2002:7f00:1::1"]  # fmt: skip


@pytest.mark.parametrize("address", NEVER)
def test_never_dialled_even_with_private_ranges_allowed(address):
    open_policy = NetworkPolicy(NetworkConfig(block_private_ips=False))
    assert not open_policy.address_allowed(address)
    assert not NetworkPolicy(NetworkConfig()).address_allowed(address)
    assert NetworkPolicy(NetworkConfig(allowed_hosts=(address,), block_private_ips=False)).address_allowed(address)


def test_host_addresses_are_refused_in_every_mode_unless_named():
    own = frozenset({ipaddress.ip_address(HOST_ADDRESS), ipaddress.ip_address("2001:db8::7")})
    for config in (NetworkConfig(), NetworkConfig(block_private_ips=False), NetworkConfig(allowed_hosts=("*",))):
        policy = NetworkPolicy(config)
        assert not policy.address_allowed(HOST_ADDRESS, own) and not policy.address_allowed("2001:db8::7", own)
        assert not policy.address_allowed(f"::ffff:{HOST_ADDRESS}", own)
        assert policy.address_allowed("203.0.113.78", own)
    with pytest.raises(Blocked, match="host's own"):
        NetworkPolicy(NetworkConfig()).check_address(HOST_ADDRESS, own)
    assert NetworkPolicy(NetworkConfig(allowed_hosts=(HOST_ADDRESS,))).address_allowed(HOST_ADDRESS, own)
    # Private ranges keep their switch.
    assert NetworkPolicy(NetworkConfig(block_private_ips=False)).address_allowed("10.1.2.3", own)
    assert not NetworkPolicy(NetworkConfig()).address_allowed("10.1.2.3", own)


@pytest.fixture
def own_address():
    """HOST_ADDRESS on lo of the test session's private namespace, with a server listening on it."""
    subprocess.run(["ip", "addr", "add", f"{HOST_ADDRESS}/32", "dev", "lo"], check=True)
    try:
        yield HOST_ADDRESS
    finally:
        subprocess.run(["ip", "addr", "del", f"{HOST_ADDRESS}/32", "dev", "lo"], check=True)


async def test_the_dial_path_reads_the_host_addresses_at_dial_time(own_address):
    assert ipaddress.ip_address(own_address) in host_addresses()
    server = await asyncio.start_server(lambda r, w: w.close(), own_address, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(Blocked, match="the host's own"):
            await connect(NetworkPolicy(NetworkConfig(block_private_ips=False)), own_address, port)
        named = await connect(NetworkPolicy(NetworkConfig(allowed_hosts=(own_address,))), own_address, port)
        named.close()
    assert named.address == own_address


def test_dns_answers_lose_the_host_addresses(own_address):
    query = dns.message.make_query("api.test", "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("api.test.", 60, "IN", "A", own_address, "198.51.100.9"))
    DNSForwarder(NetworkPolicy(NetworkConfig(block_private_ips=False)), ["192.0.2.53"])._drop_unreachable(response)
    assert [r.address for rrset in response.answer for r in rrset] == ["198.51.100.9"]
