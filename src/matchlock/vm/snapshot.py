"""Boot templates: start sandboxes from a snapshot of an already-booted guest.

Under emulation most of a cold start is the kernel booting and Python
starting in the guest (about a second). A template is a VM booted once,
with placeholder disks, up to the point where the guest init has loaded the
agent and waits for the host; its state is saved with QEMU's migration. A
new sandbox starts QEMU with `-incoming` from that state and its own disks,
and is ready in a fraction of the time.

Clones must not share secrets or randomness: the template holds neither
(the sandbox's settings, CA and secrets arrive later, in the handshake),
and every clone is woken with fresh host entropy that the guest mixes into
its kernel RNG and uses to force a new CRNG key.

Templates are keyed by everything that shapes the machine (QEMU, kernel,
runtime disk, memory, vCPUs, accelerator, devices), built on first use under
a lock, and a failure to build or restore one is never fatal: the sandbox
boots cold instead. A failed restore deletes the template only when QEMU
said the state cannot be loaded: a QEMU that was killed proves nothing.

A sandbox of an image from the store starts from a "rooted" template of that
image: one whose guest also mounted the image's root (erofs lower, ext4 upper,
overlay, pivot_root: ~0.2 s of every start under emulation) before the save.
Its key adds the lower disk's identity and the upper's size; the template
keeps the upper disk it booted with (`UPPER_FILE`, synced by the guest and
flushed by QEMU's stop before the save), and each clone's upper disk starts
as a copy of it. Before the save the guest wrote only the overlay's
directories, /etc (copied up) with empty /etc/hostname and /etc/hosts, and
mount points, all from the public image, so the rules above hold: no secrets
and no sandbox's data (each sandbox's upper is its own copy), fresh
randomness per clone.

Each template is about 50 MB and every new --memory/--cpus pair makes one,
so the cache is bounded (KEEP_TEMPLATES by count, MAX_TEMPLATE_BYTES in
total, least recently used first) and `matchlock image templates` / `image
gc` show and clear it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import weakref
from pathlib import Path

from ..api.paths import cache_dir
from ..util.fs import try_file_lock
from ..wire.boot import (
    LOWER_DISK_SERIAL,
    RUNTIME_DISK_SERIAL,
    TEMPLATE_FLAG,
    TEMPLATE_READY,
    TEMPLATE_ROOTED_FLAG,
    UPPER_DISK_SERIAL,
)
from . import checkpoint
from .machine import Machine, MachineSpec, build_argv

TEMPLATE_VERSION = "2"  # 2: RAM beside the state (checkpoint.RAM_FILE), not in it
PLACEHOLDER_SIZE = 1 << 40  # sparse: the guest sees room for any real disk
BUILD_TIMEOUT = 120.0
KEEP_TEMPLATES = 6
MAX_TEMPLATE_BYTES = 400 * 1024 * 1024
INPUTS_FILE = "inputs.json"  # what the template was built from, to tell when it went stale
DISABLE_ENV = "MATCHLOCK_NO_TEMPLATES"
WANTED_SUFFIX = ".wanted"  # an image started once: its next start builds its rooted template
KEEP_WANTED = 64
UPPER_FILE = "upper"  # a rooted template's upper disk, copied by each of its clones


def templates_dir() -> Path:
    return cache_dir() / "templates"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


def _identity(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return f"{path}:missing"
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


def _rooted(spec: MachineSpec) -> bool:
    return TEMPLATE_ROOTED_FLAG in spec.kernel_args


def _identified_disks(spec: MachineSpec) -> tuple[str, ...]:
    """Serials of the disks whose files the template's memory depends on."""
    return (RUNTIME_DISK_SERIAL, LOWER_DISK_SERIAL) if _rooted(spec) else (RUNTIME_DISK_SERIAL,)


def _input_files(spec: MachineSpec) -> list[Path]:
    qemu = shutil.which("qemu-system-x86_64")
    files = [Path(qemu)] if qemu else []
    files += [spec.kernel] + ([spec.initrd] if spec.initrd else [])
    return files + [d.path for d in spec.disks if d.serial in _identified_disks(spec)]


def template_upper(state: Path) -> Path:
    """A rooted template's upper disk, beside its `state`."""
    return state.with_name(UPPER_FILE)


