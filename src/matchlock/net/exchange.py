"""The HTTP policy exchange, shared by the HTTP/1.1 and HTTP/2 sessions, with no sockets.

A session hands over what its protocol library parsed and gets back
decisions; it keeps only the moving of bytes:
- `request_from_h1` / `request_from_h2` build the `HttpRequest` the policy sees;
- `admit` checks it against the connection (405 for CONNECT, 421 for a name
  the connection was not opened for) and the policy (403), rewriting it in
  place for upstream, and returns None or a `Refusal`;
- `admit_response` runs the after-rules, returning the response plan or a `Refusal`;
- `refusal_for` turns a failed dial into its `Refusal` (403 or 502);
- `request_event` / `connection_event` build the `NetworkEvent` to record.

A `Refusal` carries everything the guest is told (status, text body and its
headers) and what the event says, so both protocols refuse alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import h11

from ..api.events import NetworkEvent
from ..policy.body_filters import BodyFilter
from ..policy.engine import Blocked, HttpRequest, NetworkPolicy
from ..policy.hosts import normalise_host
from .upstream import UpstreamError

HOP_BY_HOP = {b"proxy-connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization"}
TextHeaders = list[tuple[str, str]]


def split_target(target: str) -> tuple[str, str]:
    """(path, raw query) of a request target; the absolute form keeps only its path."""
    if target.startswith(("http://", "https://")):
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    path, _, query = target.partition("?")
    return path or "/", query


def h1_text_headers(headers: Iterable[tuple[bytes, bytes]]) -> TextHeaders:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k.lower() not in HOP_BY_HOP]


def h2_text_headers(headers: Iterable[tuple[bytes, bytes]]) -> TextHeaders:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if not k.startswith(b":")]


def request_from_h1(event: h11.Request, *, scheme: str, default_host: str, port: int) -> HttpRequest:
    path, query = split_target(event.target.decode("latin-1"))
    headers = h1_text_headers(event.headers)
    host_header = next((v for k, v in headers if k.lower() == "host"), "")
    return HttpRequest(method=event.method.decode("latin-1"), scheme=scheme,
                       host=normalise_host(host_header) or default_host, port=port, path=path, query=query,
                       headers=headers)  # fmt: skip


def request_from_h2(headers: list[tuple[bytes, bytes]], *, server_name: str, port: int) -> tuple[HttpRequest, bytes]:
    """The request and the authority to send upstream (`:authority`, else Host)."""
    pseudo = {k: v for k, v in headers if k.startswith(b":")}
    authority = pseudo.get(b":authority") or next((v for k, v in headers if k == b"host"), b"")
    path, query = split_target(pseudo.get(b":path", b"").decode("latin-1"))
    request = HttpRequest(method=pseudo.get(b":method", b"").decode("latin-1"), scheme="https",
                          host=normalise_host(authority.decode("latin-1")) or server_name, port=port,
                          path=path, query=query, headers=h2_text_headers(headers))  # fmt: skip
    return request, authority


@dataclass(frozen=True)
class Refusal:
    """An answer of the proxy's own instead of upstream's."""

    status: int
    reason: str  # for the event
    message: str  # what the guest reads
    blocked: bool  # refused by policy, rather than upstream unreachable

    @classmethod
    def by_policy(cls, exc: Blocked) -> Refusal:
        return cls(exc.status, exc.reason, f"Blocked by policy: {exc.reason}", True)

    @classmethod
    def upstream_failed(cls, reason: str, detail: str = "") -> Refusal:
        return cls(502, reason, f"Failed to connect: {detail or reason}", False)

    @property
    def body(self) -> bytes:
        return f"{self.message}\n".encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(self.body)).encode())]


def refusal_for(exc: Blocked | UpstreamError) -> Refusal:
    return Refusal.by_policy(exc) if isinstance(exc, Blocked) else Refusal.upstream_failed(str(exc))


def misrouted(request: HttpRequest, connection_host: str | None, *, has_path: bool = True) -> Refusal | None:
    """CONNECT has no place in a transparent proxy; a TLS connection serves the one name it was opened for."""
    if request.method == "CONNECT" or not has_path:
        return Refusal.by_policy(Blocked("CONNECT is not supported through the proxy", 405))
    if connection_host is not None and request.host != connection_host:
        return Refusal.by_policy(Blocked(f"request for {request.host} on a TLS connection to {connection_host}", 421))
    return None


async def admit(
    policy: NetworkPolicy, request: HttpRequest, *, connection_host: str | None = None, has_path: bool = True
) -> Refusal | None:
    """None when the request may go upstream (rewritten in place by rules and secrets), else the refusal.

    Async only because an interception rule may ask an SDK callback."""
    refusal = misrouted(request, connection_host, has_path=has_path)
    if refusal is not None:
        return refusal
    try:
        await policy.prepare_request(request)
    except Blocked as exc:
        return Refusal.by_policy(exc)
    return None


@dataclass(frozen=True)
class ResponsePlan:
    headers: TextHeaders
    body_filter: BodyFilter | None  # None streams the body as it comes


async def admit_response(
    policy: NetworkPolicy, request: HttpRequest, status: int, headers: TextHeaders
) -> ResponsePlan | Refusal:
    try:
        new_headers, body_filter = await policy.prepare_response(request, status, headers)
    except Blocked as exc:
        return Refusal.by_policy(exc)
    return ResponsePlan(new_headers, body_filter)


def connection_event(url: str, host: str, *, started: float, status: int = 0, sent: int = 0, received: int = 0,
                     blocked: bool = False, reason: str = "", method: str = "",
                     now: float | None = None) -> NetworkEvent:  # fmt: skip
    """The event of one request or connection; the policy redacts it when recording."""
    ended = time.monotonic() if now is None else now
    return NetworkEvent(method=method, url=url, host=host, status_code=status, request_bytes=sent,
                        response_bytes=received, duration_ms=max(0, int((ended - started) * 1000)), blocked=blocked,
                        block_reason=reason)  # fmt: skip


def request_event(request: HttpRequest, status: int = 0, *, started: float, sent: int = 0, received: int = 0,
                  refusal: Refusal | None = None, now: float | None = None) -> NetworkEvent:  # fmt: skip
    if refusal is not None:
        return connection_event(request.url, request.host, method=request.method, started=started,
                                status=refusal.status, sent=sent, blocked=refusal.blocked, reason=refusal.reason,
                                now=now)  # fmt: skip
    return connection_event(request.url, request.host, method=request.method, started=started, status=status,
                            sent=sent, received=received, now=now)  # fmt: skip
