"""RUN --mount: BuildKit's cache, bind and tmpfs mounts, parsed, checked and served to the step's sandbox.

A spec is BuildKit's CSV (`type=cache,target=/root/.cache,id=pip`; keys are
case-insensitive, values may be quoted). Every key is checked against what its
type takes; anything else (type=ssh, an unknown key) is refused naming
`file:line`. A relative target is under WORKDIR, as BuildKit has it.

Each mount becomes a VFS mount of the step's sandbox (sandbox/vfs.py), so the
guest's FUSE daemon serves it and the step's layer never holds it (diff.py
leaves everything at and below a target out):

- cache: a host directory under `<cache>/build/mounts/`, named by a digest of
  its id (default: the target), kept across builds; host_fs, read-write unless
  `readonly`. It is flocked on the host for the step: `shared` (the default)
  takes a shared lock, `locked` an exclusive one (waiting for the others),
  `private` the first instance (`<name>`, `<name>-1`, ...) nobody else holds.
  `mode`, `uid` and `gid` apply when the directory is made, as in BuildKit.
- bind: a path of the build context (default: its root), or with `from=` of an
  earlier stage or an image. Read-only unless `rw`; `rw` writes are private to
  the step and then dropped (an overlay over the context; a private copy of a
  stage's files). A context whose `.dockerignore` leaves something out below
  the source is shown as a tree of hard links (copies across filesystems) of
  the included files only.
- secret: one read-only file (default `/run/secrets/<id>`; `mode` 0400, `uid`
  and `gid` 0 unless given) holding the value of `matchlock build --secret
  id=<id>` (build/secrets.py). It is a memory mount seeded in-process
  (api/vfs.py MemoryFile): the value never lands in a host file, a layer or
  the cache key (which holds only the id and whether it was given, so a new
  value does not re-run a cached step, as in BuildKit). A `required` secret
  not given fails the step before its VM boots; any other is then left out.
- tmpfs: an empty memory mount. `size` is checked and must fit the memory
  mount's own bound (512 MiB, `Limits.memory_bytes` in vfs/types.py).
"""

from __future__ import annotations

import asyncio
import csv
import errno
import fcntl
import hashlib
import os
import posixpath
import re
import shutil
import stat
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import UsageError
from ..api.vfs import MAX_ID, MemoryFile, MountConfig, check_guest_path
from .context import BuildContext, Source
from .secrets import BuildSecret
from .tree import Tree, split

TYPES = ("bind", "cache", "tmpfs", "secret")
SHARING = ("shared", "private", "locked")
ALIASES = {"dst": "target", "destination": "target", "src": "source", "ro": "readonly", "readwrite": "rw"}
KEYS = {
    "bind": ("type", "target", "source", "from", "readonly", "rw"),
    "cache": ("type", "target", "id", "sharing", "mode", "uid", "gid", "readonly"),
    "tmpfs": ("type", "target", "size"),
    "secret": ("type", "id", "target", "required", "mode", "uid", "gid"),
}
BOOLEAN = frozenset({"readonly", "rw", "required"})
SECRETS_DIR = "/run/secrets"  # a secret's default target is SECRETS_DIR/<id>
_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})  # Go's strconv.ParseBool, as BuildKit reads them
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?", re.IGNORECASE)
MAX_PRIVATE = 64  # instances of one private cache
MAX_TMPFS = 512 << 20  # a memory mount's bound (vfs/types.py Limits.memory_bytes; build may not import vfs)


@dataclass(frozen=True)
class MountSpec:
    type: str
    target: str  # absolute and normalized (not yet through the stage's symlinks)
    readonly: bool = False
    id: str = ""  # cache: defaults to the target
    sharing: str = "shared"
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    source: str = ""  # bind: normalized, relative to the context or the from= root ("" is the root)
    source_from: str = ""  # bind: an earlier stage or an image; "" is the build context
    size: int = 0  # tmpfs, bytes; 0 when not given
    required: bool = False  # secret: a build without it fails

    def key(self) -> list:
        """What of the spec goes into the step's cache key (never a cache's content, nor a secret's value)."""
        return [self.type, self.target, self.readonly, self.id, self.sharing, self.mode, self.uid, self.gid,
                self.source, self.source_from, self.size]  # fmt: skip


def _fields(text: str, shown: str) -> list[str]:
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise UsageError(f"{shown}: not a valid comma-separated list ({exc})") from None
    return [f for f in (rows[0] if rows else []) if f.strip()]


