"""The build context: the directory COPY and ADD read, filtered by `.dockerignore`.

Sources are resolved without ever leaving the context: a path with `..` that
climbs out, or a symlink (anywhere on the way) that points out, is refused.
The whole filtered context may hold at most MAX_CONTEXT_BYTES (1 GiB, as
`$MATCHLOCK_BUILD_CONTEXT_MAX_MB` overrides), checked before any step runs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import UsageError
from .ignore import IgnoreRules

MAX_CONTEXT_BYTES = 1 << 30
MAX_ENV = "MATCHLOCK_BUILD_CONTEXT_MAX_MB"


@dataclass(frozen=True)
class Source:
    """One context path a COPY reads: `relative` inside the context, with its lstat."""

    relative: str
    path: Path
    st: os.stat_result


def context_limit() -> int:
    text = os.environ.get(MAX_ENV, "").strip()
    if not text:
        return MAX_CONTEXT_BYTES
    if not text.isdigit() or int(text) <= 0:
        raise UsageError(f"{MAX_ENV}={text!r} is not a positive number of MB; fix: unset it")
    return int(text) << 20


class BuildContext:
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise UsageError(f'build context "{root}" is not a directory')
        self.root = root.resolve()
        self.rules = IgnoreRules.load(self.root)
        self.files: dict[str, os.stat_result] = {}  # every included path (dirs too), by relative path
        self.excluded: list[str] = []  # the paths .dockerignore left out (a RUN bind mount must not show them)
        self._walk()

    def _walk(self) -> None:
        limit, total = context_limit(), 0
        pending = [""]
        while pending:
            relative = pending.pop()
            directory = self.root / relative if relative else self.root
            try:
                names = sorted(os.listdir(directory))
            except OSError as exc:
                raise UsageError(f"cannot read context directory {directory}: {exc.strerror}") from None
            for name in names:
                rel = f"{relative}/{name}" if relative else name
                st = os.lstat(directory / name)
                ignored = self.rules.ignored(rel)
                if stat.S_ISDIR(st.st_mode):
                    if not ignored or self.rules.may_contain_included(rel):
                        pending.append(rel)
                if ignored:
                    self.excluded.append(rel)
                    continue
                self.files[rel] = st
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
                    if total > limit:
                        raise UsageError(
                            f"build context {self.root} holds more than {limit >> 20} MB (after .dockerignore); "
                            f"fix: exclude large files in .dockerignore, or raise {MAX_ENV}"
                        )

    def _inside(self, relative: str, shown: str, what: str = "COPY source") -> str:
        """Follow symlinks in the components of `relative`, refusing any that leave the context."""
        out: list[str] = []
        pending = [p for p in relative.split("/") if p and p != "."]
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if not out:
                    raise UsageError(f"{what} {shown!r} is outside the build context")
                out.pop()
                continue
            candidate = "/".join(out + [part])
            st = self.files.get(candidate)
            if st is not None and stat.S_ISLNK(st.st_mode):
                hops += 1
                target = os.readlink(self.root / candidate)
                if target.startswith("/") or hops > 40:
                    raise UsageError(
                        f"{what} {shown!r} goes through symlink {candidate} -> {target}, which leaves the build context"
                    )
                pending = [p for p in target.split("/") if p and p != "."] + pending
                continue
            out.append(part)
        return "/".join(out)

    def resolve(self, pattern: str) -> list[Source]:
        """Context paths a COPY source names (wildcards allowed); an error names a missing one."""
        cleaned = posixpath.normpath(pattern.lstrip("/")) if pattern.strip("/") else "."
        if cleaned == ".." or cleaned.startswith("../"):
            raise UsageError(f"COPY source {pattern!r} is outside the build context")
        if cleaned == ".":
            return [Source("", self.root, os.lstat(self.root))]
        if any(c in cleaned for c in "*?["):
            depth = cleaned.count("/")  # fnmatch's `*` would cross `/`; Go's filepath.Match does not
            matches = sorted(r for r in self.files if r.count("/") == depth and fnmatch.fnmatchcase(r, cleaned))
            if not matches:
                raise UsageError(f"COPY source {pattern!r} matches no file in the build context")
            return [Source(rel, self.root / rel, self.files[rel]) for rel in matches]
        real = self._inside(cleaned, pattern)
        if real not in self.files:
            why = " (excluded by .dockerignore)" if (self.root / real).exists() else ""
            raise UsageError(f"COPY source {pattern!r} not found in the build context {self.root}{why}")
        return [Source(real, self.root / real, self.files[real])]

    def locate(self, relative: str, what: str) -> Source:
        """One context path, no wildcards ("" is the root): a RUN bind mount's source."""
        real = self._inside(relative, relative or ".", what)
        if not real:
            return Source("", self.root, os.lstat(self.root))
        if real not in self.files:
            why = " (excluded by .dockerignore)" if (self.root / real).exists() else ""
            raise UsageError(f"{what} {relative!r} not found in the build context {self.root}{why}")
        return Source(real, self.root / real, self.files[real])

    def filtered_below(self, source: Source) -> bool:
        """Whether .dockerignore left out anything at or below `source`."""
        prefix = source.relative + "/" if source.relative else ""
        return any(rel == source.relative or rel.startswith(prefix) for rel in self.excluded)

    def walk(self, source: Source) -> list[Source]:
        """A source and, for a directory, every included path under it, sorted."""
        if not stat.S_ISDIR(source.st.st_mode):
            return [source]
        prefix = source.relative + "/" if source.relative else ""
        below = sorted(rel for rel in self.files if rel.startswith(prefix))
        return [source] + [Source(rel, self.root / rel, self.files[rel]) for rel in below]

    def digest(self, sources: list[Source]) -> str:
        """Content digest of what a COPY reads: names, types, modes and file bytes (not mtimes)."""
        h = hashlib.sha256()
        for source in sources:
            for item in self.walk(source):
                h.update(f"{item.relative}\0{item.st.st_mode:o}\0".encode())
                if stat.S_ISLNK(item.st.st_mode):
                    h.update(os.readlink(item.path).encode() + b"\0")
                elif stat.S_ISREG(item.st.st_mode):
                    with open(item.path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
                    h.update(b"\0")
        return h.hexdigest()
