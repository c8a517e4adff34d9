"""Named volumes: ext4 images that outlive sandboxes, in `<cache_dir>/volumes/<name>.ext4` (as upstream).

Each volume has a lock file, `volumes/.locks/<name>.lock`, that says who uses it. A sandbox that
attaches a volume read-write holds it exclusively for its lifetime (`VolumeStore.hold`), a read-only
attach holds it shared; `volume rm` and `volume cp` take it exclusively and fail at once, naming the
holder, when it is busy. Holders are named in `.locks/<name>.holders`, one line each with the PID
that holds the lock; lines of dead processes are ignored, so a holder killed with -9 is never named.

Images are published with a no-clobber hard link from a temporary sibling, so a crash mid-create or
mid-copy never leaves a half-made volume under a valid name.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..api.errors import MatchlockError, NotFoundError, SetupError, UsageError
from ..api.paths import cache_dir
from ..util.fs import file_lock, try_file_lock

DEFAULT_SIZE_MB = 10240  # upstream's default and the SDK's
# ext4 with 4 KiB blocks stops at 16 TiB on the host filesystems we sit on; past that mke2fs fails late.
MAX_SIZE_MB = 16 * 1024 * 1024 - 1
MAX_NAME_LENGTH = 128  # leaves room under NAME_MAX (255) for ".ext4", ".lock" and temp prefixes
NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
SUFFIX = ".ext4"
_MB = 1024 * 1024

# ext2/3/4 superblock: 1024 bytes in; s_magic at +56, s_feature_incompat at +96.
_SUPERBLOCK_OFFSET = 1024
_EXT_MAGIC = 0xEF53
_INCOMPAT_RECOVER = 0x4  # the journal has transactions to replay (the last user was killed)
_FSCK_TIMEOUT = 600


class VolumeError(MatchlockError):
    pass


class VolumeBusyError(VolumeError):
    pass


def volumes_dir() -> Path:
    return cache_dir() / "volumes"


def validate_name(name: str) -> str:
    """The volume name, stripped (as upstream); UsageError naming the rule otherwise."""
    name = name.strip()
    if not name:
        raise UsageError("volume name is empty; fix: give a name such as cache or pg-data")
    if len(name) > MAX_NAME_LENGTH:
        raise UsageError(f"volume name {name[:40]!r}... is {len(name)} characters; the limit is {MAX_NAME_LENGTH}")
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"invalid volume name {name!r}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Volume:
    name: str
    path: Path
    size_bytes: int  # apparent size (the filesystem's size), not the blocks the sparse file uses

    @property
    def size(self) -> str:
        """`%.1f MB`, the format upstream prints and the SDK keeps."""
        return f"{self.size_bytes / _MB:.1f} MB"

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "size": self.size, "path": str(self.path)}


def superblock_flags(path: Path) -> int:
    """The image's ext4 incompat feature flags; VolumeError when it has no ext2/3/4 superblock."""
    try:
        with open(path, "rb") as image:
            image.seek(_SUPERBLOCK_OFFSET)
            block = image.read(100)
    except IsADirectoryError:
        raise VolumeError(f"{path} is a directory, not an ext4 image") from None
    if len(block) < 100 or struct.unpack_from("<H", block, 56)[0] != _EXT_MAGIC:
        raise VolumeError(f"{path} is not an ext4 image (no ext2/3/4 superblock); fix: use an image made by mkfs.ext4")
    flags: int = struct.unpack_from("<I", block, 96)[0]
    return flags


def check_image(path: Path) -> None:
    """Refuse a non-ext4 or corrupt image with the fsck finding, before anything mounts or edits it.

    A journal left by a killed sandbox is replayed first (that is a repair fsck makes anyway and it
    loses nothing the guest synced); any other problem is reported, never repaired behind the user's back.
    """
    if superblock_flags(path) & _INCOMPAT_RECOVER:
        _e2fsck(path, "-p", "-E", "journal_only")
    proc = _e2fsck(path, "-f", "-n")
    if proc.returncode != 0:
        findings = [line for line in proc.stdout.splitlines() if line and not line.startswith(("Pass ", "e2fsck "))]
        detail = "; ".join(findings[:3]) or proc.stderr.strip() or f"e2fsck exit status {proc.returncode}"
        raise VolumeError(f"{path} is corrupt ({detail}); fix: repair it with e2fsck -f {path}, or remove it")


