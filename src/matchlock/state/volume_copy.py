"""`volume cp` between a host path and `NAME:/path` inside a volume, with e2fsprogs' debugfs.

Why debugfs and not a loop mount: a volume's filesystem was written by a guest, which is hostile, and
mounting it would hand a crafted ext4 image to the host kernel's ext4 driver. debugfs parses it in an
unprivileged userspace process instead, needs no loop devices or mount namespace (so it also works in
containers), and leaves nothing mounted when it is killed.

What that costs, and how it is handled:
- debugfs exits 0 even when a command fails, and some failures (mkdir of an existing name) corrupt
  the image. So every command is planned to succeed (the destination is checked to be absent, and
  everything below it is new), copy-in edits a private copy (`VolumeStore.edit`), any message on
  stderr aborts, and the copy replaces the volume only when `e2fsck -fn` finds it clean.
- Copy-out runs only on an image e2fsck finds clean: rdump follows no symlinks of its own, but a
  corrupt directory with duplicate names could make it write through a symlink it just created.
- Regular files, directories and symlinks are copied with mode (suid/sgid/sticky included), owner and
  mtime (whole seconds). Hard links become separate files. Copy-in refuses other file types; rdump
  skips them on copy-out. Extended attributes are not copied.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import UsageError
from .volumes import NAME_PATTERN, VolumeError, VolumeStore, check_image, run_tool

_DEBUGFS_TIMEOUT = 3600  # large trees; the volume stays locked meanwhile
_LINE_LIMIT = 8000  # debugfs reads command files with a BUFSIZ (8192) line buffer
_BANNER = re.compile(r"debugfs \d+\.\d+")
_STAT_MODE = re.compile(r"Mode:\s+0?([0-7]+)")
_STAT_OWNER = re.compile(r"User:\s+(\d+)\s+Group:\s+(\d+)")
_STAT_TYPE = re.compile(r"Type:\s+(\w+)")
_STAT_MTIME = re.compile(r"^\s*mtime: (0x[0-9a-f]+)", re.MULTILINE)


@dataclass(frozen=True)
class VolumePath:
    volume: str
    path: str  # absolute, normalised, inside the volume


def parse_location(arg: str) -> VolumePath | None:
    """`NAME:/path` -> VolumePath; anything else is a host path (None). Write `./a:/b` for a host path."""
    name, sep, path = arg.partition(":")
    if not sep or not NAME_PATTERN.fullmatch(name) or not path.startswith("/"):
        return None
    return VolumePath(name, posixpath.normpath(path).replace("//", "/"))


def _quote(path: str | bytes | os.PathLike[str]) -> bytes:
    raw = os.fsencode(path)
    if b"\n" in raw or b"\r" in raw:
        raise UsageError(f"path {os.fsdecode(raw)!r} contains a line break, which volume cp cannot copy; rename it")
    return b'"' + raw.replace(b'"', b'""') + b'"'


@dataclass(frozen=True)
class _Inode:
    kind: str  # debugfs's "Type:" word: regular, directory, symlink, ...
    mode: int  # permission bits including suid/sgid/sticky
    uid: int
    gid: int
    mtime: int


def _parse_stat(text: str, path: str, image: Path) -> _Inode:
    kind, mode, owner, mtime = (p.search(text) for p in (_STAT_TYPE, _STAT_MODE, _STAT_OWNER, _STAT_MTIME))
    if not (kind and mode and owner and mtime):
        raise VolumeError(f"cannot read {path} in {image}: no inode details from debugfs")
    return _Inode(kind[1], int(mode[1], 8), int(owner[1]), int(owner[2]), int(mtime[1], 16))


def _stat(image: Path, path: str) -> _Inode | None:
    """The inode at `path` in the image, or None when there is none."""
    proc = run_tool(["debugfs", "-R", os.fsdecode(b"stat " + _quote(path)), str(image)], check=False)
    if "File not found" in proc.stderr:
        return None
    if _errors(proc.stderr):
        raise VolumeError(f"cannot read {path} in {image}: {_errors(proc.stderr)}")
    return _parse_stat(proc.stdout, path, image)


def _stat_many(image: Path, paths: list[str]) -> list[_Inode]:
    """The inodes at `paths`, which all exist, in one debugfs run (it echoes each command before its output)."""
    stdout = _debugfs(image, [b"stat " + _quote(path) for path in paths], write=False)
    chunks = re.split(r"^debugfs: stat .*$", stdout, flags=re.MULTILINE)[1:]
    if len(chunks) != len(paths):
        raise VolumeError(f"debugfs printed {len(chunks)} inodes for {len(paths)} paths in {image}")
    return [_parse_stat(chunk, path, image) for chunk, path in zip(chunks, paths)]


def _errors(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not _BANNER.match(line)]
    return "; ".join(lines[:3])


def _debugfs(image: Path, commands: list[bytes], *, write: bool) -> str:
    """Run the commands in one debugfs; its stdout. VolumeError on any complaint (its exit status says nothing)."""
    with tempfile.NamedTemporaryFile(prefix="matchlock-debugfs-", suffix=".cmd") as script:
        script.write(b"\n".join(commands) + b"\n")
        script.flush()
        proc = run_tool(
            ["debugfs", *(["-w"] if write else []), "-f", script.name, str(image)],
            check=False,
            timeout=_DEBUGFS_TIMEOUT,
        )
    problems = _errors(proc.stderr)
    if proc.returncode != 0 or problems:
        raise VolumeError(f"debugfs failed on {image}: {problems or f'exit status {proc.returncode}'}")
    return proc.stdout


def _metadata(dest: bytes, st: os.stat_result) -> list[bytes]:
    return [
        b"sif %s uid %d" % (dest, st.st_uid),
        b"sif %s gid %d" % (dest, st.st_gid),
        b"sif %s mtime @%d" % (dest, int(st.st_mtime)),
    ]


def _plan_copy_in(source: Path, dest: str) -> list[bytes]:
    """debugfs commands that recreate the host tree at `source` as `dest` (which does not exist yet)."""
    commands: list[bytes] = []
    directories: list[bytes] = []  # their metadata last and deepest first: adding children changes mtime

    def visit(host: Path, guest: str) -> None:
        st = host.lstat()
        q = _quote(guest)
        if stat.S_ISREG(st.st_mode):
            commands.append(b"write %s %s" % (_quote(host), q))
            commands.append(b"sif %s mode 0%o" % (q, stat.S_IFREG | stat.S_IMODE(st.st_mode)))
            commands.extend(_metadata(q, st))
        elif stat.S_ISLNK(st.st_mode):
            commands.append(b"symlink %s %s" % (q, _quote(os.readlink(host))))
            commands.extend(_metadata(q, st))
        elif stat.S_ISDIR(st.st_mode):
            commands.append(b"mkdir %s" % q)
            for child in sorted(os.listdir(host)):
                visit(host / child, posixpath.join(guest, child))
            directories.append(b"sif %s mode 0%o" % (q, stat.S_IFDIR | stat.S_IMODE(st.st_mode)))
            directories.extend(_metadata(q, st))
        else:
            raise UsageError(f"{host} is not a regular file, directory or symlink; volume cp cannot copy it")

    visit(source, dest)
    commands += directories
    for line in commands:
        if len(line) > _LINE_LIMIT:
            raise UsageError(f"path too long for volume cp: {line[:80].decode(errors='replace')}...")
    return commands


def copy_in(store: VolumeStore, source: Path, target: VolumePath) -> None:
    """Copy the host file or tree `source` to `target`, which must not exist; its parent must."""
    if not os.path.lexists(source):
        raise UsageError(f"{source} does not exist")
    commands = _plan_copy_in(source.absolute(), target.path)
    with store.edit(target.volume, f"volume cp (pid {os.getpid()})") as image:
        _check_new(image, target)
        _debugfs(image, commands, write=True)
        check_image(image)


def _check_new(image: Path, target: VolumePath) -> None:
    where = f"{target.volume}:{target.path}"
    if _stat(image, target.path) is not None:
        raise VolumeError(f"destination {where} already exists; fix: remove it first or pick a new path")
    parent = _stat(image, posixpath.dirname(target.path))
    if parent is None or parent.kind != "directory":
        raise VolumeError(f"{target.volume}:{posixpath.dirname(target.path)} is not a directory in the volume")


def copy_out(store: VolumeStore, source: VolumePath, dest: Path) -> None:
    """Copy `source` (a file, symlink or tree in the volume) to the host path `dest`, which must not exist."""
    if os.path.lexists(dest):
        raise VolumeError(f"destination {dest} already exists; fix: remove it first or pick a new path")
    dest = dest.absolute()
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} is not a directory")
    with store.hold(source.volume, f"volume cp (pid {os.getpid()})") as image:
        check_image(image)
        inode = _stat(image, source.path)
        if inode is None:
            raise VolumeError(f"{source.volume}:{source.path} does not exist")
        # A private (0700) directory beside dest: nobody can meddle mid-dump, and the rename is atomic.
        staging = Path(tempfile.mkdtemp(prefix=".matchlock-cp-", dir=dest.parent))
        try:
            _debugfs(image, [b"rdump %s %s" % (_quote(source.path), _quote(str(staging)))], write=False)
            # rdump puts the root's entries straight into staging
            produced = staging if source.path == "/" else staging / posixpath.basename(source.path)
            if not os.path.lexists(produced):
                raise VolumeError(f"{source.volume}:{source.path} is a {inode.kind}, which volume cp cannot copy")
            _restore_metadata(image, produced, source.path)
            if os.path.lexists(dest):
                raise VolumeError(f"destination {dest} appeared during the copy; nothing was replaced")
            os.rename(produced, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def _restore_metadata(image: Path, produced: Path, guest_root: str) -> None:
    """Set mode, owner and mtime of every dumped entry from its inode.

    rdump drops the sticky bit and leaves symlinks owned by root with the current time.
    """
    entries: list[tuple[Path, str]] = []  # children before their directory: setting a child's mtime changes nothing
    # Never walk through a symlink: the volume's links point wherever its writer wanted, host paths included.
    tree = os.walk(produced, topdown=False) if _is_dir(str(produced.parent), produced.name) else ()
    for top, dirs, files in tree:
        rel = os.path.relpath(top, produced)
        guest_dir = guest_root if rel == "." else posixpath.join(guest_root, rel)
        entries += [
            (Path(top, name), posixpath.join(guest_dir, name)) for name in files + dirs if not _is_dir(top, name)
        ]
        entries.append((Path(top), guest_dir))
    if not entries:  # a file or symlink
        entries.append((produced, guest_root))
    for (host, _), inode in zip(entries, _stat_many(image, [guest for _, guest in entries])):
        os.chown(host, inode.uid, inode.gid, follow_symlinks=False)
        if inode.kind != "symlink":  # Linux has no symlink modes
            os.chmod(host, inode.mode)
        os.utime(host, (inode.mtime, inode.mtime), follow_symlinks=False)


def _is_dir(top: str, name: str) -> bool:
    """A real directory (os.walk visits it as its own `top`), not a symlink to one."""
    path = os.path.join(top, name)
    return os.path.isdir(path) and not os.path.islink(path)