def rooted_template_spec(spec: MachineSpec, root: Path) -> MachineSpec:
    """A rooted template's machine: the spec's own lower disk (the image) and upper disk (a blank,
    copied at the build), and the flags that have the guest mount its root and wait."""
    return dataclasses.replace(
        spec, name="template", console_log=root / "console.log", incoming=None,
        kernel_args=tuple(spec.kernel_args) + (TEMPLATE_FLAG, TEMPLATE_ROOTED_FLAG),
    )  # fmt: skip


def template_spec(spec: MachineSpec, root: Path) -> MachineSpec:
    """The machine a template is booted as: same devices, placeholder disks, the wait flag."""
    placeholders = {
        LOWER_DISK_SERIAL: root / "placeholder-lower.img",
        UPPER_DISK_SERIAL: root / "placeholder-upper.img",
    }
    for path in placeholders.values():
        if not path.exists() or path.stat().st_size != PLACEHOLDER_SIZE:
            with open(path, "wb") as f:
                f.truncate(PLACEHOLDER_SIZE)
    disks = tuple(
        dataclasses.replace(disk, path=placeholders[disk.serial]) if disk.serial in placeholders else disk
        for disk in spec.disks
    )
    return dataclasses.replace(
        spec, name="template", disks=disks, console_log=root / "console.log",
        kernel_args=tuple(spec.kernel_args) + (TEMPLATE_FLAG,), incoming=None,
    )  # fmt: skip


