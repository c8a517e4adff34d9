"""Real upstream servers on 127.0.0.1 for the proxy tests, and the test CA that signs them.

- `UpstreamCA`: a CA and a leaf for `localhost`/127.0.0.1, made with cryptography;
  the proxy trusts it through `trust()` (an `UpstreamTLS` with its CA file).
- `HTTP1Upstream`: the standard library's threaded HTTP/1.1 server (plain or TLS).
- `HTTP2Upstream`: an HTTP/2 server over TLS written with h2's server side.
- WebSocket servers come straight from the `websockets` library in the tests.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hyperframe.frame import GoAwayFrame

from matchlock.net.tls import UpstreamTLS


class UpstreamCA:
    def __init__(self, directory: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proxy test upstream CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        pem = serialization.Encoding.PEM
        self.ca_file = directory / "upstream-ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(pem))
        self.cert_file = directory / "upstream-leaf.pem"
        self.cert_file.write_bytes(leaf.public_bytes(pem))
        self.key_file = directory / "upstream-leaf.key"
        self.key_file.write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))  # fmt: skip

    def trust(self) -> UpstreamTLS:
        """What a proxy needs to verify these upstreams."""
        return UpstreamTLS(str(self.ca_file))

    def server_context(self, alpn: list[str]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(alpn)
        return context


# --- HTTP/1.1 -----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json", extra=()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers.items())))
        self._send(200, b"hello world\n", "text/plain")

    def do_POST(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append((self.command, self.path, dict(self.headers.items())))
        if url.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()  # no length: the body runs until the connection closes
            self.wfile.write(b"event: greeting\r\ndata: hello secret world\r\n\r\n")
            self.wfile.flush()
            self.server.sse_gate.wait(10)
            self.wfile.write(b"data: second secret\n\n: secret comment\n")
            self.wfile.flush()
            self.close_connection = True
            return
        if url.path == "/text":
            return self._send(200, b"the quick brown fox jumps over the lazy dog", "text/plain")
        echo = {
            "method": self.command,
            "path": url.path,
            "query": parse_qs(url.query, keep_blank_values=True),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("latin-1"),
        }
        self._send(200, json.dumps(echo).encode(), extra=[("X-Upstream", "h1"), ("X-Remove-Me", "yes")])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    seen: list
    sse_gate: threading.Event


class HTTP1Upstream:
    """Routes: /echo (JSON of method, path, query, headers, body), /text, /sse (two events; the
    second waits for `sse_gate`), HEAD anything."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.seen = []
        self.server.sse_gate = threading.Event()
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def seen(self) -> list:
        return self.server.seen

    @property
    def sse_gate(self) -> threading.Event:
        return self.server.sse_gate

    def __enter__(self) -> HTTP1Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.sse_gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --- HTTP/2 -----------------------------------------------------------------------------