def _e2fsck(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tool(["e2fsck", *args, str(path)], check=False, timeout=_FSCK_TIMEOUT)


def run_tool(argv: list[str], *, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run an e2fsprogs tool; SetupError when it is not installed, VolumeError when it fails (if `check`)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout)
    except FileNotFoundError:
        raise SetupError(f"{argv[0]} is not installed; fix: apt-get install e2fsprogs") from None
    except subprocess.TimeoutExpired:
        raise VolumeError(f"{argv[0]} did not finish in {timeout:.0f} s on {argv[-1]}") from None
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise VolumeError(f"{argv[0]} failed on {argv[-1]}: {message[-1] if message else proc.returncode}")
    return proc


class VolumeStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else volumes_dir()

    def path_of(self, name: str) -> Path:
        return self.root / (validate_name(name) + SUFFIX)

    def _lock_path(self, name: str) -> Path:
        return self.root / ".locks" / (name + ".lock")

    def get(self, name: str) -> Volume:
        path = self.path_of(name)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(
                f"named volume not found: {name.strip()!r}; fix: create it with: matchlock volume create {name.strip()}"
            ) from None
        return Volume(validate_name(name), path, size)

    def resolve(self, ref: str) -> Path:
        """`@NAME` (the `--disk` spelling) or a bare NAME -> the image path; NotFoundError if it does not exist."""
        return self.get(ref.removeprefix("@")).path

    def list(self) -> list[Volume]:
        volumes = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        for entry in entries:
            name = entry.name.removesuffix(SUFFIX)
            # Temporaries and the lock directory start with '.', which no valid name does.
            if entry.name.endswith(SUFFIX) and NAME_PATTERN.fullmatch(name) and len(name) <= MAX_NAME_LENGTH:
                with contextlib.suppress(FileNotFoundError):  # removed while we listed
                    volumes.append(Volume(name, Path(entry.path), entry.stat().st_size))
        return volumes

    def create(self, name: str, size_mb: int = DEFAULT_SIZE_MB) -> Volume:
        """A sparse file of `size_mb` MiB formatted ext4; VolumeError if the name is taken."""
        name = validate_name(name)
        if size_mb <= 0:
            raise UsageError(f"size must be > 0 MB (got {size_mb}); fix: pass --size in MB, e.g. --size 1024")
        if size_mb > MAX_SIZE_MB:
            raise UsageError(f"size {size_mb} MB is over the ext4 limit of {MAX_SIZE_MB} MB")
        final = self.path_of(name)
        self._refuse_existing(final)
        with self._staged(name) as tmp:
            with open(tmp, "r+b") as image:
                image.truncate(size_mb * _MB)
            # -E lazy_*: skip zeroing inode tables and the journal (a fresh sparse file reads as zeros),
            # so a 10 GiB volume is created in a blink and stays sparse on the host.
            run_tool(["mke2fs", "-t", "ext4", "-F", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(tmp)])
            self._publish(tmp, final)
        return Volume(name, final, size_mb * _MB)

    def clone(self, source: str, dest: str) -> Volume:
        """Upstream's `volume cp SRC DEST`: a sparse byte copy keeping mode bits, owner and mtime."""
        source, dest = validate_name(source), validate_name(dest)
        if source == dest:
            raise UsageError(f"source and destination are both {source!r}; fix: name a new volume as destination")
        src = self.get(source)
        final = self.path_of(dest)
        self._refuse_existing(final)
        with self.hold(source, f"volume cp {source} {dest} (pid {os.getpid()})", readonly=True):
            with self._staged(dest) as tmp:
                os.unlink(tmp)  # cp creates it, with the source's metadata
                run_tool(["cp", "--sparse=always", "--preserve=mode,ownership,timestamps", str(src.path), str(tmp)])
                self._publish(tmp, final)
        return Volume(dest, final, src.size_bytes)

    def remove(self, name: str) -> None:
        volume = self.get(name)
        with self.hold(volume.name, f"volume rm (pid {os.getpid()})"):
            volume.path.unlink()

    @contextlib.contextmanager
    def hold(self, name: str, holder: str, *, readonly: bool = False) -> Iterator[Path]:
        """Use the volume for the duration of the block: shared when `readonly`, else exclusive.

        VolumeBusyError naming the holder(s) when a conflicting user has it. A sandbox attaching a
        volume enters this with e.g. `holder="sandbox vm-1234 (pid 99)"` and keeps it until it is closed.
        The lock is taken with O_CLOEXEC, so QEMU and other children never inherit it.
        """
        name = self.get(name.removeprefix("@")).name  # fail before creating a lock file for a missing volume
        lock = self._lock_path(name)
        with try_file_lock(lock, shared=readonly) as acquired:
            if not acquired:
                raise VolumeBusyError(
                    f"volume {name!r} is in use by {self._holders(lock)}; fix: stop that user first, then retry"
                )
            path = self.get(name).path  # after locking: a concurrent rm may have won
            token = f"{os.getpid()} {secrets.token_hex(4)}"
            self._record_holder(lock, f"{token} {' '.join(holder.split())}", exclusive=not readonly)
            try:
                yield path
            finally:
                self._forget_holder(lock, token)

    @staticmethod
    def _record_holder(lock: Path, line: str, *, exclusive: bool) -> None:
        """Add `<pid> <token> <holder>` to the volume's `.holders` file; shared holders are listed together.

        Lines of dead processes are dropped here and never shown, so a holder killed with -9 leaves
        nothing misleading behind. The `.edit` lock orders concurrent rewrites.
        """
        with file_lock(lock.with_suffix(".edit")):
            _write_holders(lock, ([] if exclusive else _live_holder_lines(lock)) + [line])

    @staticmethod
    def _forget_holder(lock: Path, token: str) -> None:
        with file_lock(lock.with_suffix(".edit")):
            _write_holders(lock, [line for line in _live_holder_lines(lock) if not line.startswith(token + " ")])

    @staticmethod
    def _holders(lock: Path) -> str:
        holders = [line.split(" ", 2)[-1] for line in _live_holder_lines(lock)]
        return ", ".join(dict.fromkeys(holders)) or "another process"

    @staticmethod
    def _refuse_existing(final: Path) -> None:
        if final.exists():
            name = final.name.removesuffix(SUFFIX)
            raise VolumeError(
                f"named volume already exists: {name!r}; fix: pick another name or remove it: matchlock volume rm {name}"
            )

    @contextlib.contextmanager
    def _staged(self, name: str) -> Iterator[Path]:
        """An empty temporary file next to the volumes, removed unless it was published."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", suffix=SUFFIX, dir=self.root)
        os.close(fd)
        try:
            yield Path(tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _publish(self, tmp: Path, final: Path) -> None:
        try:
            os.link(tmp, final)  # fails if a concurrent create won the name: never clobber
        except FileExistsError:
            self._refuse_existing(final)
            raise

    @contextlib.contextmanager
    def edit(self, name: str, holder: str) -> Iterator[Path]:
        """A private copy of the volume to change; it replaces the volume only if the block succeeds.

        The volume is held exclusively throughout and checked first, so a corrupt image is refused
        before it is touched, and a failed edit leaves the original as it was.
        """
        with self.hold(name, holder) as path:
            check_image(path)
            with self._staged(validate_name(name)) as tmp:
                os.unlink(tmp)
                # --reflink=auto: instant on btrfs/xfs; elsewhere a sparse copy of the used blocks only.
                run_tool(["cp", "--reflink=auto", "--sparse=always", "--preserve=all", str(path), str(tmp)])
                yield tmp
                os.replace(tmp, path)


def _write_holders(lock: Path, lines: list[str]) -> None:
    tmp = lock.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, lock.with_suffix(".holders"))  # a reader never sees half a file


def _live_holder_lines(lock: Path) -> list[str]:
    try:
        lines = lock.with_suffix(".holders").read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [line for line in lines if _alive(line.partition(" ")[0])]


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
