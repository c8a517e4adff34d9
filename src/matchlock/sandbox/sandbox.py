"""One sandbox's lifetime: disks, VM, agent channel, exec and files, cleanup.

`Sandbox.create()` either returns a sandbox whose guest reported ready, or
raises after removing everything it made (QEMU process, disks, directory),
with the reason and the tail of the console log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..api.config import DEFAULT_DNS_SERVERS, SandboxConfig, public_config
from ..api.errors import UsageError, VMError
from ..api.events import Event, FileEvent, NetworkEvent
from ..api.image import ImageConfig
from ..api.paths import SandboxPaths
from ..state import lifecycle as phases
from ..state.store import StateStore
from ..util import trace
from ..util.aio import finish_in_thread
from ..vm import checkpoint, snapshot
from ..vm.accel import choose_accelerator, host_tsc_khz
from ..vm.channel import GuestChannel, GuestStream
from ..vm.machine import Disk, Machine, MachineNetwork, MachineSpec, console_tail
from ..wire import agent as msgs
from ..wire import boot, jsonlite
from ..wire.frames import MAX_PAYLOAD
from . import disks, files
from .process import ExecResult, GuestProcess, OutputCallback
from .tracking import Tracker
from .upper import make_upper_disk

if TYPE_CHECKING:  # imported lazily at run time: sandboxes without them never load them
    from ..image.store import ImageInfo
    from .network import SandboxNetwork
    from .portforward import ForwardSpec, PortForwarder
    from .snapshots import Restore
    from .vfs import SandboxVFS

BOOT_TIMEOUT_ENV = "MATCHLOCK_BOOT_TIMEOUT"
BOOT_TIMEOUT_SECONDS: float | None = None  # set to override $MATCHLOCK_BOOT_TIMEOUT (tests)
PROXY_START_TASK = "sandbox proxy start"  # runs beside QEMU's start (tests/unit/fork_owner_imports.py waits for it)


def boot_timeout() -> float:
    """Seconds to wait for the guest: `BOOT_TIMEOUT_SECONDS`, else $MATCHLOCK_BOOT_TIMEOUT, else 60.

    Read when a sandbox starts, not at import: a bad value must not break `run --help`.
    """
    if BOOT_TIMEOUT_SECONDS is not None:
        return BOOT_TIMEOUT_SECONDS
    text = os.environ.get(BOOT_TIMEOUT_ENV, "").strip() or "60"
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"{BOOT_TIMEOUT_ENV}={text!r} is not a positive number of seconds; fix: unset it")
    return seconds


def validate_exec_request(request: msgs.ExecRequest) -> None:
    """Refuse, in one line, what the guest would refuse or what cannot fit one agent frame."""
    wire = request.to_wire()
    try:
        msgs.ExecRequest.parse(wire)
    except ValueError as exc:
        raise UsageError(f"invalid command: {exc}") from None
    size = len(jsonlite.dumps(wire))
    if size > MAX_PAYLOAD:
        raise UsageError(
            f"the command and its environment take {size} bytes, more than the {MAX_PAYLOAD} a command may; "
            "fix: pass large data through stdin or a file"
        )


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(4)


@dataclass
class ExecSpec:
    """What to run, after image defaults are applied."""

    command: str
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""


@dataclass(frozen=True)
class PreparedExec:
    """How an `ExecSpec` runs in the guest, after image defaults and the sandbox config."""

    env: dict[str, str]
    cwd: str
    user: str


def _exit_reason(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


class _MachineExited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"the VM stopped during boot (QEMU exit code {code})")


class Sandbox:
    def __init__(
        self, vm_id: str, config: SandboxConfig, directory: Path, image_config: ImageConfig, tracker: Tracker
    ) -> None:
        self.id = vm_id
        self.config = config
        self.paths = SandboxPaths(directory)
        self.image_config = image_config
        self.tracker = tracker
        self.machine: Machine | None = None
        self.channel: GuestChannel | None = None
        self.boot_ms: int | None = None
        self.closed = False
        self.network: SandboxNetwork | None = None  # None with --no-network
        self.event_listeners: list[Callable[[Event], None]] = []  # called with every network and file event
        self.vfs: SandboxVFS | None = None  # host files served to the guest (config.vfs has mounts)
        self.disk_holds = contextlib.ExitStack()  # the extra disks' locks, released after QEMU exits
        self.paused = False  # vCPUs stopped by `pause` (sandbox/snapshots.py)
        # Held by pause, resume and snapshot (sandbox/snapshots.py): each changes whether the vCPUs run and
        # restores it after, so one must not run inside another (the relay and RPC serve requests at once).
        self.control_lock = asyncio.Lock()
        self._proxy_started: asyncio.Task[None] | None = None  # the network's proxy, starting beside QEMU

    @property
    def directory(self) -> Path:
        return self.paths.root

    @property
    def console_log(self) -> Path:
        return self.paths.console_log

    # --- creation -----------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        config: SandboxConfig,
        *,
        store: StateStore | None = None,
        vm_id: str | None = None,
        runtime_disk: Path | None = None,
        kernel_path: Path | None = None,
        restore: Restore | None = None,
        image: ImageInfo | None = None,
    ) -> Sandbox:
        """Boot a sandbox, recording it in `store` when given.

        `runtime_disk` replaces the guest runtime (tests boot hostile guests); `kernel_path` the kernel;
        `restore` starts it from a snapshot instead (its config already `Restore.prepare`d);
        `image` boots a lower disk that is not in the image store (`matchlock build` runs its steps so).
        """
        # Imported here so `matchlock exec` and friends never pay for them.
        from ..image.runtime import ensure_runtime_disk
        from ..image.store import ImageStore
        from ..kernel import resolve as resolve_kernel

        config.validate()
        boot_timeout()  # a bad $MATCHLOCK_BOOT_TIMEOUT fails now, not after the disks are made
        # A store image gets a template with its root mounted; `build`'s per-step images would each
        # make one, at a cold boot apiece.
        rooted = image is None and restore is None and runtime_disk is None
        image = image or ImageStore().resolve(config.image)
        kernel = resolve_kernel(kernel_path=kernel_path)
        custom_runtime = runtime_disk
        runtime_disk = runtime_disk or ensure_runtime_disk()
        trace.mark("create: image, kernel, runtime resolved")
        vm_id = vm_id or new_vm_id()
        directory = store.vm_dir(vm_id) if store is not None else SandboxPaths.of(vm_id).root
        tracker = Tracker(store, vm_id)
        tracker.register(config.image, public_config(config))
        sandbox = cls(vm_id, config, directory, image.config.merged(config.image_config), tracker)
        paths = sandbox.paths
        try:
            paths.logs_dir.mkdir(parents=True, mode=0o700)
            directory.chmod(0o700)
            paths.console_log.touch(mode=0o600)
            upper = paths.upper_disk
            tracker.resources(
                console_log=str(paths.console_log), upper_disk=str(upper), image_disk=str(image.lower_path)
            )
            try:
                # Side by side: the upper disk (a copy of a blank, or of the snapshot's), and the namespace
                # helper with the proxy's imports: they wait on different things, and all come before QEMU.
                async with asyncio.TaskGroup() as setup:
                    network = setup.create_task(sandbox._start_network())
                    if restore is not None:
                        setup.create_task(finish_in_thread(restore.make_upper, upper))
                    else:
                        setup.create_task(finish_in_thread(make_upper_disk, upper, config.resources.disk_size_mb))
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None  # a SetupError stays one
            machine_network = network.result()
            trace.mark("create: upper disk and network ready")
            mounts = config.extra_disks
            if restore is not None and mounts:  # private copies of the snapshot's images
                await finish_in_thread(restore.make_disks, directory)
                mounts = restore.private_disks(directory)
            extra = await disks.attach(mounts, f"sandbox {vm_id} (pid {os.getpid()})", sandbox.disk_holds)
            if config.vfs.active:
                from .vfs import SandboxVFS  # sandboxes without mounts never load the VFS

                sandbox.vfs = SandboxVFS(config.vfs, sandbox.directory, sandbox._emit_file_event)
                tracker.resources(vfs_mounts=sorted(config.vfs.mounts))
                if restore is not None:  # the snapshot's mounts (Restore.prepare), with their saved content
                    await finish_in_thread(restore.restore_vfs, sandbox.vfs)
            if extra:
                tracker.resources(extra_disks=[str(disk.path) for disk in extra])
            spec = MachineSpec(
                name=vm_id,
                kernel=kernel.path,
                initrd=kernel.initrd,
                kernel_args=tuple(kernel.cmdline),
                acpi=kernel.acpi,
                disks=(
                    Disk(runtime_disk, boot.RUNTIME_DISK_SERIAL, readonly=True),
                    Disk(image.lower_path, boot.LOWER_DISK_SERIAL, readonly=True),
                    Disk(upper, boot.UPPER_DISK_SERIAL, ephemeral=True),
                    *extra,
                ),
                console_log=sandbox.console_log,
                accel=choose_accelerator(),
                tsc_khz=host_tsc_khz(),
                cpus=config.resources.cpus,
                memory_mb=config.resources.memory_mb,
                network=machine_network,
                vfs_port=sandbox.vfs is not None,
            )
            tracker.move(phases.CREATED)
            tracker.move(phases.STARTING)
            try:
                # The proxy starts beside QEMU's restore: the guest's first connections wait in the
                # listeners' backlogs, and its CA (with interception) is needed only for the handshake.
                async with asyncio.TaskGroup() as booting:
                    if sandbox.network is not None:
                        sandbox._proxy_started = booting.create_task(
                            sandbox.network.start_proxy(), name=PROXY_START_TASK
                        )
                    if restore is not None and restore.full:
                        await sandbox._start_machine(restore.machine_spec(spec, paths), wake=restore.wake_record())
                    else:
                        # Templates are booted with a fixed disk set; extra disks boot cold (measured: see
                        # tests/vm/test_disks_attach.py). Sandboxes with mounts restore one and hot-plug
                        # the VFS port (_serve_vfs).
                        await sandbox._boot(spec, use_template=custom_runtime is None and not extra, rooted=rooted)
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None  # a VMError or SetupError stays one
            tracker.move(phases.RUNNING)
        except BaseException as exc:
            failed = phases.START_FAILED if tracker.phase == phases.STARTING else phases.CREATE_FAILED
            tracker.move(failed, error=str(exc) or type(exc).__name__)
            await sandbox.aclose(remove=True)
            raise
        return sandbox

    async def _start_network(self) -> MachineNetwork | None:
        """Namespace, policy and proxy (recorded before they exist); None with --no-network."""
        if self.config.network.no_network:
            return None
        from .network import SandboxNetwork  # sandboxes without a network never import the proxy

        network = self.network = SandboxNetwork(self.config.network, self._emit_event)
        self.tracker.resources(network="private namespace held by the owner")
        await network.create_namespace()  # its helper may have started long before (`run`: start_early)
        self.tracker.resources(netns_inode=network.namespace.inode)
        return network.machine_network()

    def _append_log(self, line: str) -> None:
        """Add a line to vm.log; a log we cannot write never stops the sandbox."""
        try:
            with open(self.console_log, "a") as log:
                log.write(line + "\n")
        except OSError:
            pass

    def _emit_file_event(self, event: FileEvent) -> None:
        for listener in list(self.event_listeners):  # not logged: one per file operation would flood vm.log
            listener(event)

    def _emit_event(self, event: NetworkEvent) -> None:
        self._append_log(event.log_line())
        for listener in list(self.event_listeners):
            listener(event)

    def _guest_config(self) -> msgs.GuestConfig:
        network = self.config.network
        return msgs.GuestConfig(
            hostname=network.hostname or self.id,
            time_ns=time.time_ns(),
            privileged=self.config.privileged,
            cpus=self.config.resources.cpus,
            dns_servers=network.dns_servers or DEFAULT_DNS_SERVERS,
            extra_hosts=tuple((m.host, m.ip) for m in network.add_hosts),
            network=self.network.guest_network() if self.network is not None else None,
            ca_certificate=self.network.ca_pem if self.network is not None else "",
            disks=disks.guest_disks(self.config.extra_disks),
            vfs=self.vfs is not None,
        )

    async def _boot(self, spec: MachineSpec, *, use_template: bool = True, rooted: bool = False) -> None:
        """Start from a boot template when possible (much faster), else boot cold.

        `rooted`: from the image's own template, its root mounted, whose upper disk this one copies.
        """
        if use_template and snapshot.enabled():
            shape = dataclasses.replace(spec, vfs_port=False)  # templates have no VFS port: it is hot-plugged
            try:
                cache = snapshot.TemplateCache()
                rooted = rooted and cache.wants_rooted(shape)
                state = await (cache.ensure_rooted if rooted else cache.ensure)(shape, self._template_namespace)
                if rooted:
                    checkpoint.copy_disk(snapshot.template_upper(state), self.paths.upper_disk)
                trace.mark("boot: template found")
            except Exception as exc:  # noqa: BLE001 - a template is an optimisation, never a requirement
                self._note(f"boot template unavailable ({exc}); booting cold")
                if rooted:  # a copy that failed halfway
                    make_upper_disk(self.paths.upper_disk, self.config.resources.disk_size_mb)
            else:
                try:
                    waking = dataclasses.replace(shape, kernel_args=tuple(spec.kernel_args) + (boot.TEMPLATE_FLAG,))
                    await self._start_machine(checkpoint.template_restore(waking, state), wake=True)
                    return
                except VMError as exc:
                    self._note(f"restoring the boot template failed ({exc.args[0].splitlines()[0]}); booting cold")
                    failed = self.machine
                    exited = failed.returncode if failed is not None else None  # before our own kill
                    await self._discard_machine()
                    stderr = failed.stderr_text() if failed is not None else ""
                    if snapshot.restore_proves_state_bad(state, exited, stderr):
                        state.unlink(missing_ok=True)
                    if rooted:  # the cold boot's root starts blank, not from what the failed clone wrote
                        make_upper_disk(self.paths.upper_disk, self.config.resources.disk_size_mb)
        await self._start_machine(spec, wake=False)

    def _template_namespace(self):
        """A throwaway namespace with a TAP, for booting a template that has a NIC."""
        from ..net.namespace import SandboxNamespace

        namespace = SandboxNamespace(self.config.network.mtu)
        namespace.create()
        assert namespace.tap_fd is not None
        return namespace.tap_fd, namespace.close

    def _note(self, message: str) -> None:
        self._append_log(f"[matchlock] {message}")

    async def _discard_machine(self) -> None:
        if self.channel is not None:
            await self.channel.aclose()
            self.channel = None
        if self.machine is not None:
            await self.machine.kill()
            self.machine = None

    async def _start_machine(self, spec: MachineSpec, *, wake: bool | bytes) -> None:
        """`wake`: a template's fresh seed (True), or the wake record of a restored snapshot (bytes)."""
        machine = self.machine = Machine(spec)
        try:
            sock = await machine.start()
            trace.mark("boot: QEMU started (and restored)")
            if self.vfs is not None:
                await self._serve_vfs(machine)
            if wake:
                await machine.wake(wake if isinstance(wake, bytes) else os.urandom(boot.WAKE_SIZE))
        except VMError as exc:
            raise VMError(self._boot_failure(str(exc))) from None
        assert machine.pid is not None  # started
        self.tracker.record_process("qemu", machine.pid)
        channel = self.channel = GuestChannel(sock)
        await channel.start()
        trace.mark("boot: woken, channel started")
        if self._proxy_started is not None:
            await self._proxy_started  # the guest config carries the proxy's CA
            trace.mark("boot: proxy serving")
        timeout = boot_timeout()

        async def fail_on_exit() -> None:
            raise _MachineExited(await machine.wait())

        try:
            # The handshake, unless QEMU exits or the boot timeout passes first.
            async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
                watcher = group.create_task(fail_on_exit())
                await channel.handshake(self._guest_config())
                watcher.cancel()
        except TimeoutError:
            raise VMError(self._boot_failure(f"the guest was not ready after {timeout:g} s")) from None
        except ExceptionGroup as failed:
            exited = [exc for exc in failed.exceptions if isinstance(exc, _MachineExited)]
            raise VMError(self._boot_failure(str((exited or failed.exceptions)[0]))) from None
        self.boot_ms = channel.boot_ms
        trace.mark("boot: handshake done (guest configured)")
        trace.guest_phases(channel.guest_info, channel.boot_ms)

    async def _serve_vfs(self, machine: Machine) -> None:
        """Serve the mounts on the VFS port, hot-plugging it into a restored template, which has none.

        Serving before the guest wakes: its agent waits for the mounts before it reports ready.
        """
        assert self.vfs is not None
        if machine.vfs_socket is None:
            try:
                await machine.add_vfs_port()
            except VMError as exc:  # _boot notes it and boots cold, with the port on QEMU's command line
                raise VMError(f"hot-plugging the VFS port failed: {exc}") from None
        vfs_sock, machine.vfs_socket = machine.vfs_socket, None
        assert vfs_sock is not None
        await self.vfs.start(vfs_sock)

    def _boot_failure(self, reason: str) -> str:
        parts = [f"sandbox {self.id} failed to start: {reason}"]
        if self.machine is not None and self.machine.stderr_text():
            parts.append("QEMU said: " + self.machine.stderr_text()[-2000:])
        tail = console_tail(self.console_log)
        if tail:
            # Inline: the sandbox's directory, console log included, is removed with it.
            parts.append(f"last lines of the guest console:\n{tail}")
        return "\n".join(parts)

    # --- exec -----------------------------------------------------------------------

    def prepare_exec(self, spec: ExecSpec) -> PreparedExec:
        """Image defaults first, then the sandbox config, then this call."""
        env = {"PATH": boot.DEFAULT_PATH, **self.image_config.env, **self.config.env, **spec.env}
        if self.network is not None:
            # CA locations, then secret placeholders: they override everything.
            env.update(
                self.network.exec_environment(self.channel.ready_info.get("ca_bundle") if self.channel else None)
            )
        return PreparedExec(
            env=env,
            cwd=spec.working_dir or self.image_config.working_dir or self.config.vfs.workspace or "/",
            user=spec.user or self.image_config.user,
        )

    def start_exec(
        self,
        spec: ExecSpec,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        stdin: bool = False,
        tty: msgs.TerminalSize | None = None,
    ) -> GuestProcess:
        prepared = self.prepare_exec(spec)
        request = msgs.ExecRequest(
            command=spec.command, env=prepared.env, cwd=prepared.cwd, user=prepared.user, stdin=stdin, tty=tty
        )
        validate_exec_request(request)  # fail here, not in the guest
        return GuestProcess(self._channel().open(request.to_wire()), on_stdout, on_stderr)

    async def exec(self, spec: ExecSpec) -> ExecResult:
        """Buffered: run to completion and return the output."""
        out, err = bytearray(), bytearray()
        result = await self.start_exec(spec, on_stdout=out.extend, on_stderr=err.extend).wait()
        return ExecResult(result.exit_code, result.duration_ms, bytes(out), bytes(err), result.error)

    # --- files ------------------------------------------------------------------

    async def write_file(self, path: str, content: bytes, mode: int = 0o644) -> None:
        await files.write_file(self._channel(), path, content, mode)

    async def read_file(self, path: str) -> bytes:
        return await files.read_file(self._channel(), path)

    async def list_files(self, path: str) -> list[msgs.FileInfo]:
        return await files.list_files(self._channel(), path)

    async def ping(self) -> None:
        await files.ping(self._channel())

    def open_stream(self, request: dict) -> GuestStream:
        """A raw agent stream (port forwarding opens one per connection)."""
        return self._channel().open(request)

    async def port_forward(self, specs: Iterable[ForwardSpec], addresses: Iterable[str]) -> PortForwarder:
        """Start host listeners for `[LOCAL:]REMOTE` forwards; returns the running PortForwarder."""
        from .portforward import PortForwarder

        forwarder = PortForwarder(self.open_stream)
        await forwarder.start(list(specs), list(addresses))
        return forwarder

    def _channel(self) -> GuestChannel:
        if self.channel is None or self.closed:
            raise VMError(f"sandbox {self.id} is not running")
        if self.paused:
            raise VMError(f"sandbox {self.id} is paused; fix: matchlock resume {self.id}")
        self.channel.raise_if_broken()
        return self.channel

    # --- health -------------------------------------------------------------------

    async def wait_failure(self, poll: float = 0.5) -> str:
        """Return, only once the sandbox is dead, why: QEMU exited or the agent channel broke.

        Owners of long-lived sandboxes await this beside their work, so a VM
        that dies under them (killed, panicked, powered off) ends the sandbox
        instead of leaving it shown as running.
        """
        machine, channel = self.machine, self.channel
        assert machine is not None and channel is not None  # a created sandbox
        while True:
            code = machine.returncode
            if code is not None:
                return f"the VM stopped unexpectedly (QEMU {_exit_reason(code)})"
            if channel.broken is not None:
                return f"the guest agent stopped answering: {channel.broken}"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    await machine.wait()

    # --- shutdown -----------------------------------------------------------------

    async def aclose(self, *, graceful_timeout: float = 0.0, remove: bool = True, crashed: str = "") -> None:
        """Stop the VM and release everything, recording each step. Idempotent.

        With a grace period the guest first kills its workloads, syncs its
        disks and powers off; otherwise QEMU is told to quit at once. Every
        step runs even when an earlier one fails or this call is cancelled:
        a failed grace ends in SIGKILL, never in a leak. With `remove` the
        sandbox's directory and state go too; otherwise it is left `stopped`
        (`crashed`, with that reason as its last error, when `crashed` says why
        the VM died) with its logs, for `inspect`, `log` and `rm`.
        """
        if self.closed:
            return
        self.closed = True
        tracker = self.tracker
        if crashed:
            self._note(crashed)
        if self.machine is not None:  # a sandbox that failed before its VM started has nothing to stop
            tracker.move(phases.STOPPING, error=crashed or None)
        if any(not disk.readonly for disk in self.config.extra_disks):
            # The guest syncs before it powers off: without that, writes still in its page cache
            # would never reach a volume that outlives the sandbox.
            graceful_timeout = max(graceful_timeout, disks.SYNC_GRACE_SECONDS)
        failed = False
        try:
            if self.machine is not None:
                machine = self.machine
                try:
                    if graceful_timeout > 0 and self.channel is not None and self.channel.broken is None:
                        await self._guest_poweroff(graceful_timeout)
                finally:
                    # A sandbox that is being removed without a grace keeps nothing QEMU could flush
                    # (its upper disk is deleted, a writable volume forces a grace): kill it at once.
                    stopping = (
                        machine.kill()
                        if remove and graceful_timeout <= 0
                        else machine.aclose(timeout=max(graceful_timeout, 2.0))
                    )
                    failed |= not await self._close_step("machine_stop", stopping)
                    trace.mark("close: QEMU stopped")
        finally:
            try:
                # Only now that QEMU is gone may another sandbox write these images.
                failed |= not tracker.cleanup("disks_release", self.disk_holds.close)
                if self.vfs is not None:
                    failed |= not await self._close_step("vfs_close", self.vfs.aclose())
                if self.channel is not None:
                    await self.channel.aclose()
                if self.network is not None:
                    failed |= not await self._close_step("network_close", self.network.aclose())
                trace.mark("close: network closed")
            finally:
                tracker.move(phases.CLEANING)
                failed |= not tracker.cleanup("upper_remove", lambda: self.paths.upper_disk.unlink(missing_ok=True))
                if remove and self.directory.exists():
                    failed |= not tracker.cleanup("state_dir_remove", lambda: shutil.rmtree(self.directory))
                tracker.finish(remove=remove, failed=failed, crashed=bool(crashed))
                trace.mark("close: state recorded")

    async def _close_step(self, step: str, closing: Awaitable[None]) -> bool:
        """Await one release and record its outcome; an error is recorded, not raised, so cleanup goes on."""
        try:
            await closing
        except Exception as exc:  # noqa: BLE001 - record, then go on cleaning
            self.tracker.record(step, f"{type(exc).__name__}: {exc}")
            return False
        self.tracker.record(step)
        return True

    async def _guest_poweroff(self, timeout: float) -> None:
        assert self.channel is not None and self.machine is not None
        if self.paused:
            # Stopped vCPUs would never read the request: the grace would pass for nothing and the
            # guest's unsynced writes to a --disk volume be lost. `docker stop` of a paused container
            # unpauses it too.
            try:
                await checkpoint.resume(self.machine)
                self.paused = False
            except (VMError, ConnectionError, OSError):
                return
        try:
            stream = self.channel.open({"op": msgs.OP_SHUTDOWN})
            async with asyncio.timeout(timeout):
                await self.machine.wait()
            stream.close()
        except (TimeoutError, VMError, ConnectionError):
            pass