def _bool(key: str, value: str | None, shown: str) -> bool:
    if value is None or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{shown}: {key}={value!r} is not a boolean; use {key}, {key}=true or {key}=false")


def _number(key: str, value: str, shown: str, base: int, top: int) -> int:
    try:
        number = int(value, base)
    except ValueError:
        number = -1
    if not 0 <= number <= top:
        kind = "an octal mode such as 0755" if base == 8 else f"a whole number from 0 to {top}"
        raise UsageError(f"{shown}: {key}={value!r} is not {kind}")
    return number


def _size(value: str, shown: str) -> int:
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise UsageError(f"{shown}: size={value!r} is not a size; use bytes or e.g. 64m, 1g")
    scale = 1024 ** " kmgtp".index((match.group(2) or " ").lower())
    size = int(float(match.group(1)) * scale)
    if not 0 < size <= MAX_TMPFS:
        raise UsageError(
            f"{shown}: size={value!r} must be above 0 and at most {MAX_TMPFS >> 20}m (a memory mount's bound)"
        )
    return size


def from_value(text: str) -> str:
    """The `from=` of a spec, unchecked (the builder's stage graph needs it before any step runs)."""
    try:
        fields = next(csv.reader([text]), [])
    except csv.Error:
        return ""
    for field in fields:
        key, sep, value = field.partition("=")
        if sep and key.strip().lower() == "from":
            return value
    return ""


def parse(text: str, workdir: str, where: str) -> MountSpec:
    """One `--mount=` value (variables already expanded); every error names `where` (`file:line`)."""
    shown = f"{where}: RUN --mount={text}"
    pairs: list[tuple[str, str | None]] = []
    for field in _fields(text, shown):
        name, sep, given = field.partition("=")
        name = name.strip().lower()
        pairs.append((ALIASES.get(name, name), given if sep else None))
    kind = next((v for k, v in pairs if k == "type"), None) or "bind"  # BuildKit's default type
    if kind == "ssh":
        raise UsageError(f"{shown}: type=ssh is not supported; accepted types: {', '.join(TYPES)}")
    if kind not in TYPES:
        raise UsageError(f"{shown}: unknown type={kind!r}; accepted types: {', '.join(TYPES)}")
    allowed = KEYS[kind]
    values: dict[str, str | None] = {}
    for key, value in pairs:
        if key not in allowed:
            hint = (
                " (seeding a cache from a stage is not supported)"
                if kind == "cache" and key in ("from", "source")
                else ""
            )
            raise UsageError(
                f"{shown}: key {key!r} is not accepted for type={kind}{hint}; accepted: {', '.join(allowed)}"
            )
        if key in values:
            raise UsageError(f"{shown}: key {key!r} is given twice")
        if value is None and key not in BOOLEAN:
            raise UsageError(f"{shown}: key {key!r} needs a value ({key}=VALUE)")
        values[key] = value
    raw_target = values.get("target")
    if kind == "secret" and not raw_target:
        if not values.get("id"):
            raise UsageError(f"{shown}: a secret mount needs id=NAME (or target=PATH, whose basename is the id)")
        raw_target = f"{SECRETS_DIR}/{values['id']}"
    if not raw_target:
        raise UsageError(f"{shown}: target is required (target=PATH, absolute or relative to WORKDIR {workdir})")
    target = posixpath.normpath(posixpath.join(workdir or "/", raw_target))
    check_target(target, shown)
    options: dict = {"type": kind, "target": target}
    if kind == "bind":
        rw = _bool("rw", values["rw"], shown) if "rw" in values else False
        readonly = _bool("readonly", values["readonly"], shown) if "readonly" in values else not rw
        if rw and readonly:
            raise UsageError(f"{shown}: rw and readonly contradict each other; give one")
        source = str(values.get("source") or "")
        cleaned = posixpath.normpath(source.lstrip("/") or ".")
        if cleaned == ".." or cleaned.startswith("../"):
            where_from = "the build context" if not values.get("from") else f"the root of {values['from']}"
            raise UsageError(f"{shown}: source={source!r} leads out of {where_from}; fix: name a path inside it")
        options.update(readonly=readonly, source="" if cleaned == "." else cleaned)
        options["source_from"] = str(values.get("from") or "")
    elif kind == "cache":
        options["readonly"] = _bool("readonly", values["readonly"], shown) if "readonly" in values else False
        options["id"] = str(values.get("id") or target)
        sharing = str(values.get("sharing") or "shared")
        if sharing not in SHARING:
            raise UsageError(f"{shown}: sharing={sharing!r} is not one of {', '.join(SHARING)}")
        options["sharing"] = sharing
        options.update(_ownership(values, shown))
    elif kind == "secret":
        options["id"] = str(values.get("id") or posixpath.basename(target))
        options["readonly"] = True
        options["required"] = _bool("required", values["required"], shown) if "required" in values else False
        options.update({"mode": 0o400, **_ownership(values, shown)})
    else:
        options["size"] = _size(str(values["size"]), shown) if "size" in values else 0
    return MountSpec(**options)


