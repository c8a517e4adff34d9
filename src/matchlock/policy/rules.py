"""Interception rules: rewrite, block or hand to an SDK callback the requests and responses of a sandbox.

Semantics follow matchlock's network hooks (contract 5.7). Rules are
compiled once; only effective ones (block, mutations, or a callback) are
kept. A before-rule may block the request or rewrite its headers, query and
path; an after-rule may block the response or rewrite its headers and body.
Callbacks go to the SDK through an injected `CallbackTransport` (one JSON
line each way, sdk-wire 5.1; the Unix-socket client is `net.callbacks`),
under the rule's deadline; any failure skips the rule (fail open), as in
matchlock. This module does no I/O of its own.

The engine runs secret substitution after the before-rules, so callbacks
only ever see placeholders: the after phase uses the snapshot taken at the
end of `before`, never the request as it went upstream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, quote, unquote, urlencode

from ..api.globs import path_matches
from ..api.network import BodyReplacement, InterceptionConfig, InterceptionRule, RuleAction, RulePhase
from .body_filters import BodyFilter, BufferedReplace, SetBody, SSEDataReplace
from .engine import Blocked, HttpRequest
from .hosts import any_entry_matches

DEFAULT_CALLBACK_TIMEOUT_MS = 5000
# Routing and framing belong to the proxy: rules and callbacks cannot change
# them (a dropped Content-Length would desynchronise the connection).
PROTECTED_REQUEST_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})
FRAMING_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Characters a rewritten path keeps unescaped (as Go's URL.EscapedPath does).
_PATH_SAFE = "/$&+,:;=@!'()*~"

Headers = list[tuple[str, str]]


def canonical_header_key(name: str) -> str:
    """`x-api-KEY` -> `X-Api-Key`, as Go's CanonicalHeaderKey; non-token names stay as they are."""
    name = name.strip()
    if not _TOKEN.match(name):
        return name
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _without(headers: Headers, names) -> Headers:
    lowered = {n.lower() for n in names}
    return [(k, v) for k, v in headers if k.lower() not in lowered]


def _set_header(headers: Headers, name: str, value: str) -> Headers:
    return _without(headers, (name,)) + [(name, value)]


def _grouped(headers: Headers, skip=frozenset()) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for k, v in headers:
        if k.lower() not in skip:
            grouped.setdefault(canonical_header_key(k), []).append(v)
    return grouped


def _ungrouped(mapping: dict[str, list[str]], skip=frozenset()) -> Headers:
    return [(canonical_header_key(k), v) for k, values in mapping.items() if k.lower() not in skip for v in values]


def _set_param(pairs: list[tuple[str, str]], key: str, value: str) -> list[tuple[str, str]]:
    """Replace every `key` by one `key=value` where the first was (appended if absent)."""
    out, placed = [], False
    for k, v in pairs:
        if k != key:
            out.append((k, v))
        elif not placed:
            out.append((key, value))
            placed = True
    return out if placed else out + [(key, value)]


def _encode_path(path: str) -> str:
    return quote(path if path.startswith("/") else "/" + path, safe=_PATH_SAFE)


def is_event_stream(headers: Headers) -> bool:
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    return content_type.strip().lower().startswith("text/event-stream")


@dataclass(frozen=True)
class CompiledRule:
    phase: RulePhase
    action: RuleAction
    callback_id: str
    timeout: float  # seconds
    hosts: tuple[str, ...]
    methods: frozenset[str]
    path: str
    set_headers: tuple[tuple[str, str], ...]
    delete_headers: tuple[str, ...]
    set_query: tuple[tuple[str, str], ...]
    delete_query: tuple[str, ...]
    rewrite_path: str
    set_response_headers: tuple[tuple[str, str], ...]
    delete_response_headers: tuple[str, ...]
    body_replacements: tuple[BodyReplacement, ...]

    @property
    def has_mutations(self) -> bool:
        if self.phase == "before":
            return bool(self.set_headers or self.delete_headers or self.set_query or self.delete_query
                        or self.rewrite_path)  # fmt: skip
        return bool(self.set_response_headers or self.delete_response_headers or self.body_replacements)

    def matches(self, request: HttpRequest) -> bool:
        if self.hosts and not any_entry_matches(self.hosts, request.host, request.port):
            return False
        if self.methods and request.method.upper() not in self.methods:
            return False
        return not self.path or path_matches(self.path, unquote(request.path) or "/")


def _unique(names, transform=lambda n: n) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        name = transform(name.strip())
        if name and name not in out:
            out.append(name)
    return tuple(out)


