"""Pause, resume and snapshot a running sandbox, and restore new sandboxes from a snapshot.

These run in the sandbox's owner (the relay and the RPC server call them),
the only process that holds its QEMU, proxy, CA key and secrets.

A full snapshot parks the guest agent (wire/checkpoint.py), stops the vCPUs,
saves memory (vm/checkpoint.py), copies the upper disk and every --disk image,
hard-links the read-only files the saved memory depends on (kernel, initrd, runtime and
image disks: a later rebuild must not change them under the clone), then
lets the source continue. A filesystem snapshot syncs the guest and copies
its disks while the vCPUs are stopped. Neither writes a secret value or
the CA key: they are in this process only; the guest holds placeholders.
With directory mounts both also park the VFS channel and save the router's
state (sandbox/vfs.py; a full one with the node table); a restore takes the
snapshot's own mounts and fills a fresh router from it before its server starts.

A restore (`Restore`) gives the new sandbox its own VM id, namespace, proxy
and private copies of the disks (never the source's volume); its policy
starts from the source's allow-list at snapshot time (the restore's --allow-host adds to it). A full restore starts QEMU with
`-incoming` and wakes the parked agent as a new host: the agent reseeds its
RNG, sets its clock, and takes the new sandbox's settings, a new CA
included, in a fresh handshake before anything else runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..api.config import SandboxConfig, public_config
from ..api.disks import DiskMount
from ..api.errors import MatchlockError, SetupError, UsageError, VMError
from ..api.network import HostMapping, NetworkConfig
from ..api.vfs import MountConfig, VFSConfig, VFSHookRule, VFSInterceptionConfig
from ..image.reference import try_parse as try_parse_reference
from ..state import snapshots as records
from ..state.snapshots import RestoreMismatch
from ..util import trace
from ..util.aio import finish_in_thread
from ..vm import checkpoint
from ..vm.machine import Disk, MachineSpec
from ..wire import agent as msgs
from ..wire import boot
from ..wire.checkpoint import encode_wake
from . import disks, files

if TYPE_CHECKING:
    from ..api.paths import SandboxPaths
    from ..state.store import StateStore
    from .sandbox import Sandbox
    from .vfs import SandboxVFS

MEMORY_FILE = "memory"
PARK_TIMEOUT = 30.0
RAM_FILE = checkpoint.RAM_FILE  # guest RAM, mapped copy-on-write by clones (absent when RAM is in MEMORY_FILE)
UPPER_FILE = "upper.img"
VFS_STATE = "vfs/state.json"  # the mounts' saved state (vfs/snapshot.py), written last
LINKED = {"kernel": "kernel", "initrd": "initrd", "runtime": "runtime.img", "lower": "lower.img"}


def _machine(sandbox: Sandbox):
    if sandbox.machine is None or not sandbox.machine.running or sandbox.closed:
        raise VMError(f"sandbox {sandbox.id} is not running")
    return sandbox.machine


def _mark(sandbox: Sandbox, paused: bool) -> None:
    sandbox.paused = paused
    if sandbox.tracker.registered and sandbox.tracker.store is not None:
        records.set_paused(sandbox.tracker.store, sandbox.id, paused)


async def pause(sandbox: Sandbox) -> None:
    """Stop the vCPUs; memory, disks, network and open connections stay. Exec waits for `resume`.

    A pause asked for while a snapshot runs waits for it (`control_lock`): the snapshot starts the vCPUs
    again when it ends, which would silently undo a pause made meanwhile."""
    async with sandbox.control_lock:
        machine = _machine(sandbox)
        if sandbox.paused:
            # The sandbox's state, not a parameter: RPC -32000 (VMError), not -32602 "invalid params".
            raise VMError(f"sandbox {sandbox.id} is already paused; fix: matchlock resume {sandbox.id}")
        await checkpoint.pause(machine)
        _mark(sandbox, True)


async def resume(sandbox: Sandbox) -> None:
    async with sandbox.control_lock:
        machine = _machine(sandbox)
        if not sandbox.paused:
            raise VMError(f"sandbox {sandbox.id} is not paused; fix: nothing to resume (see `matchlock list`)")
        await checkpoint.resume(machine)
        _mark(sandbox, False)


def _link(source: Path, target: Path, pid: int | None) -> None:
    """A hard link (free, and immune to the source being replaced later), else a copy.

    A runtime disk rebuilt since the sandbox started is gone from the cache, but QEMU (`pid`)
    still has the one the saved memory depends on open: copy that.
    """
    try:
        os.link(source, target)
        return
    except FileNotFoundError:
        source = _open_copy(source, pid)
    except OSError:
        pass
    shutil.copyfile(source, target)


def _open_copy(path: Path, pid: int | None) -> Path:
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir() if pid else ():
        with contextlib.suppress(OSError):
            if os.readlink(fd) in (str(path), f"{path} (deleted)"):
                return fd
    raise SetupError(f"{path} is gone and the sandbox's QEMU no longer has it open; a full snapshot needs it")


async def create(sandbox: Sandbox, store: StateStore, name: str, mode: str) -> records.SnapshotRecord:
    """Snapshot `sandbox` as `name`; on any failure nothing of it is left (and `ls` never shows it)."""
    machine = _machine(sandbox)
    held = sorted(guest for guest, m in sandbox.config.vfs.mounts.items() if m.file is not None)
    if held:  # a build's secret mount: its bytes must never reach a disk (the snapshot's files or saved memory)
        raise UsageError(
            f"sandbox {sandbox.id} holds in-memory secret files ({', '.join(held)}); it cannot be snapshotted"
        )
    async with sandbox.control_lock:  # one at a time, and no pause or resume in the middle of one
        machine = _machine(sandbox)  # it may have stopped while this waited
        name, directory = records.begin_named(store, name, sandbox.id, mode)
        try:
            meta = _describe(sandbox, machine.spec, mode)
            if mode == "full":
                # The saved memory holds these files' pages: a rebuilt runtime or image must not replace them.
                for key, filename in LINKED.items():
                    if meta["files"].get(key):
                        _link(Path(meta["files"][key]), directory / filename, machine.pid)
                await _save_full(sandbox, directory)
            else:
                await _save_disks(sandbox, directory)
            return records.complete(store, name, meta)
        except BaseException:
            records.remove(store, name)
            raise


def _describe(sandbox: Sandbox, spec: MachineSpec, mode: str) -> dict:
    paths = {disk.serial: disk.path for disk in spec.disks}
    network = sandbox.network
    placeholders = network.policy.guest_environment() if network is not None else {}
    return {
        "version": 1,
        "mode": mode,
        "source_vm": sandbox.id,
        "image": sandbox.config.image,
        "config": public_config(sandbox.config),
        # Names and placeholders only: a restore must bring the values again (--secret).
        "secrets": {name: placeholders.get(name, "") for name in sandbox.config.network.secrets},
        # The allow-list as it is now (`allow-list add` included): the clones' starting policy.
        "allowed_hosts": list(network.policy.allowed_hosts) if network is not None else [],
        "cpus": spec.cpus,
        "memory_mb": spec.memory_mb,
        "disk_size_mb": sandbox.config.resources.disk_size_mb,
        "network": spec.network is not None,
        "kernel_args": list(spec.kernel_args),
        "acpi": spec.acpi,
        "tsc_khz": spec.tsc_khz,
        "files": {
            "kernel": str(spec.kernel),
            "initrd": str(spec.initrd) if spec.initrd else "",
            "runtime": str(paths[boot.RUNTIME_DISK_SERIAL]),
            "lower": str(paths[boot.LOWER_DISK_SERIAL]),
        },
        "upper": str(paths[boot.UPPER_DISK_SERIAL]),
        # Each --disk is copied beside the upper disk (`_copy_disks`): a clone gets a copy of that, never
        # the source's image (a volume stays the source's, written by it alone).
        "extra_disks": [
            {**disk.to_json(), "host_path": str(paths[disks.serial(index)])}
            for index, disk in enumerate(sandbox.config.extra_disks)
        ],
    }


def _extra_file(index: int) -> str:
    return f"{disks.serial(index)}.ext4"


def _copy_disks(sandbox: Sandbox, directory: Path) -> None:
    """The upper disk and every --disk image, with the vCPUs stopped (QEMU flushed its block I/O then)."""
    checkpoint.copy_disk(sandbox.paths.upper_disk, directory / UPPER_FILE)
    extra = {disk.serial: disk.path for disk in _machine(sandbox).spec.disks}
    for index in range(len(sandbox.config.extra_disks)):
        checkpoint.copy_disk(extra[disks.serial(index)], directory / _extra_file(index))


async def _park(sandbox: Sandbox) -> None:
    """The guest answers, then waits on the raw port; from here the host sends no frames."""
    channel = sandbox._channel()
    stream = channel.open(msgs.CheckpointRequest().to_wire())
    stream.finish_sending()
    channel.flush_now()
    channel.held = True
    try:
        async with asyncio.timeout(PARK_TIMEOUT):  # a guest that never answers must not hold the channel
            await files._final_reply(stream, msgs.OP_CHECKPOINT)
    except TimeoutError:
        _wake(sandbox)  # a guest that parks late must not wait for ever; one that did not fails its channel
        raise VMError(
            f"the guest of {sandbox.id} did not get ready for the snapshot within {PARK_TIMEOUT:g} s"
        ) from None
    except MatchlockError:
        channel.held = False  # the guest refused or broke: it is not parked, so it must not get a wake record
        channel.flush()
        raise
    except BaseException:
        _wake(sandbox)  # cancelled while the guest parks: it must not wait for ever
        raise


def _wake(sandbox: Sandbox) -> None:
    assert sandbox.channel is not None
    channel = sandbox.channel
    channel.write_raw(encode_wake(new_host=False, time_ns=time.time_ns(), seed=os.urandom(boot.WAKE_SIZE)))
    channel.held = False
    channel.flush()


async def _stopped(sandbox: Sandbox):
    """Stop the vCPUs unless `pause` already did; returns whether to start them again."""
    if sandbox.paused:
        return False
    await checkpoint.pause(_machine(sandbox))
    return True


async def _save_full(sandbox: Sandbox, directory: Path) -> None:
    machine = _machine(sandbox)
    was_paused = sandbox.paused
    if was_paused:
        await checkpoint.resume(machine)  # the agent must run to park
        sandbox.paused = False
    trace.mark("snapshot: parking the guest")
    # The agent first: while it parks, the VFS still serves, so an agent handler blocked on a FUSE
    # op (a write_file into a mount) finishes. Parked the other way round it would wait for ever.
    await _park(sandbox)
    trace.mark("snapshot: guest parked")
    vfs_parked = False
    try:
        if sandbox.vfs is not None:
            await sandbox.vfs.park(PARK_TIMEOUT)  # wakes the channel itself when it fails
            vfs_parked = True
            trace.mark("snapshot: VFS channel parked")
        await checkpoint.pause(machine)
        saved = await checkpoint.save_memory(machine, directory / MEMORY_FILE, directory / RAM_FILE)
        trace.mark(f"snapshot: memory saved ({saved.value})")
        _copy_disks(sandbox, directory)
        trace.mark("snapshot: disks copied")
        if (vfs := sandbox.vfs) is not None:
            # Cancelled, the save still ends before the wake: it reads the router, which the wake lets change.
            await finish_in_thread(lambda: vfs.save(directory, with_nodes=True))
            trace.mark("snapshot: VFS state saved")
    finally:
        try:
            if not was_paused:
                await checkpoint.resume(machine)
        finally:
            try:
                _wake(sandbox)  # queued behind the stop when paused: the guest reads it on `resume`
            finally:  # a channel left parked would hang every mount of the sandbox
                if vfs_parked:
                    assert sandbox.vfs is not None
                    sandbox.vfs.wake()
                sandbox.paused = was_paused
                trace.mark("snapshot: guest resumed")
    if saved is checkpoint.SavedRam.SPLIT:
        checkpoint.release_saved_pages(machine)


async def _save_disks(sandbox: Sandbox, directory: Path) -> None:
    was_paused = sandbox.paused
    resumed = was_paused
    if resumed:
        # The guest must run to sync (writes still in its page cache are not on the upper disk yet:
        # copied without it, the snapshot missed them) and the FUSE daemon to park, as the agent must
        # for a full snapshot: the guest runs for the sync and the park, is stopped for the copy, and
        # stays paused after.
        await checkpoint.resume(_machine(sandbox))
        sandbox.paused = False
    try:
        await _sync_and_copy(sandbox, directory, keep_stopped=was_paused)
    finally:
        if resumed:
            await checkpoint.pause(_machine(sandbox))  # stopped already, unless the sync or the park failed
        sandbox.paused = was_paused


async def _sync_and_copy(sandbox: Sandbox, directory: Path, *, keep_stopped: bool) -> None:
    if not sandbox.paused:
        from .sandbox import ExecSpec

        await sandbox.exec(ExecSpec("sync"))  # the guest's page cache onto the upper disk first
    vfs = sandbox.vfs
    parked = False
    try:
        if vfs is not None:
            # The mounts' content as the disk has it: no request changes it while it is copied.
            await vfs.park(PARK_TIMEOUT)
            parked = True
        restart = await _stopped(sandbox) and not keep_stopped
        try:
            _copy_disks(sandbox, directory)
            if vfs is not None:
                await finish_in_thread(lambda: vfs.save(directory, with_nodes=False))
        finally:
            if restart:
                await checkpoint.resume(_machine(sandbox))
    finally:
        if parked:
            assert vfs is not None
            vfs.wake()  # queued while stopped: the daemon reads it on `resume`


# --- restore ---------------------------------------------------------------------------


_RESOURCE_FLAGS = {"cpus": "--cpus", "memory_mb": "--memory", "disk_size_mb": "--disk-size"}


def _number(value: object) -> str:
    """A saved number as the flags print theirs (1.0 cpus as 1)."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _same_image(given: str, saved: str) -> bool:
    if given == saved:
        return True
    a, b = try_parse_reference(given), try_parse_reference(saved)
    return a is not None and b is not None and a.canonical == b.canonical


