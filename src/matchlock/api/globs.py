"""Go's `path.Match` glob syntax, shared by network and VFS interception rules.

Upstream matches rule paths with Go's `path.Match`/`filepath.Match`, so we do too: `*` and `?` never
cross a `/`, a class is `[...]` or `[^...]` with ranges and backslash escapes, and a malformed
pattern matches nothing (Go returns ErrBadPattern).
"""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=256)
def path_regex(pattern: str) -> re.Pattern | None:
    """Go's path.Match syntax as a regex: `*` and `?` never cross `/`; None if malformed."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i + 1 == len(pattern):
                return None
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end, cls = _char_class(pattern, i + 1)
            if end < 0:
                return None
            out.append(cls)
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _char_class(pattern: str, i: int) -> tuple[int, str]:
    """Parse `[^a-z\\]]` starting after `[`; returns (index of `]`, regex) or (-1, '')."""
    negate = i < len(pattern) and pattern[i] == "^"
    i += negate
    parts: list[str] = []
    while i < len(pattern) and (pattern[i] != "]" or not parts):
        lo, i = _class_char(pattern, i)
        if lo is None:
            return -1, ""
        if i < len(pattern) and pattern[i] == "-":
            hi, i = _class_char(pattern, i + 1)
            if hi is None or hi < lo:
                return -1, ""
            parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
        else:
            parts.append(re.escape(lo))
    if i >= len(pattern) or not parts:
        return -1, ""
    return i, ("[^/" if negate else "[") + "".join(parts) + "]"


def _class_char(pattern: str, i: int) -> tuple[str | None, int]:
    if i >= len(pattern) or pattern[i] in "-]":
        return None, i
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            return None, i
    return pattern[i], i + 1


def path_matches(pattern: str, path: str) -> bool:
    regex = path_regex(pattern)
    return regex is not None and regex.fullmatch(path) is not None
