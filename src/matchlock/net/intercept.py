"""TLS interception of one guest connection: terminate it, then relay HTTP/1.1 or HTTP/2 under the policy.

The ClientHello is peeked (not consumed) for the server name and the ALPN
offer. The policy decides on that name before any certificate is chosen:
a refused name is answered with the CA's one fixed refusal certificate, so
a hostile guest cannot make the host mint and keep a leaf per invented
name. An allowed name is dialled first, offering what the guest offered,
so the guest is given the protocol the real server chose.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time

from ..policy.engine import Blocked, NetworkPolicy
from .clienthello import ClientHello, NotTLS
from .clienthello import parse as parse_client_hello
from .exchange import Refusal, connection_event
from .http1 import LINGER_BYTES, LINGER_SECONDS, HTTP1Session
from .http2 import HTTP2Session
from .tls import CertificateAuthority, UpstreamTLS
from .upstream import Upstream, UpstreamError, connect

HELLO_TIMEOUT = 10.0
TLS_HANDSHAKE_TIMEOUT = 30.0
TLS_CLOSE_TIMEOUT = 30.0
SUPPORTED_ALPN = ("h2", "http/1.1")


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def peek_client_hello(sock: socket.socket) -> ClientHello:
    """Read the ClientHello without consuming it, so the TLS layer still sees it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HELLO_TIMEOUT
    while loop.time() < deadline:
        readable = loop.create_future()
        loop.add_reader(sock.fileno(), _set_once, readable)
        try:
            await asyncio.wait_for(readable, max(0.01, deadline - loop.time()))
        finally:
            loop.remove_reader(sock.fileno())
        data = sock.recv(65536, socket.MSG_PEEK)
        if not data:
            raise NotTLS("the guest closed the connection before its ClientHello")
        hello = parse_client_hello(data)
        if hello is not None:
            return hello
        await asyncio.sleep(0.005)  # a hello split over segments: wait for the rest
    raise NotTLS("no complete ClientHello in time")


class _Held(asyncio.Protocol):
    """The TCP side until TLS takes it over: reads nothing, so the peeked ClientHello stays queued."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()


async def close_tls(writer: asyncio.StreamWriter, tcp: asyncio.WriteTransport) -> None:
    """End the guest's connection now: close_notify, then TCP FIN once everything queued is sent; idempotent.

    asyncio's TLS close alone sends close_notify and then keeps TCP open
    until the peer answers with its own (up to 30 s), so a guest that reads
    to the end of the connection (after `Connection: close` or a 403) would
    wait that long. Its close_notify, when it comes, still ends the read side.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():  # the proxy is stopping: no waiting for slow guests
        tcp.abort()
        return
    if not writer.transport.is_closing():  # a second close() would detach asyncio's TLS transport
        writer.close()  # close_notify goes behind the data still queued in the TLS layer
    try:
        async with asyncio.timeout(TLS_CLOSE_TIMEOUT):
            while not tcp.is_closing() and writer.transport.get_write_buffer_size():
                await asyncio.sleep(0.01)  # the TLS layer hands its last records to TCP as TCP drains
    except TimeoutError:  # a guest that stopped reading: give up on it
        tcp.abort()
        return
    if tcp.is_closing():
        return
    tcp.write_eof()  # FIN after whatever TCP still buffers
    await _drain_guest(tcp)


class _Drain(asyncio.Protocol):
    """Takes the TCP side over from TLS once our close_notify is out: drops what the guest still sends."""

    def __init__(self, tls: asyncio.BaseProtocol, done: asyncio.Future[None]) -> None:
        self.tls, self.done, self.dropped = tls, done, 0

    def data_received(self, data: bytes) -> None:
        self.dropped += len(data)
        if self.dropped > LINGER_BYTES:
            _set_once(self.done)

    def eof_received(self) -> bool:
        return False  # the guest is done too: close

    def connection_lost(self, exc: Exception | None) -> None:
        _set_once(self.done)
        self.tls.connection_lost(exc)  # lets the TLS layer and the stream above it finish