def _inherit_network(given: NetworkConfig, meta: dict) -> NetworkConfig:
    """The restore's network settings on top of the snapshot's: a clone must not get a wider policy
    than its source had (an empty allow-list with interception on lets every host through), so the
    source's allow-list is kept and the restore's --allow-host adds to it; its /etc/hosts entries and
    resolvers are kept unless the restore names others."""
    if given.no_network:
        return given  # nothing to reach: no policy to keep (a full restore refuses this earlier)
    source = meta.get("config", {}).get("network", {})
    allowed = [*meta.get("allowed_hosts", source.get("allowed_hosts", [])), *given.allowed_hosts]
    add_hosts = given.add_hosts or tuple(HostMapping.validated(m["host"], m["ip"]) for m in source.get("add_hosts", []))
    return dataclasses.replace(
        given,
        allowed_hosts=tuple(dict.fromkeys(allowed)),
        intercept=given.intercept or bool(source.get("intercept")),
        block_private_ips=given.block_private_ips and bool(source.get("block_private_ips", True)),
        add_hosts=add_hosts,
        dns_servers=given.dns_servers or tuple(source.get("dns_servers", [])),
    )


@dataclass(frozen=True)
class Restore:
    """A new sandbox from snapshot `name` (its files under `directory`)."""

    name: str
    directory: Path
    meta: dict

    @property
    def full(self) -> bool:
        return self.meta["mode"] == "full"

    @classmethod
    def load(cls, store: StateStore, name: str) -> Restore:
        record = records.require(store, records.validate_name(name))
        directory = records.snapshot_dir(store, name)
        needed = [UPPER_FILE] + ([MEMORY_FILE] if record.mode == "full" else [])
        needed += [_extra_file(index) for index in range(len(_saved_disks(record.meta, name)))]
        if record.meta.get("config", {}).get("vfs"):
            needed.append(VFS_STATE)
        with records.reading(directory, name):  # a removal under way is not damage
            missing = [f for f in needed if not (directory / f).exists()]
        if missing:
            raise SetupError(f"snapshot {name!r} is damaged: {', '.join(missing)} missing; fix: snapshot rm {name}")
        return cls(name, directory, record.meta)

    def prepare(
        self, config: SandboxConfig, *, image: str = "", resources: Mapping[str, float] | None = None
    ) -> SandboxConfig:
        """`config` (from the restore's settings) with the snapshot's image and machine shape.

        `image` and `resources` are what the caller set explicitly (RPC `create`, or the flags given to
        `run --from-snapshot`); each must be the snapshot's. Left out, the snapshot's are taken. Every secret the snapshot's policy names must be given again. A setting the
        snapshot cannot take raises `RestoreMismatch`, which each front end words in its own terms.
        """
        self._check(config, image, resources or {})
        meta = self.meta
        given = config.network.secrets
        # The guest's running processes hold the old placeholders: keep them, unless the user chose others.
        secrets = {
            name: s if s.placeholder or not meta["secrets"].get(name) else dataclasses.replace(
                s, placeholder=meta["secrets"][name])
            for name, s in given.items()
        }  # fmt: skip
        shape = dataclasses.replace(
            config.resources,
            cpus=meta["cpus"], memory_mb=meta["memory_mb"], disk_size_mb=meta["disk_size_mb"],
        )  # fmt: skip
        network = dataclasses.replace(_inherit_network(config.network, meta), secrets=secrets)
        vfs = self.saved_vfs()
        disks = self.saved_disks()
        # The snapshot's own mounts again are fine: `run` prepares in the CLI, then in the owner.
        if (config.extra_disks and config.extra_disks != disks) or (config.vfs.active and config.vfs != vfs):
            raise UsageError(
                "--disk and directory mounts (-v, --workspace) cannot be combined with --from-snapshot: "
                f"a restore brings back snapshot {self.name!r}'s own mounts and disks; fix: drop them"
            )
        prepared = dataclasses.replace(
            config, image=meta["image"], resources=shape, network=network, vfs=vfs, extra_disks=disks
        )
        prepared.validate()
        return prepared

    def saved_vfs(self) -> VFSConfig:
        """The snapshot's directory mounts, as its source had them; each shared host path must still be there."""
        saved = self.meta.get("config", {}).get("vfs")
        if saved is None:
            return VFSConfig()
        vfs = _vfs_config(saved, self.name)
        for guest, mount in sorted(vfs.mounts.items()):
            if mount.host_path and not os.path.lexists(mount.host_path):
                raise SetupError(
                    f"snapshot {self.name!r}: its {mount.type} mount {guest} needs the host path "
                    f"{mount.host_path}, which is gone; fix: recreate {mount.host_path} (a restore serves the "
                    f"host directory itself, not a copy), or remove the snapshot: matchlock snapshot rm {self.name}"
                )
        return vfs

    def saved_disks(self) -> tuple[DiskMount, ...]:
        """The source's --disk mounts, each on the snapshot's copy of its image (`make_disks` copies it again)."""
        return self.private_disks(self.directory)

    def private_disks(self, directory: Path) -> tuple[DiskMount, ...]:
        """The source's --disk mounts, each on its image's copy in `directory` (`make_disks`)."""
        return tuple(
            dataclasses.replace(disk, host_path=str(directory / _extra_file(index)))
            for index, disk in enumerate(_saved_disks(self.meta, self.name))
        )

    def make_disks(self, directory: Path) -> None:
        """Copy every saved --disk image into the new sandbox's `directory`: a clone writes only its own."""
        for index in range(len(_saved_disks(self.meta, self.name))):
            checkpoint.copy_disk(self.directory / _extra_file(index), directory / _extra_file(index))

    def _check(self, config: SandboxConfig, image: str, resources: Mapping[str, float]) -> None:
        meta, name = self.meta, self.name
        saved_image = str(meta.get("image", ""))
        if image and not _same_image(image, saved_image):
            raise RestoreMismatch(
                "image", "--image", f"{image!r} is not the image of snapshot {name!r}, {saved_image!r}",
                cli="omit --image (a restore boots the snapshot's)",
                rpc="omit image (a restore boots the snapshot's) or give that one",
            )  # fmt: skip
        for key, value in resources.items():
            if value != meta.get(key):
                flag = _RESOURCE_FLAGS[key]
                raise RestoreMismatch(
                    f"resources.{key}", flag,
                    f"is {value:g} but snapshot {name!r} was taken with {_number(meta.get(key))}: "
                    "a restore keeps the snapshot's machine",
                    cli=f"omit {flag}", rpc=f"omit resources.{key}",
                )  # fmt: skip
        missing = sorted(set(meta.get("secrets", {})) - set(config.network.secrets))
        if missing:
            first = missing[0]
            raise RestoreMismatch(
                f"network.secrets.{first}", f"--secret {first}",
                f"is missing: snapshot {name!r} uses secret(s) {', '.join(missing)}, which this restore does not give",
                cli=f"pass --secret {first}=VALUE@HOSTS (values are never stored in a snapshot)",
                rpc=f"pass network.secrets.{first} = {{value, hosts}} again (secret values are never stored in a snapshot)",
            )  # fmt: skip
        had_network = bool(meta.get("network"))
        if self.full and config.network.no_network == had_network:
            problem = (
                f"is {'set' if had_network else 'not set'}, but snapshot {name!r} was taken "
                f"{'with' if had_network else 'without'} a network interface: a full restore needs the same"
            )
            raise RestoreMismatch(
                "network.no_network", "--no-network", problem,
                cli="drop --no-network" if had_network else "add --no-network",
                rpc="drop network.no_network" if had_network else "set network.no_network",
            )  # fmt: skip
        rules = meta.get("config", {}).get("network", {}).get("interception_rules", 0)
        if rules and config.network.interception is None:
            # They may block what the allow-list lets through, and they live in the source's client.
            raise RestoreMismatch(
                "network.interception", "the restore",
                f"has no interception rules, but snapshot {name!r} was taken with {rules} network interception "
                "rule(s), which a snapshot does not keep",
                cli="restore it through RPC `create` (or the SDK's `fork()`) with the same `network.interception`",
                rpc="give the same network.interception again",
            )  # fmt: skip

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Held while the restore reads the snapshot's files: `snapshot rm` refuses it meanwhile."""
        return records.reading(self.directory, self.name)

    def restore_vfs(self, vfs: SandboxVFS) -> None:
        """The private mounts' content (a full restore: the node table and open handles too) into `vfs`."""
        vfs.restore(self.directory, self.full)

    def make_upper(self, target: Path) -> None:
        checkpoint.copy_disk(self.directory / UPPER_FILE, target)

    def machine_spec(self, spec: MachineSpec, paths: SandboxPaths) -> MachineSpec:
        """For a full restore: the snapshot's own machine (same devices and files), with this sandbox's
        upper disk, console and network, loading the saved memory.

        QEMU keeps its disks open but not the kernel and initrd: the sandbox (`paths`) gets its own links
        to those, so it can be snapshotted and forked after this snapshot is removed (as `fork` does once
        its clones are up)."""
        if not self.full:
            return spec
        meta = self.meta
        linked = {key: self.directory / f for key, f in LINKED.items() if meta["files"].get(key)}
        for key in ("kernel", "initrd"):
            if key in linked:
                own = paths.restored_boot_file(LINKED[key])
                _link(linked[key], own, None)
                linked[key] = own
        upper = next(d.path for d in spec.disks if d.serial == boot.UPPER_DISK_SERIAL)
        ram = self.directory / RAM_FILE
        return dataclasses.replace(
            spec,
            ram_file=ram if ram.exists() else None,
            ram_private=True,  # a clone's RAM is its own (or a private mapping of the snapshot's)
            ignore_shared=True,
            kernel=linked["kernel"],
            initrd=linked.get("initrd"),
            kernel_args=tuple(meta["kernel_args"]),
            acpi=meta["acpi"],
            tsc_khz=meta["tsc_khz"],
            cpus=meta["cpus"],
            memory_mb=meta["memory_mb"],
            disks=(
                Disk(linked["runtime"], boot.RUNTIME_DISK_SERIAL, readonly=True),
                Disk(linked["lower"], boot.LOWER_DISK_SERIAL, readonly=True),
                Disk(upper, boot.UPPER_DISK_SERIAL, ephemeral=True),
                *(d for d in spec.disks if d.serial.startswith(boot.EXTRA_DISK_SERIAL_PREFIX)),  # private_disks
            ),
            incoming=self.directory / MEMORY_FILE,
        )

    @staticmethod
    def wake_record() -> bytes:
        return encode_wake(new_host=True, time_ns=time.time_ns(), seed=os.urandom(boot.WAKE_SIZE))