def compile_rule(rule: InterceptionRule) -> CompiledRule | None:
    """The rule as the engine runs it, or None when it would do nothing."""

    def header_map(mapping: dict[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple({canonical_header_key(k): v for k, v in mapping.items() if k.strip()}.items())

    compiled = CompiledRule(
        phase=rule.phase,  # typed and validated by InterceptionRule itself
        action=rule.action,
        callback_id=rule.callback_id.strip(),
        timeout=(rule.timeout_ms or DEFAULT_CALLBACK_TIMEOUT_MS) / 1000,
        hosts=_unique(rule.hosts),
        methods=frozenset(_unique(rule.methods, str.upper)),
        path=rule.path.strip(),
        set_headers=header_map(rule.set_headers),
        delete_headers=_unique(rule.delete_headers, canonical_header_key),
        set_query=tuple((k.strip(), v) for k, v in rule.set_query.items() if k.strip()),
        delete_query=_unique(rule.delete_query),
        rewrite_path=rule.rewrite_path.strip(),
        set_response_headers=header_map(rule.set_response_headers),
        delete_response_headers=_unique(rule.delete_response_headers, canonical_header_key),
        body_replacements=tuple(r for r in rule.body_replacements if r.find),
    )
    if compiled.action == "allow" and compiled.has_mutations:
        compiled = dataclasses.replace(compiled, action="mutate")
    if compiled.action != "block" and not compiled.has_mutations and not compiled.callback_id:
        return None
    return compiled


class CallbackReplyError(ValueError):
    """The SDK's reply does not have the documented shape: the rule is skipped."""


def _string_map(value, what: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CallbackReplyError(f"{what} must map strings to strings")
    return {k.strip(): v for k, v in value.items() if k.strip()}


def _header_lists(value, what: str) -> dict[str, list[str]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CallbackReplyError(f"{what} must be an object")
    out: dict[str, list[str]] = {}
    for key, values in value.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise CallbackReplyError(f"{what}[{key!r}] must be a list of strings")
        if key.strip():
            out[canonical_header_key(key)] = list(values)
    return out


def _replacements(value) -> list[BodyReplacement]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, dict) and isinstance(x.get("find"), str) for x in value):
        raise CallbackReplyError("body_replacements must be a list of {find, replace}")
    return [BodyReplacement(x["find"], str(x.get("replace") or "")) for x in value if x["find"]]


def _section(reply: dict, key: str) -> dict:
    section = reply.get(key)
    if section is not None and not isinstance(section, dict):
        raise CallbackReplyError(f"{key} must be an object")
    return section or {}


def _action(reply: dict, has_mutations: bool) -> RuleAction:
    """The SDK's verdict (its own JSON, so read leniently): block, mutate, or allow."""
    action = str(reply.get("action") or "").strip().lower()
    if action == "block":
        return "block"
    return "mutate" if action == "mutate" or has_mutations else "allow"


class CallbackTransport(Protocol):
    """One round trip to the SDK's hook server: send one JSON line, return the one line it answers
    (b"" when it closes without one). Raises OSError when the server cannot be reached."""

    async def round_trip(self, line: bytes) -> bytes: ...


def hook_request(rule: CompiledRule, phase: RulePhase, request: HttpRequest, status: int = 0,
                 response_headers: Headers | None = None) -> dict:  # fmt: skip
    """The callback request of sdk-wire 5.1; empty fields are left out, as Go's `omitempty` does."""
    query: dict[str, str] = {}
    for key, value in parse_qsl(request.query, keep_blank_values=True):
        query.setdefault(key, value)
    fields = {
        "host": request.host,
        "method": request.method,
        "path": unquote(request.path) or "/",
        "query": query,
        "request_headers": _grouped(request.headers, {"host"}),
        "status_code": status,
        "response_headers": _grouped(response_headers or []),
        "is_sse": is_event_stream(response_headers or []),
    }
    return {"callback_id": rule.callback_id, "phase": phase, **{k: v for k, v in fields.items() if v}}


class InterceptionRules:
    def __init__(self, config: InterceptionConfig, callbacks: CallbackTransport | None = None) -> None:
        """`callbacks` reaches the SDK; without it, callback rules are skipped (fail open)."""
        self._callbacks = callbacks
        compiled = [compile_rule(rule) for rule in config.rules]
        self.rules = tuple(rule for rule in compiled if rule is not None)
        self._before = tuple(r for r in self.rules if r.phase == "before")
        self._after = tuple(r for r in self.rules if r.phase == "after")
        self._after_callbacks = any(r.callback_id for r in self._after)

    # --- before ----------------------------------------------------------------------

    async def before(self, request: HttpRequest) -> None:
        """Apply before-rules in place; raise Blocked when one refuses the request."""
        for rule in self._before:
            if not rule.matches(request):
                continue
            if rule.action == "block":
                raise Blocked("request blocked by policy")
            self._mutate_request(request, rule)
            if rule.callback_id:
                await self._before_callback(request, rule)
        if self._after_callbacks:  # the last view free of secret values, for after-phase callbacks
            request.before_secrets = dataclasses.replace(request, headers=list(request.headers), before_secrets=None)

    @staticmethod
    def _mutate_request(request: HttpRequest, rule: CompiledRule) -> None:
        for name, value in rule.set_headers:
            if name.lower() not in PROTECTED_REQUEST_HEADERS:
                request.headers = _set_header(request.headers, name, value)
        request.headers = _without(request.headers, [n for n in rule.delete_headers
                                                     if n.lower() not in PROTECTED_REQUEST_HEADERS])  # fmt: skip
        if rule.set_query or rule.delete_query:
            pairs = parse_qsl(request.query, keep_blank_values=True)
            for key, value in rule.set_query:
                pairs = _set_param(pairs, key, value)
            pairs = [(k, v) for k, v in pairs if k not in rule.delete_query]
            request.query = urlencode(pairs)
        if rule.rewrite_path:
            request.path = _encode_path(rule.rewrite_path)

    async def _before_callback(self, request: HttpRequest, rule: CompiledRule) -> None:
        reply = await self._invoke(rule, hook_request(rule, "before", request))
        if reply is None:
            return
        try:
            mutation = _section(reply, "request")
            headers = _header_lists(mutation.get("headers"), "request.headers")
            query = _string_map(mutation.get("query"), "request.query")
            path = str(mutation.get("path") or "").strip()
        except CallbackReplyError:
            return  # fail open, as for any other callback failure
        action = _action(reply, headers is not None or query is not None or bool(path))
        if action == "block":
            raise Blocked("request blocked by policy")
        if action != "mutate":
            return
        if headers is not None:
            kept = [(k, v) for k, v in request.headers if k.lower() in PROTECTED_REQUEST_HEADERS]
            request.headers = kept + _ungrouped(headers, PROTECTED_REQUEST_HEADERS)
        if query is not None:
            request.query = urlencode(list(query.items()))
        if path:
            request.path = _encode_path(path)

    # --- after -----------------------------------------------------------------------

    async def after(self, request: HttpRequest, status: int, headers: Headers) -> tuple[Headers, BodyFilter | None]:
        """Apply after-rules: returns (headers, body filter or None); raises Blocked."""
        original_framing = [(k, v) for k, v in headers if k.lower() in FRAMING_RESPONSE_HEADERS]
        replacements: list[BodyReplacement] = []
        set_body: bytes | None = None
        for rule in self._after:
            if not rule.matches(request):
                continue
            if rule.action == "block":
                raise Blocked("response blocked by policy")
            for name, value in rule.set_response_headers:
                headers = _set_header(headers, name, value)
            headers = _without(headers, rule.delete_response_headers)
            replacements += rule.body_replacements
            if rule.callback_id:
                outcome = await self._after_callback(request, rule, status, headers)
                if outcome is not None:
                    new_headers, body, extra = outcome
                    headers = new_headers if new_headers is not None else headers
                    set_body = body if body is not None else set_body
                    replacements += extra
        # Body framing is the transport's business: keep what upstream sent;
        # the transport re-frames when it gets a filter.
        headers = _without(headers, FRAMING_RESPONSE_HEADERS) + original_framing
        if not self._may_have_body(request, status):
            return headers, None
        if set_body is not None:
            return headers, SetBody(set_body, replacements)
        if not replacements:
            return headers, None
        if is_event_stream(headers):
            return headers, SSEDataReplace(replacements)
        return headers, BufferedReplace(replacements)

    @staticmethod
    def _may_have_body(request: HttpRequest, status: int) -> bool:
        return request.method.upper() != "HEAD" and status >= 200 and status not in (204, 304)

    async def _after_callback(self, request: HttpRequest, rule: CompiledRule, status: int, headers: Headers):
        """(headers full replacement or None, new body or None, extra replacements), or None to skip."""
        visible = request.before_secrets or request
        payload = hook_request(rule, "after", visible, status, headers)
        reply = await self._invoke(rule, payload)
        if reply is None:
            return None
        try:
            mutation = _section(reply, "response")
            new_headers = _header_lists(mutation.get("headers"), "response.headers")
            extra = _replacements(mutation.get("body_replacements"))
            body = self._decode_body(mutation.get("set_body_base64"))
        except CallbackReplyError:
            return None
        action = _action(reply, new_headers is not None or bool(extra) or body is not None)
        if action == "block":
            raise Blocked("response blocked by policy")
        if action != "mutate":
            return None
        return (_ungrouped(new_headers) if new_headers is not None else None), body, extra

    @staticmethod
    def _decode_body(value) -> bytes | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise CallbackReplyError("set_body_base64 must be a string")
        try:
            return base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None  # undecodable: ignored, as matchlock does

    # --- callbacks -------------------------------------------------------------------

    async def _invoke(self, rule: CompiledRule, payload: dict) -> dict | None:
        """One round trip to the SDK; None on any failure, timeout or `error` reply (fail open)."""
        if self._callbacks is None:
            return None
        try:
            async with asyncio.timeout(rule.timeout):
                line = await self._callbacks.round_trip(json.dumps(payload).encode() + b"\n")
            reply = json.loads(line)
        except (OSError, TimeoutError, ValueError):
            return None
        if not isinstance(reply, dict) or reply.get("error"):
            return None
        return reply
