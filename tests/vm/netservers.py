"""The servers of the stand-in internet (see netfixtures.py).

Run as `python netservers.py serve --log ... --cert ... --key ...` inside the
inet namespace by `netfixtures.StandInInternet`: DNS for the *.test names,
HTTP on 80, HTTPS on 443 (test CA, ALPN h2 and http/1.1), WebSocket on /ws
over both, a raw TCP echo on 7000 and a UDP sink on 9999. Every request,
connection and datagram seen is appended to the JSON-lines log.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
import time

from netfixtures import DNS_SERVER, ECHO_PORT, HOSTS, UDP_SINK_PORT

SSE_EVENTS = (
    "event: greeting\ndata: hello foo\n\n",
    "data: foo and foo\n\n",
    ": comment foo\n\n",
    'id: foo-1\ndata: {"v": "foo"}\n\n',
)
BLOCK = bytes(range(256)) * 1024  # 256 KiB


class Servers:
    def __init__(self, log_path: str, cert: str, key: str) -> None:
        self.log = open(log_path, "a", buffering=1)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.tls.set_alpn_protocols(["h2", "http/1.1"])

    def record(self, **entry) -> None:
        entry["t"] = round(time.time(), 3)
        self.log.write(json.dumps(entry) + "\n")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.start_server(lambda r, w: self.http(r, w, False), "0.0.0.0", 80, reuse_address=True)
        await asyncio.start_server(lambda r, w: self.http(r, w, True), "0.0.0.0", 443, ssl=self.tls, reuse_address=True)
        await asyncio.start_server(self.echo, "0.0.0.0", ECHO_PORT, reuse_address=True)
        await loop.create_datagram_endpoint(lambda: _Datagrams(self, self.dns_answer), local_addr=(DNS_SERVER, 53))
        await loop.create_datagram_endpoint(lambda: _Datagrams(self, None), local_addr=("0.0.0.0", UDP_SINK_PORT))

    # --- DNS ---------------------------------------------------------------------------------

    def dns_answer(self, data: bytes, local: tuple) -> bytes | None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(data)
        except Exception:  # noqa: BLE001
            self.record(kind="udp", port=53, server_addr=local[0], data=data[:200].hex(), malformed=True)
            return None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.record(kind="dns", name=name, qtype=dns.rdatatype.to_text(question.rdtype), server_addr=local[0])
        response = dns.message.make_response(query)
        if name not in HOSTS:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, 30, "IN", "A", HOSTS[name]))
        return response.to_wire()

    # --- raw TCP echo ---------------------------------------------------------------------------

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = writer.get_extra_info("sockname")
        total = 0
        try:
            while data := await reader.read(65536):
                total += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        self.record(kind="tcp", server_addr=local[0], port=local[1], bytes=total,
                    peer=writer.get_extra_info("peername")[0])  # fmt: skip
        writer.close()

    # --- HTTP/1.1, HTTP/2, WebSocket -----------------------------------------------------------------

    async def http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        try:
            if alpn == "h2":
                await self.http2(reader, writer)
            else:
                await self.http1(reader, writer, tls)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except Exception as exc:  # noqa: BLE001 - a test server: say what broke
            self.record(kind="error", error=f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    def _request_entry(self, proto, tls, method, target, headers, writer, body=b"") -> dict:
        path, _, query = target.partition("?")
        local = writer.get_extra_info("sockname")
        host = next((v for k, v in headers if k.lower() in ("host", ":authority")), "")
        entry = dict(kind="http", proto=proto, tls=tls, method=method, path=path, query=query,
                     headers=[[k, v] for k, v in headers], host=host, server_addr=local[0], port=local[1],
                     body=body.decode(errors="replace"))  # fmt: skip
        self.record(**entry)
        return entry

    async def http1(self, reader, writer, tls: bool) -> None:
        import h11

        conn = h11.Connection(h11.SERVER)

        async def next_event():
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                conn.receive_data(await reader.read(65536))

        async def send(*events) -> None:
            for event in events:
                writer.write(conn.send(event))
            await writer.drain()

        while True:
            event = await next_event()
            if not isinstance(event, h11.Request):
                return
            headers = [(k.decode(), v.decode()) for k, v in event.headers.raw_items()]
            target = event.target.decode()
            body = b""
            while True:
                part = await next_event()
                if isinstance(part, h11.Data):
                    body += part.data
                elif isinstance(part, h11.EndOfMessage):
                    break
            entry = self._request_entry("HTTP/1.1", tls, event.method.decode(), target, headers, writer, body)
            path = entry["path"]
            params = dict(p.split("=", 1) for p in entry["query"].split("&") if "=" in p)
            upgrade = any(k.lower() == "upgrade" and v.lower() == "websocket" for k, v in headers)
            if path == "/ws" and upgrade:
                await self.websocket(reader, writer, target, headers, conn.trailing_data[0])
                return
            if path == "/close":  # unknown length: no framing headers, the end is the close
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
                for i in range(int(params.get("n", 3))):
                    writer.write(f"part-{i} foo\n".encode())
                    await writer.drain()
                    await asyncio.sleep(float(params.get("delay", 0.05)))
                return
            if path in ("/sse", "/chunked"):
                kind = "text/event-stream" if path == "/sse" else "text/plain"
                chunks = SSE_EVENTS if path == "/sse" else [f"chunk-{i} foo\n" for i in range(int(params.get("n", 5)))]
                await send(h11.Response(status_code=200, headers=[("Content-Type", kind), ("Cache-Control", "no-cache"),
                                                                  ("Transfer-Encoding", "chunked")]))  # fmt: skip
                for chunk in chunks:
                    await send(h11.Data(data=chunk.encode()))
                    await asyncio.sleep(float(params.get("delay", 0.05)))
                await send(h11.EndOfMessage())
            elif path == "/bytes":
                size = int(params.get("n", 1024))
                await send(h11.Response(status_code=200, headers=[("Content-Type", "application/octet-stream"),
                                                                  ("Content-Length", str(size))]))  # fmt: skip
                left = size
                while left:
                    piece = BLOCK[: min(left, len(BLOCK))]
                    writer.write(conn.send(h11.Data(data=piece)))
                    left -= len(piece)
                    if writer.transport.get_write_buffer_size() > 1 << 20:
                        await writer.drain()
                await send(h11.EndOfMessage())
            else:
                status, content_type, payload = self.respond(entry)
                await send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            ("Content-Type", content_type),
                            ("Content-Length", str(len(payload))),
                            ("X-Served-By", "stand-in"),
                            ("X-Upstream-Secret", "remove-me"),
                        ],
                    ),  # fmt: skip
                    h11.Data(data=payload),
                    h11.EndOfMessage(),
                )
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    @staticmethod
    def respond(entry: dict) -> tuple[int, str, bytes]:
        path = entry["path"]
        if path.startswith("/status/"):
            return int(path.rsplit("/", 1)[1]), "text/plain", b"status\n"
        if path == "/body":
            return 200, "text/plain", b"foo is foo, not bar\n"
        return 200, "application/json", json.dumps(entry).encode()

    async def websocket(self, reader, writer, target: str, headers, leftover: bytes) -> None:
        from websockets.frames import Opcode
        from websockets.server import ServerProtocol

        protocol = ServerProtocol()
        # The sans-IO protocol parses the handshake itself: give it the request h11 already read.
        head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        protocol.receive_data(head.encode())
        (request,) = protocol.events_received()
        protocol.send_response(protocol.accept(request))
        writer.write(b"".join(protocol.data_to_send()))
        await writer.drain()
        data = leftover
        while True:
            if data:
                protocol.receive_data(data)
            elif data is None:
                protocol.receive_eof()
            for frame in protocol.events_received():
                if frame.opcode is Opcode.TEXT:
                    protocol.send_text(b"echo: " + frame.data)
                elif frame.opcode is Opcode.BINARY:
                    protocol.send_binary(frame.data)
            writer.write(b"".join(protocol.data_to_send()))
            await writer.drain()
            if data is None or protocol.close_expected():
                return
            data = await reader.read(65536) or None

    async def http2(self, reader, writer) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        requests: dict[int, list] = {}
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = [list(event.headers), b""]
                elif isinstance(event, h2.events.DataReceived):
                    requests[event.stream_id][1] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    headers, body = requests.pop(event.stream_id)
                    pseudo = dict(headers)
                    entry = self._request_entry("HTTP/2", True, pseudo.get(":method", ""), pseudo.get(":path", "/"),
                                                headers, writer, body)  # fmt: skip
                    status, content_type, payload = self.respond(entry)
                    conn.send_headers(event.stream_id, [(":status", str(status)), ("content-type", content_type),
                                                        ("content-length", str(len(payload)))])  # fmt: skip
                    conn.send_data(event.stream_id, payload, end_stream=True)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    writer.write(conn.data_to_send())
                    return
            writer.write(conn.data_to_send())
            await writer.drain()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, servers: Servers, answer) -> None:
        self.servers, self.answer = servers, answer

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        # Recvmsg would give the local address; the sink records the sender and payload.
        local = self.transport.get_extra_info("sockname")
        if self.answer is None:
            self.servers.record(kind="udp", port=local[1], peer=addr[0], data=data[:200].decode(errors="replace"))
            return
        reply = self.answer(data, local)
        if reply is not None:
            self.transport.sendto(reply, addr)


def _serve(argv: list[str]) -> None:
    args = dict(zip(argv[::2], argv[1::2]))
    servers = Servers(args["--log"], args["--cert"], args["--key"])
    loop = asyncio.new_event_loop()
    loop.run_until_complete(servers.start())
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    loop.run_until_complete(stop.wait())


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "serve":
    _serve(sys.argv[2:])
