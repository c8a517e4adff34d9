"""Resolve `uid`, `uid:gid` or names against the image's /etc/passwd and /etc/group.

The files are parsed directly instead of through the pwd/grp modules, which
go through NSS and could load shared libraries from the (untrusted) image.
"""

from __future__ import annotations

import os

from ..wire._records import Record

MAX_ID = (1 << 32) - 2
# Rows parsed before a rooted template's snapshot (`preload`), by path: (file identity, rows). Every
# exec child inherits them and skips the read and parse (~20 ms of a first exec under emulation)
# while the file is unchanged; any write gives it a new mtime and ctime, and so a new identity.
_preloaded: dict[str, tuple[tuple[int, ...], list[list[str]]]] = {}


class ResolvedUser(Record):
    """A user name resolved against the image's /etc/passwd and /etc/group."""

    __slots__ = ("uid", "gid", "groups", "home")
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str | None


def _read_db(path: str, min_fields: int, *, keep: bool = False) -> list[list[str]]:
    """The rows of `path` with at least `min_fields` fields; `keep`: remember them for `_preloaded`."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            st = os.fstat(f.fileno())
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = _preloaded.get(path)
            if known is not None and known[0] == identity:
                return known[1]
            lines = f.read(4 << 20).splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        if line and not line.startswith("#"):
            fields = line.split(":")
            if len(fields) >= min_fields:
                rows.append(fields)
    if keep:
        _preloaded[path] = (identity, rows)
    return rows


def preload(root: str = "/") -> None:
    """Parse the image's /etc/passwd and /etc/group now (rooted template, before its snapshot)."""
    _read_db(root.rstrip("/") + "/etc/passwd", 7, keep=True)
    _read_db(root.rstrip("/") + "/etc/group", 3, keep=True)


def _parse_id(text: str) -> int | None:
    if text.isascii() and text.isdigit():  # isdigit() alone accepts superscripts and Arabic digits
        value = int(text)
        if value <= MAX_ID:
            return value
    return None


def resolve_user(spec: str, root: str = "/") -> ResolvedUser:
    """Resolve a user spec; raises LookupError naming the part that was not found."""
    passwd = _read_db(root.rstrip("/") + "/etc/passwd", 7)
    group = _read_db(root.rstrip("/") + "/etc/group", 3)
    user_part, _, group_part = (spec or "root").partition(":")

    uid = _parse_id(user_part)
    entry = None
    for row in passwd:
        if (uid is None and row[0] == user_part) or (uid is not None and _parse_id(row[2]) == uid):
            entry = row
            break
    if entry is None and uid is None:
        raise LookupError(f"user {user_part!r} not found in /etc/passwd")
    if entry is not None:
        uid = _parse_id(entry[2])
        if uid is None:
            raise LookupError(f"user {user_part!r} has an invalid uid in /etc/passwd")
        gid = _parse_id(entry[3])
        home = entry[5] or "/"
        name = entry[0]
    else:
        gid, home, name = uid, None, None

    if group_part:
        gid = _parse_id(group_part)
        if gid is None:
            gid = next((_parse_id(row[2]) for row in group if row[0] == group_part), None)
            if gid is None:
                raise LookupError(f"group {group_part!r} not found in /etc/group")
    if gid is None:
        raise LookupError(f"user {user_part!r} has an invalid gid in /etc/passwd")

    groups = [gid]
    if name is not None and not group_part:
        for row in group:
            members = row[3].split(",") if len(row) > 3 else []
            group_id = _parse_id(row[2])
            if name in members and group_id is not None and group_id not in groups:
                groups.append(group_id)
    return ResolvedUser(uid, gid, tuple(groups), home)
