"""One sandbox's lifetime: disks, VM, agent channel, exec and files, cleanup.

`Sandbox.create()` either returns a sandbox whose guest reported ready, or
raises after removing everything it made (QEMU process, disks, directory),
with the reason and the tail of the console log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..api.config import DEFAULT_DNS_SERVERS, SandboxConfig, public_config
from ..api.errors import SetupError, VMError
from ..api.image import ImageConfig
from ..api.paths import vms_dir
from ..state import lifecycle as phases
from ..state.store import StateStore
from ..vm import snapshot
from ..vm.accel import choose_accelerator, host_tsc_khz
from ..vm.channel import GuestChannel
from ..vm.machine import Disk, Machine, MachineSpec, console_tail
from ..wire import agent as msgs
from . import files
from .process import ExecResult, GuestProcess, OutputCallback
from .tracking import Tracker

BOOT_TIMEOUT_SECONDS = float(os.environ.get("MATCHLOCK_BOOT_TIMEOUT", "60"))
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(4)


def make_upper_disk(path: Path, size_mb: int) -> None:
    """A sparse ext4 of `size_mb`; no journal (the disk dies with the sandbox)."""
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    proc = subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0",
         "-E", "lazy_itable_init=1,lazy_journal_init=1", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SetupError(f"mke2fs failed for the sandbox disk: {proc.stderr.strip()}; fix: apt-get install e2fsprogs")


@dataclass
class ExecSpec:
    """What to run, after image defaults are applied."""

    command: str
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""


class Sandbox:
    def __init__(
        self, vm_id: str, config: SandboxConfig, directory: Path, image_config: ImageConfig, tracker: Tracker
    ) -> None:
        self.id = vm_id
        self.config = config
        self.directory = directory
        self.image_config = image_config
        self.tracker = tracker
        self.machine: Machine | None = None
        self.channel: GuestChannel | None = None
        self.boot_ms: int | None = None
        self.closed = False
        self.network = None  # SandboxNetwork, unless --no-network
        self.event_listeners: list = []  # called with every api.events event

    @property
    def console_log(self) -> Path:
        return self.directory / "logs" / "vm.log"

    # --- creation -----------------------------------------------------------------

    @property
    def upper_disk(self) -> Path:
        return self.directory / "upper.ext4"

    @classmethod
    async def create(
        cls,
        config: SandboxConfig,
        *,
        store: StateStore | None = None,
        vm_id: str | None = None,
        runtime_disk: Path | None = None,
    ) -> Sandbox:
        """Boot a sandbox, recording it in `store` when given.

        `runtime_disk` replaces the guest runtime (tests boot hostile guests).
        """
        # Imported here so `matchlock exec` and friends never pay for them.
        from ..image.runtime import ensure_runtime_disk
        from ..image.store import ImageStore
        from ..kernel import resolve as resolve_kernel

        config.validate()
        image = ImageStore().resolve(config.image)
        kernel = resolve_kernel()
        custom_runtime = runtime_disk
        runtime_disk = runtime_disk or ensure_runtime_disk()
        vm_id = vm_id or new_vm_id()
        directory = store.vm_dir(vm_id) if store is not None else vms_dir() / vm_id
        tracker = Tracker(store, vm_id)
        tracker.register(config.image, public_config(config))
        sandbox = cls(vm_id, config, directory, image.config.merged(config.image_config), tracker)
        try:
            (directory / "logs").mkdir(parents=True, mode=0o700)
            directory.chmod(0o700)
            sandbox.console_log.touch(mode=0o600)
            upper = sandbox.upper_disk
            tracker.resources(
                console_log=str(sandbox.console_log), upper_disk=str(upper), image_disk=str(image.lower_path)
            )
            make_upper_disk(upper, config.resources.disk_size_mb)
            machine_network = await sandbox._start_network()
            spec = MachineSpec(
                name=vm_id,
                kernel=kernel.path,
                initrd=kernel.initrd,
                kernel_args=tuple(kernel.cmdline),
                acpi=kernel.acpi,
                disks=(
                    Disk(runtime_disk, "runtime", readonly=True),
                    Disk(image.lower_path, "lower", readonly=True),
                    Disk(upper, "upper", ephemeral=True),
                ),
                console_log=sandbox.console_log,
                accel=choose_accelerator(),
                tsc_khz=host_tsc_khz(),
                cpus=config.resources.cpus,
                memory_mb=config.resources.memory_mb,
                network=machine_network,
            )
            tracker.move(phases.CREATED)
            tracker.move(phases.STARTING)
            await sandbox._boot(spec, use_template=custom_runtime is None)
            tracker.move(phases.RUNNING)
        except BaseException as exc:
            failed = phases.START_FAILED if tracker.phase == phases.STARTING else phases.CREATE_FAILED
            tracker.move(failed, error=str(exc) or type(exc).__name__)
            await sandbox.close(remove=True)
            raise
        return sandbox

    async def _start_network(self):
        """Namespace, policy and proxy (recorded before they exist); None with --no-network."""
        if self.config.network.no_network:
            return None
        from .network import SandboxNetwork  # sandboxes without a network never import the proxy

        self.network = SandboxNetwork(self.config.network, self._emit_event)
        self.tracker.resources(network="private namespace held by the owner and QEMU")
        await self.network.start()
        self.tracker.resources(netns_inode=self.network.namespace.inode)
        return self.network.machine_network()

    def _emit_event(self, event) -> None:
        try:
            with open(self.console_log, "a") as log:
                log.write(event.log_line() + "\n")
        except OSError:
            pass
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
        )

    async def _boot(self, spec: MachineSpec, *, use_template: bool = True) -> None:
        """Start from a boot template when possible (much faster), else boot cold."""
        if use_template and snapshot.enabled():
            try:
                state = await snapshot.TemplateCache().ensure(spec, self._template_namespace)
            except Exception as exc:  # noqa: BLE001 - a template is an optimisation, never a requirement
                self._note(f"boot template unavailable ({exc}); booting cold")
            else:
                restore = dataclasses.replace(
                    spec, incoming=state, kernel_args=tuple(spec.kernel_args) + (snapshot.TEMPLATE_FLAG,)
                )
                try:
                    await self._start_machine(restore, wake=True)
                    return
                except VMError as exc:
                    self._note(f"restoring the boot template failed ({exc.args[0].splitlines()[0]}); booting cold")
                    await self._discard_machine()
                    state.unlink(missing_ok=True)
        await self._start_machine(spec, wake=False)

    def _template_namespace(self):
        """A throwaway namespace with a TAP, for booting a template that has a NIC."""
        from ..net.namespace import SandboxNamespace

        namespace = SandboxNamespace(self.config.network.mtu)
        namespace.create()
        wrapper, fds = namespace.qemu_wrapper()
        return tuple(wrapper), fds, namespace.close

    def _note(self, message: str) -> None:
        try:
            with open(self.console_log, "a") as log:
                log.write(f"[matchlock] {message}\n")
        except OSError:
            pass

    async def _discard_machine(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.machine is not None:
            await self.machine.kill()
            self.machine = None

    async def _start_machine(self, spec: MachineSpec, *, wake: bool) -> None:
        self.machine = Machine(spec)
        try:
            sock = await self.machine.start()
            if wake:
                await self.machine.wake(os.urandom(snapshot.WAKE_SIZE))
        except VMError as exc:
            raise VMError(self._boot_failure(str(exc))) from None
        self.tracker.record_process("qemu", self.machine.pid)
        self.channel = GuestChannel(sock)
        await self.channel.start()
        handshake = asyncio.ensure_future(self.channel.handshake(self._guest_config()))
        exited = asyncio.ensure_future(self.machine.wait())
        try:
            done, _ = await asyncio.wait({handshake, exited}, timeout=BOOT_TIMEOUT_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            exited.cancel()
            if not handshake.done():
                handshake.cancel()
            elif not handshake.cancelled():
                handshake.exception()  # mark retrieved; raised below when relevant
        if handshake in done:
            try:
                handshake.result()
            except Exception as exc:  # noqa: BLE001
                raise VMError(self._boot_failure(str(exc))) from None
            self.boot_ms = self.channel.boot_ms
            return
        if exited in done and not exited.cancelled():
            raise VMError(self._boot_failure(f"the VM stopped during boot (QEMU exit code {exited.result()})"))
        raise VMError(self._boot_failure(f"the guest was not ready after {BOOT_TIMEOUT_SECONDS:g} s"))

    def _boot_failure(self, reason: str) -> str:
        parts = [f"sandbox {self.id} failed to start: {reason}"]
        if self.machine is not None and self.machine.stderr_text():
            parts.append("QEMU said: " + self.machine.stderr_text()[-2000:])
        tail = console_tail(self.console_log)
        if tail:
            parts.append(f"last lines of {self.console_log}:\n{tail}")
        return "\n".join(parts)

    # --- exec -----------------------------------------------------------------------

    def prepare_exec(self, spec: ExecSpec) -> dict[str, object]:
        """Image defaults first, then the sandbox config, then this call."""
        env = {"PATH": DEFAULT_PATH, **self.image_config.env, **self.config.env, **spec.env}
        if self.network is not None:
            # CA locations, then secret placeholders: they override everything.
            env.update(
                self.network.exec_environment(self.channel.ready_info.get("ca_bundle") if self.channel else None)
            )
        return {
            "env": env,
            "cwd": spec.working_dir or self.image_config.working_dir or "/",
            "user": spec.user or self.image_config.user,
        }

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
            command=spec.command,
            env=prepared["env"],  # type: ignore[arg-type]
            cwd=prepared["cwd"],  # type: ignore[arg-type]
            user=prepared["user"],  # type: ignore[arg-type]
            stdin=stdin,
            tty=tty,
        )
        msgs.ExecRequest.parse(request.to_wire())  # fail here, not in the guest
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

    def open_stream(self, request: dict):
        """A raw agent stream (port forwarding opens one per connection)."""
        return self._channel().open(request)

    async def port_forward(self, specs, addresses):
        """Start host listeners for `[LOCAL:]REMOTE` forwards; returns the running PortForwarder."""
        from .portforward import PortForwarder

        forwarder = PortForwarder(self.open_stream)
        await forwarder.start(list(specs), list(addresses))
        return forwarder

    def _channel(self) -> GuestChannel:
        if self.channel is None or self.closed:
            raise VMError(f"sandbox {self.id} is not running")
        self.channel.raise_if_broken()
        return self.channel

    # --- shutdown -----------------------------------------------------------------

    async def close(self, *, graceful_timeout: float = 0.0, remove: bool = True) -> None:
        """Stop the VM and release everything, recording each step. Safe to call twice.

        With a grace period the guest first kills its workloads, syncs its
        disks and powers off; otherwise QEMU is told to quit at once. With
        `remove` the sandbox's directory and state go too; otherwise it is
        left `stopped` with its logs, for `inspect`, `log` and `rm`.
        """
        if self.closed:
            return
        self.closed = True
        tracker = self.tracker
        tracker.move(phases.STOPPING)
        failed = False
        try:
            if self.machine is not None:
                if graceful_timeout > 0 and self.channel is not None and self.channel.broken is None:
                    await self._guest_poweroff(graceful_timeout)
                try:
                    await self.machine.stop(timeout=max(graceful_timeout, 2.0))
                    tracker.record("machine_stop")
                except Exception as exc:  # noqa: BLE001 - record, then go on cleaning
                    tracker.record("machine_stop", f"{type(exc).__name__}: {exc}")
                    failed = True
            if self.channel is not None:
                await self.channel.close()
            if self.network is not None:
                try:
                    await self.network.close()
                    tracker.record("network_close")
                except Exception as exc:  # noqa: BLE001
                    tracker.record("network_close", f"{type(exc).__name__}: {exc}")
                    failed = True
        finally:
            tracker.move(phases.CLEANING)
            failed |= not tracker.cleanup("upper_remove", lambda: self.upper_disk.unlink(missing_ok=True))
            if remove and self.directory.exists():
                failed |= not tracker.cleanup("state_dir_remove", lambda: shutil.rmtree(self.directory))
            tracker.finish(remove=remove, failed=failed)

    async def _guest_poweroff(self, timeout: float) -> None:
        assert self.channel is not None and self.machine is not None
        try:
            stream = self.channel.open({"op": msgs.OP_SHUTDOWN})
            await asyncio.wait_for(self.machine.wait(), timeout=timeout)
            stream.close()
        except (TimeoutError, VMError, ConnectionError):
            pass
