"""`.dockerignore`: which context paths COPY and ADD may see.

Docker's rules (moby/patternmatcher): one pattern per line, `#` comments,
paths cleaned and relative to the context root, `*` and `?` stay within one
path component, `**` spans any number, `!` re-includes, the last matching
line wins, and a pattern that matches a directory matches everything in it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import UsageError


@dataclass(frozen=True)
class _Pattern:
    text: str
    regex: re.Pattern[str]
    exclusion: bool  # `!pattern`


def _compile(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):  # `**/` also matches no directory at all
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise UsageError(f".dockerignore: unterminated '[' in pattern {pattern!r}")
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + re.escape(body[1:]) if body.startswith("^") else re.escape(body)) + "]")
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


class IgnoreRules:
    def __init__(self, lines: list[str]) -> None:
        self.patterns: list[_Pattern] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
            cleaned = posixpath.normpath(line).lstrip("/")
            if cleaned in ("", "."):
                continue
            self.patterns.append(_Pattern(cleaned, _compile(cleaned), exclusion))

    @classmethod
    def load(cls, context: Path) -> IgnoreRules:
        path = context / ".dockerignore"
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls([])
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 text") from None
        return cls(text.splitlines())

    def ignored(self, relative: str) -> bool:
        """Whether the context path (`a/b/c`, no leading slash) is excluded."""
        parents = [relative]
        while "/" in parents[-1]:
            parents.append(parents[-1].rsplit("/", 1)[0])
        result = False
        for pattern in self.patterns:
            if any(pattern.regex.match(path) for path in parents):
                result = not pattern.exclusion
        return result

    def may_contain_included(self, directory: str) -> bool:
        """Whether an ignored directory must still be walked, because a `!` pattern may re-include below it."""
        return any(p.exclusion and (p.text.startswith(directory + "/") or "*" in p.text) for p in self.patterns)