class HTTP2Upstream:
    """HTTP/2 over TLS. Routes:
    /echo       JSON of method, path, authority, headers, body length and sha256, request trailers
    /download   ?size=N bytes of a repeating pattern, sent as the window allows (records `sent`)
    /trailers   a body and then trailers
    /sse        `data: one`, then waits for `sse_gate`, then `data: two`
    /reset      headers, then RST_STREAM with ENHANCE_YOUR_CALM
    /hold       headers, then nothing until the stream is reset (recorded in `resets`)
    /goaway     headers, then GOAWAY naming this stream and the rest of the body in the same write
    /early      on the request headers alone: a complete 413, then RST_STREAM(NO_ERROR)
    """

    def __init__(self, ca: UpstreamCA) -> None:
        self.context = ca.server_context(["h2"])
        self.sent = 0
        self.resets: list[tuple[int, int]] = []
        self.requests: list[dict] = []
        self.connections = 0
        self.sse_gate = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> HTTP2Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, dict] = {}
        tasks: dict[int, asyncio.Task] = {}
        window = asyncio.Condition()
        try:
            async with asyncio.TaskGroup() as group:  # each stream's responder ends with its connection
                try:
                    await self._read_streams(conn, reader, writer, window, group, streams, tasks)
                finally:
                    for task in tasks.values():
                        task.cancel()
        except* (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    async def _read_streams(self, conn, reader, writer, window, group, streams, tasks) -> None:
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        request = {"headers": dict(event.headers), "body": bytearray(), "trailers": None}
                        streams[event.stream_id] = request
                        if request["headers"][":path"] == "/early":  # answers without waiting for the body
                            tasks[event.stream_id] = group.create_task(
                                self._respond_quietly(conn, writer, window, event.stream_id, request)
                            )
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id]["body"] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.TrailersReceived):
                        streams[event.stream_id]["trailers"] = dict(event.headers)
                    elif isinstance(event, h2.events.StreamEnded):
                        request = streams[event.stream_id]
                        self.requests.append(request)
                        tasks[event.stream_id] = group.create_task(
                            self._respond_quietly(conn, writer, window, event.stream_id, request)
                        )
                    elif isinstance(event, h2.events.StreamReset):
                        self.resets.append((event.stream_id, int(event.error_code)))
                        if event.stream_id in tasks:
                            tasks[event.stream_id].cancel()
                writer.write(conn.data_to_send())
                async with window:
                    window.notify_all()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass

    async def _send_body(self, conn, writer, window, stream_id: int, data: bytes, end: bool = True) -> None:
        view = memoryview(data)
        while view:
            size = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(view))
            if size <= 0:
                async with window:
                    await window.wait()
                continue
            conn.send_data(stream_id, view[:size].tobytes())
            self.sent += size
            view = view[size:]
            writer.write(conn.data_to_send())
            await writer.drain()
        if end:
            conn.end_stream(stream_id)
            writer.write(conn.data_to_send())

    async def _respond_quietly(self, conn, writer, window, stream_id: int, request: dict) -> None:
        """One stream's failure (the proxy reset it, the connection went) ends only that stream."""
        try:
            await self._respond(conn, writer, window, stream_id, request)
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass

    async def _respond(self, conn, writer, window, stream_id: int, request: dict) -> None:
        url = urlsplit(request["headers"][":path"])
        route = url.path
        if route == "/download":
            size = int(parse_qs(url.query)["size"][0])
            conn.send_headers(stream_id, [(":status", "200"), ("content-length", str(size))])
            pattern = (b"0123456789abcdef" * (size // 16 + 1))[:size]
            return await self._send_body(conn, writer, window, stream_id, pattern)
        if route == "/trailers":
            conn.send_headers(stream_id, [(":status", "200")])
            await self._send_body(conn, writer, window, stream_id, b"body before trailers", end=False)
            conn.send_headers(stream_id, [("x-checksum", "abc123")], end_stream=True)
            return writer.write(conn.data_to_send())
        if route == "/sse":
            conn.send_headers(stream_id, [(":status", "200"), ("content-type", "text/event-stream")])
            await self._send_body(conn, writer, window, stream_id, b"data: one secret\n\n", end=False)
            await self.sse_gate.wait()
            return await self._send_body(conn, writer, window, stream_id, b"data: two secret\n\n")
        if route == "/early":
            conn.send_headers(stream_id, [(":status", "413")])
            conn.send_data(stream_id, b"too large, stop sending", end_stream=True)
            conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            return writer.write(conn.data_to_send())
        if route in ("/reset", "/hold", "/goaway"):
            conn.send_headers(stream_id, [(":status", "200")])
            writer.write(conn.data_to_send())
            if route == "/reset":
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                return writer.write(conn.data_to_send())
            if route == "/goaway":
                # h2 itself cannot send after a GOAWAY, so the frame goes in by hand, followed by
                # the rest of this stream: a graceful shutdown with a response still in flight.
                writer.write(GoAwayFrame(0, last_stream_id=stream_id).serialize())
                return await self._send_body(conn, writer, window, stream_id, b"finished after goaway")
            await asyncio.sleep(30)
            return
        echo = {"method": request["headers"][":method"], "path": route, "query": url.query,
                "authority": request["headers"].get(":authority"),
                "headers": {k: v for k, v in request["headers"].items() if not k.startswith(":")},
                "body_length": len(request["body"]), "body_sha256": hashlib.sha256(request["body"]).hexdigest(),
                "trailers": request["trailers"]}  # fmt: skip
        body = json.dumps(echo).encode()
        conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/json"),
                                      ("content-length", str(len(body))), ("x-upstream", "h2")])  # fmt: skip
        await self._send_body(conn, writer, window, stream_id, body)