def _saved_disks(meta: dict, name: str) -> tuple[DiskMount, ...]:
    """The --disk mounts a snapshot recorded, checked (the meta is read as untrusted); paths are not used."""
    bad = SetupError(f"snapshot {name!r} is damaged: its extra disks are unreadable; fix: snapshot rm {name}")
    saved = meta.get("extra_disks", [])
    if not isinstance(saved, list):
        raise bad
    disks = []
    for entry in saved:
        if not isinstance(entry, dict) or not isinstance(entry.get("readonly"), bool):
            raise bad
        ids = {k: entry.get(k) for k in ("owner_uid", "owner_gid")}
        if not isinstance(entry.get("guest_mount"), str) or not all(v is None or type(v) is int for v in ids.values()):
            raise bad
        disk = DiskMount("/", entry["guest_mount"], entry["readonly"], **ids)
        try:
            disk.validate()
        except UsageError:
            raise bad from None
        disks.append(disk)
    return tuple(disks)


def _vfs_config(saved: object, name: str) -> VFSConfig:
    """The VFS config a snapshot recorded (`VFSConfig.to_json`), checked: the meta is read as untrusted."""

    def bad(what: str) -> SetupError:
        return SetupError(f"snapshot {name!r} is damaged: its vfs config {what}; fix: snapshot rm {name}")

    if not isinstance(saved, dict) or not isinstance(saved.get("mounts"), dict):
        raise bad("has no mounts")
    mounts = {}
    for guest, m in saved["mounts"].items():
        if not isinstance(guest, str) or not isinstance(m, dict) or not isinstance(m.get("type"), str):
            raise bad("has a bad mount")
        ids = {k: m.get(k) for k in ("owner_uid", "owner_gid")}
        if not isinstance(m.get("host_path", ""), str) or not all(v is None or type(v) is int for v in ids.values()):
            raise bad(f"has a bad mount {guest[:200]!r}")
        mounts[guest] = MountConfig(m["type"], m.get("host_path", ""), m.get("readonly") is True, **ids)
    interception = None
    icpt = saved.get("interception")
    if icpt is not None:
        rules = icpt.get("rules") if isinstance(icpt, dict) else None
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise bad("has bad interception rules")
        try:
            interception = VFSInterceptionConfig(
                icpt.get("emit_events") is True,
                tuple(
                    VFSHookRule(str(r["name"]), str(r["phase"]), tuple(map(str, r["ops"])), str(r["path"]),
                                str(r["action"]))
                    for r in rules
                ),
            )  # fmt: skip
        except (KeyError, TypeError):
            raise bad("has bad interception rules") from None
    workspace = saved.get("workspace", "")
    if not isinstance(workspace, str):
        raise bad("has a bad workspace")
    return VFSConfig(workspace=workspace, mounts=mounts, interception=interception)
