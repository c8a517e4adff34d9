"""The VFS channel's HELLO exchange, the one JSON request and reply (stdlib only; `wire.vfs` calls these)."""

from __future__ import annotations

import json
import posixpath

from .frames import RemoteProtocolError
from .vfs_records import MAX_HELLO, MAX_IO, MAX_MOUNTS, ROOT_ALIAS, Hello, HelloReply, Mount


def encode_hello(args: Hello) -> bytes:
    hello = {"version": args.version, "max_io": args.max_io}
    if args.features:
        hello["features"] = args.features
    return json.dumps(hello).encode()


def decode_hello(payload: bytes) -> Hello:
    """The guest's HELLO (host side): refused with RemoteProtocolError unless well-formed and in range."""
    if len(payload) > MAX_HELLO:
        raise RemoteProtocolError(f"HELLO of {len(payload)} bytes exceeds {MAX_HELLO}")
    try:
        msg = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays or objects nested thousands deep
        raise RemoteProtocolError(f"HELLO is not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise RemoteProtocolError("HELLO must be a JSON object")
    version, max_io, features = msg.get("version"), msg.get("max_io"), msg.get("features", 0)
    if type(version) is not int or type(max_io) is not int or not 4096 <= max_io <= MAX_IO:
        raise RemoteProtocolError(f"HELLO needs integer version and max_io in 4096..{MAX_IO}, got {msg!r:.200}")
    if type(features) is not int or features < 0:
        raise RemoteProtocolError(f"HELLO features must be a non-negative integer, got {features!r:.100}")
    return Hello(version, max_io, features)


def encode_hello_reply(result: HelloReply) -> bytes:
    mounts = [
        {"path": m.path, "root": m.root, "readonly": m.readonly, "negative_valid_ns": m.negative_valid_ns}
        # only when set, so an older guest's HELLO reply looks as before
        | ({"guest_overlay": True} if m.guest_overlay else {})
        for m in result.mounts
    ]
    hello = {"version": result.version, "max_io": result.max_io, "mounts": mounts}
    if result.stats:
        hello["stats"] = True
    if result.features:
        hello["features"] = result.features
    return json.dumps(hello).encode()


def decode_hello_reply(payload: bytes) -> HelloReply:
    """The host's HELLO reply (guest side); raises ValueError (or KeyError, TypeError) if malformed."""
    msg = json.loads(payload)
    mounts = msg["mounts"]
    if not isinstance(mounts, list) or len(mounts) > MAX_MOUNTS:
        raise ValueError(f"mounts must be a list of at most {MAX_MOUNTS}")
    parsed = []
    for m in mounts:
        path, root, readonly = m["path"], m["root"], m.get("readonly", False)
        negative = m.get("negative_valid_ns", 0)
        if not isinstance(path, str) or not path.startswith("/") or "\x00" in path or len(path) > 4096:
            raise ValueError(f"mount path {path!r} must be absolute")
        # Normalized: a '..' would put the mount somewhere other than the path it seems to name.
        if posixpath.normpath(path) != path:
            raise ValueError(f"mount path {path!r} must be normalized (no '.', '..', '//' or trailing '/')")
        # A node id (u64, never 0 or the alias); fuse_overlay also builds paths from it.
        if type(root) is not int or not ROOT_ALIAS < root < 1 << 64 or not isinstance(readonly, bool):
            raise ValueError(f"mount {path!r} has a bad root {root!r} or readonly {readonly!r}")
        if type(negative) is not int or negative < 0:
            raise ValueError(f"mount {path!r} has a bad negative_valid_ns {negative!r}")
        guest_overlay = m.get("guest_overlay", False)
        if not isinstance(guest_overlay, bool) or (guest_overlay and not readonly):
            raise ValueError(f"mount {path!r}: guest_overlay {guest_overlay!r} must be a bool, true only if readonly")
        parsed.append(Mount(path, root, readonly, negative, guest_overlay))
    version, max_io, stats = msg["version"], msg["max_io"], msg.get("stats", False)
    features = msg.get("features", 0)
    if type(version) is not int or type(max_io) is not int or not 4096 <= max_io <= MAX_IO:
        raise ValueError(f"bad version {version!r} or max_io {max_io!r}")
    if not isinstance(stats, bool) or type(features) is not int or features < 0:
        raise ValueError(f"bad stats {stats!r} or features {features!r}")
    return HelloReply(version, max_io, tuple(parsed), stats, features)
