"""The sandbox's DNS forwarder: answers only names the policy allows.

Every UDP query the guest sends to port 53, whatever server it names, is
redirected here. A name outside the allow-list gets NXDOMAIN without any
query leaving the host, so DNS cannot be used to exfiltrate data. Allowed
queries go to the upstream servers, and addresses in the answer that the
sandbox may not reach (private, loopback, link-local, ULA, the host's own)
are removed.
Parsing uses dnspython; a malformed query is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from typing import TYPE_CHECKING

from ..api.events import NetworkEvent
from ..policy.engine import NetworkPolicy
from .local import host_addresses
from .tasks import Supervisor

if TYPE_CHECKING:  # dnspython is imported on the first query: ~60 ms that a sandbox without DNS never pays
    import dns.message

UPSTREAM_TIMEOUT = 2.0
MAX_IN_FLIGHT = 64
MAX_RESPONSE = 65535


def host_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return []
    return [line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, forwarder: DNSForwarder) -> None:
        self.forwarder = forwarder

    def connection_made(self, transport) -> None:
        self.forwarder.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.forwarder.received(data, addr)


class _UpstreamReply(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future) -> None:
        self.future = future

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class DNSForwarder:
    def __init__(self, policy: NetworkPolicy, upstreams: list[str]) -> None:
        self.policy = policy
        self.upstreams = upstreams or host_resolvers() or ["8.8.8.8", "8.8.4.4"]
        self.transport: asyncio.DatagramTransport | None = None
        self._queries = Supervisor("dns")

    async def start(self, sock: socket.socket) -> None:
        await self._queries.start()
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: _Protocol(self), sock=sock)

    async def aclose(self) -> None:
        """Stop answering and wait for the queries in flight to end; safe to call more than once."""
        if self.transport is not None:
            self.transport.close()
        await self._queries.aclose()

    def received(self, data: bytes, addr) -> None:
        if not self._queries.running or self._queries.active >= MAX_IN_FLIGHT:
            return  # closing, or a flood: drop rather than queue without bound
        self._queries.spawn(self._answer(data, addr), "dns query")

    async def _answer(self, data: bytes, addr) -> None:
        import dns.exception
        import dns.flags
        import dns.message
        import dns.rcode

        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            return
        if len(query.question) != 1 or query.flags & dns.flags.QR:
            return self._send(dns.message.make_response(query), dns.rcode.FORMERR, addr)
        name = query.question[0].name.to_text(omit_final_dot=True)
        if not name or not self.policy.host_allowed(name):
            self.policy.record(NetworkEvent(method="DNS", url=f"dns://{name}", host=name, blocked=True,
                                            block_reason=f"name {name} is not in the allow-list"))  # fmt: skip
            return self._send(dns.message.make_response(query), dns.rcode.NXDOMAIN, addr)
        raw = await self._ask_upstreams(data)
        if raw is None:
            return self._send(dns.message.make_response(query), dns.rcode.SERVFAIL, addr)
        try:
            response = dns.message.from_wire(raw)
        except (dns.exception.DNSException, ValueError):
            return self._send(dns.message.make_response(query), dns.rcode.SERVFAIL, addr)
        self._drop_unreachable(response)
        self._send(response, None, addr)

    def _drop_unreachable(self, response: dns.message.Message) -> None:
        import dns.rdatatype

        local = host_addresses()
        for rrset in list(response.answer):
            if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
                continue
            kept = [rdata for rdata in rrset if self.policy.address_allowed(rdata.address, local)]
            if len(kept) != len(rrset):
                for rdata in list(rrset):
                    if rdata not in kept:
                        rrset.discard(rdata)
                if not kept:
                    response.answer.remove(rrset)

    async def _ask_upstreams(self, data: bytes) -> bytes | None:
        loop = asyncio.get_running_loop()
        for server in self.upstreams:
            future: asyncio.Future = loop.create_future()
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_UpstreamReply, future), remote_addr=(server, 53)
                )
            except OSError:
                continue
            try:
                transport.sendto(data)
                return await asyncio.wait_for(future, UPSTREAM_TIMEOUT)
            except (TimeoutError, OSError):
                continue
            finally:
                transport.close()
        return None

    def _send(self, message: dns.message.Message, rcode, addr) -> None:
        import dns.exception

        if rcode is not None:
            message.set_rcode(rcode)
        with contextlib.suppress(dns.exception.DNSException, OSError):
            if self.transport is not None:
                self.transport.sendto(message.to_wire(max_size=MAX_RESPONSE), addr)