def template_key(spec: MachineSpec) -> str:
    qemu = shutil.which("qemu-system-x86_64")
    argv = build_argv(dataclasses.replace(spec, console_log=Path("/console")), 3, 4)
    parts = [
        TEMPLATE_VERSION,
        _identity(Path(qemu)) if qemu else "-",
        _identity(spec.kernel),
        _identity(spec.initrd),
        *(f"{d.serial}:{_identity(d.path) if d.serial in _identified_disks(spec) else ''}" for d in spec.disks),
        # A rooted template's clones copy its upper disk, so they share its size.
        *(f"upper:{os.stat(d.path).st_size}" for d in spec.disks if _rooted(spec) and d.serial == UPPER_DISK_SERIAL),
        # The TAP's descriptor number differs per sandbox; the NIC itself is in the -device argument.
        " ".join(a for a in argv if not a.startswith(("file=", "id=disk", "tap,")) and "path=" not in a),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


LOCK_POLL_SECONDS = 0.05  # how often a create polls the build lock another process holds
# This process's build locks, per event loop (an asyncio.Lock belongs to one) and template key; a closed
# loop's go with it.
_build_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _build_lock(key: str) -> asyncio.Lock:
    return _build_locks.setdefault(asyncio.get_running_loop(), {}).setdefault(key, asyncio.Lock())


# What QEMU prints when a saved state cannot be loaded (QEMU 7.x wording).
_LOAD_ERRORS = ("load of migration failed", "not a migration stream", "unknown savevm section", "unknown ramblock")
_MIGRATION_MAGIC = b"QEVM"


def restore_proves_state_bad(state: Path, returncode: int | None, qemu_stderr: str) -> bool:
    """Whether a failed restore from `state` means the state itself is unusable.

    `returncode` is QEMU's exit status when the restore failed (None while
    it still ran). A state without the migration stream's magic is bad
    whatever happened; otherwise only QEMU's own load error convicts it: a
    QEMU killed by a signal (the user, the OOM killer, a host shutdown) or a
    slow guest says nothing about the template that every sandbox shares.
    """
    try:
        with open(state, "rb") as f:
            if f.read(len(_MIGRATION_MAGIC)) != _MIGRATION_MAGIC:
                return True
    except FileNotFoundError:
        return False
    if returncode is not None and returncode < 0:
        return False
    text = qemu_stderr.lower()
    return any(marker in text for marker in _LOAD_ERRORS)


@dataclasses.dataclass(frozen=True)
class Template:
    key: str
    path: Path  # its directory
    size: int  # bytes on disk
    last_used: float  # the state's mtime, touched on every use
    status: str  # "ready", "stale" (built from files that changed or are gone) or "incomplete"
    shape: str  # e.g. "512 MB, 1 CPU, network"


def _complete(state: Path, rooted: bool = False) -> bool:
    """Whether the template is whole (files are renamed into place upper first, state last; a removal
    cut short may leave a rooted one without its upper, which every clone would then boot cold for)."""
    whole = state.exists() and state.with_name(checkpoint.RAM_FILE).exists()
    return whole and (not rooted or template_upper(state).exists())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _disk_usage(directory: Path) -> int:
    total = 0
    for entry in directory.iterdir():
        try:
            total += entry.lstat().st_blocks * 512
        except OSError:
            continue
    return total


class TemplateCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or templates_dir()

    async def ensure(self, spec: MachineSpec, network_wrapper=None, *, rooted: bool = False) -> Path:
        """The saved state for this machine shape, building it if needed.

        `network_wrapper` provides (TAP descriptor, cleanup) of a temporary network
        namespace when the machine has a NIC: the template's TAP must exist
        while it boots, in a namespace of its own. `rooted`: a template of the spec's
        image with its root mounted, whose clones copy `template_upper(state)`;
        the spec's upper disk must be a blank.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        base = rooted_template_spec(spec, self.root) if rooted else template_spec(spec, self.root)
        key = template_key(base)
        state = self.root / key / "state"
        if _complete(state, rooted):
            os.utime(state)
            return state
        # One build per key: other processes wait on the file lock, this process's other creates on an
        # asyncio lock. A blocking flock here would stop the event loop, and with it the build that holds
        # the lock when that build is in this same process (concurrent creates hung for good so).
        async with _build_lock(key):
            while not _complete(state, rooted):
                with try_file_lock(self._lock_path(key)) as locked:
                    if locked:
                        if not _complete(state, rooted):
                            await self._build(base, state, network_wrapper)
                        break
                await asyncio.sleep(LOCK_POLL_SECONDS)  # another process builds it
        self.prune()
        return state

    def wants_rooted(self, spec: MachineSpec) -> bool:
        """Whether a start of the spec's image should come from its rooted template: it is built, or the
        image was started before. A first start takes the plain template and only notes the image
        (`<key>.wanted`), so an image run once (a `matchlock build` result, a one-off pull) never pays
        a rooted build: a cold boot plus a save, slower than the plain restore it replaces."""
        self.root.mkdir(parents=True, exist_ok=True)
        key = template_key(rooted_template_spec(spec, self.root))
        if _complete(self.root / key / "state", rooted=True):
            return True
        wanted = self.root / f"{key}{WANTED_SUFFIX}"
        if wanted.exists():
            return True
        with contextlib.suppress(OSError):  # a read-only cache: the plain template still serves
            wanted.touch()
        return False

    async def ensure_rooted(self, spec: MachineSpec, network_wrapper=None) -> Path:
        """`ensure` of the template of the spec's image with its root mounted (see `ensure`)."""
        return await self.ensure(spec, network_wrapper, rooted=True)

    def _lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    async def _build(self, spec: MachineSpec, state: Path, network_wrapper) -> None:
        state.parent.mkdir(parents=True, exist_ok=True)
        shape = f"{spec.memory_mb} MB, {spec.cpus:g} CPU, {'network' if spec.network else 'no network'}"
        if _rooted(spec):
            lower = next(d.path for d in spec.disks if d.serial == LOWER_DISK_SERIAL)
            shape += f", root of {lower.parent.name}/{lower.name}"
        inputs = {"files": {str(path): _identity(path) for path in _input_files(spec)}, "shape": shape}
        (state.parent / INPUTS_FILE).write_text(json.dumps(inputs))
        spec = dataclasses.replace(spec, console_log=state.parent / "console.log")
        spec.console_log.write_text("")
        # Per build: a lock file that a cleanup removed must not let two builds share one file.
        partial = state.with_name(f"state.partial-{os.getpid()}")
        ram_partial = state.with_name(f"{checkpoint.RAM_FILE}.partial-{os.getpid()}")
        upper_partial = state.with_name(f"{UPPER_FILE}.partial-{os.getpid()}")
        if _rooted(spec):  # before the namespace, which a failed copy would otherwise leave behind
            blank = next(d for d in spec.disks if d.serial == UPPER_DISK_SERIAL)
            try:
                checkpoint.copy_disk(blank.path, upper_partial)
            except BaseException:
                upper_partial.unlink(missing_ok=True)  # a copy cut short (a full disk)
                raise
            disks = tuple(dataclasses.replace(d, path=upper_partial) if d is blank else d for d in spec.disks)
            spec = dataclasses.replace(spec, disks=disks)
        cleanup = None
        if spec.network is not None and network_wrapper is not None:
            tap_fd, cleanup = network_wrapper()
            spec = dataclasses.replace(spec, network=dataclasses.replace(spec.network, tap_fd=tap_fd))
        machine = Machine(spec)
        try:
            sock = await machine.start()
            loop = asyncio.get_running_loop()
            marker = await asyncio.wait_for(loop.sock_recv(sock, 1), BUILD_TIMEOUT)
            if marker != TEMPLATE_READY:
                raise RuntimeError(f"template guest sent {marker!r} instead of its ready marker")
            assert machine.qmp is not None
            await machine.qmp.execute("stop")
            # Device state in `state`, RAM beside it, which sandboxes map copy-on-write. Both are
            # replaced by rename only, never rewritten: running sandboxes map the old RAM file.
            await checkpoint.save_memory(machine, partial, ram_partial)
            await machine.kill()  # its upper disk is written no more
            if _rooted(spec):
                os.rename(upper_partial, template_upper(state))
            os.rename(ram_partial, state.with_name(checkpoint.RAM_FILE))
            os.rename(partial, state)
        finally:
            await machine.kill()
            partial.unlink(missing_ok=True)
            ram_partial.unlink(missing_ok=True)
            upper_partial.unlink(missing_ok=True)
            if cleanup is not None:
                cleanup()

    def templates(self) -> list[Template]:
        """Every template directory, most recently used first."""
        found = []
        for directory in self.root.glob("*/"):
            if not directory.is_dir():
                continue
            state = directory / "state"
            try:
                inputs = json.loads((directory / INPUTS_FILE).read_text())
                files, shape = dict(inputs["files"]), str(inputs["shape"])
            except (OSError, ValueError, KeyError, TypeError):
                files, shape = {}, "?"  # made by an older version: judged by its age alone
            try:
                last_used = state.stat().st_mtime
                status = "ready"
                if any(_identity(Path(path)) != identity for path, identity in files.items()):
                    status = "stale"
            except FileNotFoundError:
                last_used, status = directory.stat().st_mtime, "incomplete"
            found.append(Template(directory.name, directory, _disk_usage(directory), last_used, status, shape))
        return sorted(found, key=lambda t: t.last_used, reverse=True)

    def prune(self, *, keep: int = KEEP_TEMPLATES, max_bytes: int = MAX_TEMPLATE_BYTES) -> list[Template]:
        """Remove stale and unfinished templates, then the least recently used beyond the bounds.

        Templates being built hold their lock and are left alone. Returns what was removed.
        """
        removed = []
        kept, kept_bytes = 0, 0
        for template in self.templates():
            fits = kept < keep and (kept == 0 or kept_bytes + template.size <= max_bytes)
            if template.status == "ready" and fits:
                kept, kept_bytes = kept + 1, kept_bytes + template.size
            elif self._remove(template):
                removed.append(template)
        self._remove_orphan_locks()
        self._trim_wanted()
        return removed

    def _trim_wanted(self) -> None:
        """Keep the newest KEEP_WANTED notes of images started once (see `wants_rooted`)."""
        notes = sorted(self.root.glob(f"*{WANTED_SUFFIX}"), key=_mtime, reverse=True)
        for note in notes[KEEP_WANTED:]:
            note.unlink(missing_ok=True)

    def clear(self) -> list[Template]:
        """Remove every template not in use by a build (restoring sandboxes keep their open copy)."""
        return self.prune(keep=0)

    def _remove(self, template: Template) -> bool:
        with try_file_lock(self._lock_path(template.key)) as free:
            if not free:
                return False  # being built right now
            shutil.rmtree(template.path, ignore_errors=True)
            self._lock_path(template.key).unlink(missing_ok=True)
            return True

    def _remove_orphan_locks(self) -> None:
        for lock in self.root.glob("*.lock"):
            if not (self.root / lock.stem).exists():
                with try_file_lock(lock) as free:
                    if free:
                        lock.unlink(missing_ok=True)