def _ownership(values: dict[str, str | None], shown: str) -> dict[str, int]:
    """The `mode`, `uid` and `gid` a cache or secret mount was given (the spec's defaults otherwise)."""
    owned: dict[str, int] = {k: _number(k, str(values[k]), shown, 10, MAX_ID) for k in ("uid", "gid") if k in values}
    if "mode" in values:
        owned["mode"] = _number("mode", str(values["mode"]), shown, 8, 0o7777)
    return owned


def check_target(target: str, shown: str) -> None:
    """A mount point the guest can take: not `/`, not the guest's own paths, plain characters."""
    try:
        check_guest_path(target, "mount target")
    except UsageError as exc:
        raise UsageError(f"{shown}: {exc}") from None


def parse_all(texts: tuple[str, ...] | list[str], workdir: str, where: str) -> list[MountSpec]:
    specs = [parse(text, workdir, where) for text in texts]
    seen: set[str] = set()
    for spec in specs:
        if spec.target in seen:
            raise UsageError(f"{where}: RUN has two --mount with target {spec.target}; fix: give each its own target")
        seen.add(spec.target)
    return specs


# -- serving --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """A spec as the step serves it: the guest path through the stage's symlinks, and a bind's source."""

    spec: MountSpec
    guest: str
    tree: Tree | None = None  # bind from= a stage or an image
    tree_parts: tuple[str, ...] = ()
    context: Source | None = None  # bind from the build context
    digest: str = ""  # what the bind reads (a cache key part); a secret's: only whether it was given
    secret: BuildSecret | None = None  # type=secret: the value, when the build was given it


def cache_name(cache_id: str) -> str:
    return hashlib.sha256(cache_id.encode()).hexdigest()[:32]


async def serve(
    planned: Planned, build_context: BuildContext, cache_root: Path, scratch: Path, stack: ExitStack,
    say: Callable[[str], None],
) -> MountConfig:  # fmt: skip
    """The VFS mount for one planned mount; a cache's lock stays held until `stack` closes."""
    spec = planned.spec
    if spec.type == "tmpfs":
        return MountConfig(type="memory")
    if spec.type == "secret":  # one read-only file, in the sandbox's memory only: never a host file
        assert planned.secret is not None
        seed = MemoryFile(planned.secret.data, spec.mode, spec.uid, spec.gid)
        return MountConfig(type="memory", readonly=True, file=seed)
    if spec.type == "cache":
        directory = await _cache_directory(spec, cache_root, stack, say)
        return MountConfig(type="host_fs", host_path=str(directory), readonly=spec.readonly)
    if planned.tree is not None:  # a private copy: rw writes land in it and go with the step's scratch
        host = _extract(planned.tree, planned.tree_parts, scratch)
        return MountConfig(type="host_fs", host_path=str(host), readonly=spec.readonly)
    source = planned.context
    assert source is not None
    if not spec.readonly and not stat.S_ISDIR(source.st.st_mode):
        host = scratch  # one file, writable: a private copy (an overlay needs a directory; never a hard link)
        shutil.copy2(source.path, host, follow_symlinks=False)
    elif build_context.filtered_below(source):
        host = _link_farm(build_context, source, scratch)  # read-only, or the lower of an overlay
    else:
        host = source.path
    if spec.readonly or not os.path.isdir(host):
        return MountConfig(type="host_fs", host_path=str(host), readonly=spec.readonly)
    return MountConfig(type="overlay", host_path=str(host))  # the guest keeps the writes; the host copy is untouched