async def _drain_guest(tcp: asyncio.WriteTransport) -> None:
    """Read and drop the guest's bytes until its FIN, for a bounded while, then close.

    A guest still uploading when it is refused (a 403 before a large body)
    would otherwise leave bytes unread when the socket closes; the kernel
    then resets the connection, and the reset can destroy the refusal before
    the guest reads it. asyncio's TLS layer cannot do this: application data
    after its close_notify is a fatal error to it, which closes at once.
    """
    done = asyncio.get_running_loop().create_future()
    drain = _Drain(tcp.get_protocol(), done)
    tcp.set_protocol(drain)
    if isinstance(tcp, asyncio.ReadTransport):
        tcp.resume_reading()  # the TLS layer may have paused it when the session stopped reading
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            await done
    except TimeoutError:
        pass
    finally:
        if not tcp.is_closing():
            tcp.abort()  # the guest went on sending, or never closed: nothing more is owed to it


class TLSInterceptor:
    def __init__(self, policy: NetworkPolicy, ca: CertificateAuthority, upstream_tls: UpstreamTLS) -> None:
        self.policy = policy
        self.ca = ca
        self.upstream_tls = upstream_tls

    async def _dial(self, server_name: str, port: int, offered: tuple[str, ...]) -> Upstream | Refusal:
        try:
            self.policy.check_host(server_name, port)
            return await connect(self.policy, server_name, port, tls=self.upstream_tls, alpn=offered)
        except Blocked as exc:
            return Refusal.by_policy(exc)
        except UpstreamError as exc:
            return Refusal.upstream_failed(str(exc))
        except OSError as exc:  # upstream certificate or handshake failure
            return Refusal.upstream_failed(str(exc), f"TLS with {server_name}:{port} failed: {exc}")

    async def handle(self, sock: socket.socket, address: str, port: int) -> None:
        """Serve one redirected connection whose original destination was `address:port`."""
        started = time.monotonic()
        upstream: Upstream | None = None
        try:
            hello = await peek_client_hello(sock)
            server_name = hello.server_name or address
            offered = tuple(p for p in hello.alpn if p in SUPPORTED_ALPN)
            dialled = await self._dial(server_name, port, offered)
            if isinstance(dialled, Refusal):
                self.policy.record(connection_event(f"https://{server_name}:{port}", server_name, started=started,
                                                    status=dialled.status, blocked=dialled.blocked,
                                                    reason=dialled.reason))  # fmt: skip
                # Only a name the policy allowed gets a certificate of its own.
                context = self.ca.refusal_context() if dialled.blocked else self.ca.server_context(server_name)
            else:
                upstream = dialled
                chosen = dialled.alpn if dialled.alpn in offered else None
                context = self.ca.server_context(server_name, (chosen,) if chosen else ())
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=256 * 1024)
            # TLS over a TCP transport of our own, so the end can half-close TCP (`close_tls`).
            tcp, _ = await loop.connect_accepted_socket(_Held, sock)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport = await loop.start_tls(tcp, protocol, context, server_side=True,
                                             ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)  # fmt: skip
            if transport is None:  # only for a transport closed under us
                raise ConnectionError("the guest connection closed during the TLS handshake")
            protocol.connection_made(transport)  # start_tls leaves this to the caller
        except (TimeoutError, OSError, NotTLS):  # a verifying guest rejects the refusal certificate here
            sock.close()
            if upstream is not None:
                upstream.close()
            return
        except BaseException:
            sock.close()
            if upstream is not None:
                upstream.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            if isinstance(dialled, Refusal):
                session = HTTP1Session(self.policy, reader, writer, scheme="https", default_host=server_name, port=port)
                await session.reply(dialled)
            elif dialled.alpn == "h2" and transport.get_extra_info("ssl_object").selected_alpn_protocol() == "h2":
                await HTTP2Session(self.policy, reader, writer, server_name=server_name, port=port,
                                   upstream=dialled).run()  # fmt: skip
            else:
                await HTTP1Session(self.policy, reader, writer, scheme="https", default_host=server_name, port=port,
                                   upstream=dialled, upstream_tls=self.upstream_tls,
                                   end_guest=functools.partial(close_tls, writer, tcp)).run()  # fmt: skip
        finally:
            await close_tls(writer, tcp)