async def _cache_directory(spec: MountSpec, root: Path, stack: ExitStack, say: Callable[[str], None]) -> Path:
    name = cache_name(spec.id)
    root.mkdir(parents=True, exist_ok=True)
    candidates = [name] if spec.sharing != "private" else [name] + [f"{name}-{n}" for n in range(1, MAX_PRIVATE)]
    operation = {"shared": fcntl.LOCK_SH, "locked": fcntl.LOCK_EX, "private": fcntl.LOCK_EX}[spec.sharing]
    for index, candidate in enumerate(candidates):
        directory = root / candidate
        fd = _open_directory(directory, spec)
        stack.callback(os.close, fd)
        last = index == len(candidates) - 1
        if spec.sharing == "private" and not last:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return directory
            except BlockingIOError:
                continue
        await _flock(fd, operation, f"cache mount id={spec.id} ({spec.sharing})", say)
        return directory
    raise AssertionError("unreachable")


def _open_directory(directory: Path, spec: MountSpec) -> int:
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:  # BuildKit's mode, uid and gid apply to a new cache
        if os.geteuid() == 0:
            os.chown(directory, spec.uid, spec.gid)
        os.chmod(directory, spec.mode)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"cache mount directory {directory} is not a directory; fix: remove it")
    return fd


async def _flock(fd: int, operation: int, what: str, say: Callable[[str], None]) -> None:
    """Take the lock, polling so Ctrl-C (a cancelled build) never leaves a thread blocked on it."""
    waiting = False
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if not waiting:
            say(f"waiting for {what}: another build holds it")
            waiting = True
        await asyncio.sleep(0.2)


def _link_farm(build_context: BuildContext, source: Source, scratch: Path) -> Path:
    """The included files at `source`, as hard links (copies across filesystems) under `scratch`."""
    if not stat.S_ISDIR(source.st.st_mode):
        _place(source.path, scratch, source.st)
        return scratch
    scratch.mkdir(mode=0o700)
    dirs: list[tuple[Path, os.stat_result]] = [(scratch, source.st)]
    prefix = len(source.relative) + 1 if source.relative else 0
    for item in build_context.walk(source)[1:]:
        dest = scratch / item.relative[prefix:]
        if stat.S_ISDIR(item.st.st_mode):
            dest.mkdir(mode=0o700)
            dirs.append((dest, item.st))
        elif stat.S_ISLNK(item.st.st_mode):
            os.symlink(os.readlink(item.path), dest)
        elif stat.S_ISREG(item.st.st_mode):
            _place(item.path, dest, item.st)
    for path, st in reversed(dirs):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    return scratch


def _place(path: Path, dest: Path, st: os.stat_result) -> None:
    try:
        os.link(path, dest, follow_symlinks=False)
    except OSError:
        shutil.copy2(path, dest, follow_symlinks=False)


def _extract(tree: Tree, parts: tuple[str, ...], scratch: Path) -> Path:
    """The files of a stage's (or an image's) tree at `parts` as a fresh host directory (or file)."""
    member = tree.get(parts) if parts else None
    if member is not None and not member.isdir():
        _write(tree, parts, member, scratch)
        return scratch
    scratch.mkdir(mode=0o755)
    made: set[tuple[str, ...]] = {()}
    dirs: list[tuple[Path, object]] = []
    n = len(parts)
    for key, entry in sorted(tree.children(parts)):
        relative = key[n:]
        if relative[:-1] not in made:
            continue  # below something that is not a directory (a symlink, say): never written through
        dest = scratch.joinpath(*relative)
        if entry.member.isdir():
            dest.mkdir(mode=0o700)
            made.add(relative)
            dirs.append((dest, entry.member))
        else:
            _write(tree, key, entry.member, dest)
    for path, dir_member in reversed(dirs):
        _own(path, dir_member)
    if member is not None:  # the source directory itself: its owner and mode (the root's are the defaults)
        _own(scratch, member)
    return scratch


def _write(tree: Tree, parts: tuple[str, ...], member, dest: Path) -> None:
    if member.issym():
        os.symlink(member.linkname, dest)
        if os.geteuid() == 0:
            os.lchown(dest, member.uid, member.gid)
        return
    if not (member.isreg() or member.islnk()):
        return  # devices and FIFOs: a host_fs mount shows no device nodes anyway
    with tree.open(parts) as src, open(dest, "xb") as out:
        shutil.copyfileobj(src, out)
    _own(dest, member)


def _own(path: Path, member) -> None:
    if os.geteuid() == 0:
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
    os.chmod(path, member.mode & 0o7777)
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def target_parts(planned: list[Planned]) -> tuple[tuple[str, ...], ...]:
    return tuple(split(p.guest) for p in planned)
