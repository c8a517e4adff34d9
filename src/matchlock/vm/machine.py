"""One QEMU `-M microvm` process: command line, launch, QMP, shutdown.

The agent channel and QMP use socketpairs whose guest ends are handed to
QEMU as inherited file descriptors, so there is no socket file to race on or
clean up, and QEMU is connected before the guest runs. QEMU is started with
a parent-death signal (setpriv --pdeathsig KILL): if the process that owns
the sandbox dies, even by SIGKILL, QEMU dies with it. It runs in a session of
its own, so signals from the terminal (Ctrl-C) reach only the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..api.errors import SetupError, UsageError, VMError
from ..wire.boot import AGENT_PORT_NAME, VFS_PORT_NAME
from .accel import AccelChoice
from .qmp import QMPClient, QMPError

QEMU = "qemu-system-x86_64"
STDERR_LIMIT = 64 * 1024  # enough for any startup error; more would only grow host memory
# TCG's translation buffer (MiB; 0: QEMU's 1 GiB reserve). It keeps every page it ever wrote code to:
# 24-36 MiB per idle sandbox. A full buffer is flushed and refilled, and the guest agent's working
# set is about that size: 16 MiB made `exec -- true` 2-3x slower, 8 MiB 4x, 32 MiB saved only 4 MiB
# (benchmarks/bench_density.py). So the default stays; $MATCHLOCK_TCG_BUFFER_MB caps it on tight hosts.
TCG_BUFFER_MB = 0
TCG_BUFFER_ENV = "MATCHLOCK_TCG_BUFFER_MB"
# The bus of the one `virtio-serial-device` (it has no id, so QEMU names its bus after the bus type).
VFS_PORT_BUS = "virtio-serial-bus.0"
BASE_CMDLINE = ("console=ttyS0", "panic=-1", "quiet", "reboot=t", "mitigations=off", "8250.nr_uarts=1")


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str
    readonly: bool = False
    ephemeral: bool = False  # contents are discarded with the sandbox: skip host flushes


@dataclass(frozen=True)
class MachineNetwork:
    """A virtio-net NIC on a TAP in the sandbox's network namespace, given to QEMU as a descriptor.

    QEMU itself stays in the host's namespaces, as the invoking user, with no capabilities."""

    mac: str
    tap_fd: int


@dataclass(frozen=True)
class MachineSpec:
    name: str
    kernel: Path
    kernel_args: tuple[str, ...]
    disks: tuple[Disk, ...]
    console_log: Path
    accel: AccelChoice
    cpus: float = 1.0
    memory_mb: int = 512
    initrd: Path | None = None
    acpi: bool = False
    tsc_khz: int | None = None
    network: MachineNetwork | None = None
    incoming: Path | None = None  # restore this saved state instead of booting
    vfs_port: bool = False  # a second virtio-serial port, for the VFS channel (sandboxes with mounts)
    # Guest RAM (vm/checkpoint.py): a shared memfd (cold boots), which a snapshot copies out; or private:
    # anonymous memory, or `ram_file` mapped copy-on-write (a template's or a snapshot's RAM: pages load
    # on touch and are shared with every sandbox mapping the same file).
    ram_file: Path | None = None
    ram_private: bool = False
    ignore_shared: bool = False  # -incoming from a snapshot saved with x-ignore-shared
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def vcpus(self) -> int:
        return max(1, math.ceil(self.cpus))


def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise SetupError(f"{QEMU} not found; fix: apt-get install qemu-system-x86")
    return path


def build_argv(spec: MachineSpec, agent_fd: int, qmp_fd: int, vfs_fd: int | None = None) -> list[str]:
    machine = ("microvm" if spec.acpi else "microvm,acpi=off") + ",memory-backend=ram"
    cmdline = list(BASE_CMDLINE)
    if spec.accel.name == "tcg" and spec.tsc_khz:
        cmdline.append(f"tsc_early_khz={spec.tsc_khz}")
        # Skip the emulated delay-loop calibration (~0.25 s under TCG): with
        # a known TSC the loops per jiffy follow directly (HZ=250 in our kernel).
        cmdline.append(f"lpj={spec.tsc_khz * 1000 // 250}")
        if not spec.acpi:
            # Emulated LAPIC timer calibration costs ~0.25 s of every boot; our
            # kernel then uses the PIT as its clock event device (broadcast on
            # SMP). Debian's kernel hangs without the LAPIC timer on microvm.
            cmdline.append("noapictimer")
        # TCG's vCPUs share the host's clock, but their TSCs fail the kernel's
        # sync check, which would leave timekeeping on 4 ms jiffies.
        cmdline.append("tsc=reliable")
    cmdline += spec.kernel_args
    argv = [
        find_qemu(),
        "-name", f"{spec.name},process=matchlock-{spec.name}",
        "-accel", _accel(spec),
        "-cpu", "host" if spec.accel.name == "kvm" else "max",
        "-M", machine,
        "-m", str(spec.memory_mb),
        "-object", _ram_backend(spec),
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel),
        "-append", " ".join(cmdline),
        "-chardev", f"file,id=console,path={spec.console_log},append=on",
        "-serial", "chardev:console",
    ]  # fmt: skip
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    for index, disk in enumerate(spec.disks):
        options = [f"id=disk{index}", f"file={disk.path}", "format=raw", "if=none"]
        if disk.readonly:
            options.append("readonly=on")
        if disk.ephemeral:
            options.append("cache=unsafe")
        argv += ["-drive", ",".join(options), "-device", f"virtio-blk-device,drive=disk{index},serial={disk.serial}"]
    argv += [
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,fd={agent_fd}",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-rng-device",
    ]  # fmt: skip
    if vfs_fd is not None:
        argv += [
            "-chardev", f"socket,id=vfs,fd={vfs_fd}",
            "-device", f"virtserialport,chardev=vfs,name={VFS_PORT_NAME}",
        ]  # fmt: skip
    if spec.network is not None:
        argv += [
            "-netdev", f"tap,id=net0,fd={spec.network.tap_fd}",
            "-device", f"virtio-net-device,netdev=net0,mac={spec.network.mac}",
        ]  # fmt: skip
    if spec.incoming is not None:
        argv += ["-incoming", "defer"]  # loaded over QMP (Machine.start), after any capability it needs
    return argv + list(spec.extra_args)


def tcg_buffer_mb() -> int:
    """$MATCHLOCK_TCG_BUFFER_MB, else TCG_BUFFER_MB; 0 means QEMU's own default."""
    text = os.environ.get(TCG_BUFFER_ENV, "").strip()
    if not text:
        return TCG_BUFFER_MB
    if not text.isdigit():
        raise UsageError(
            f"{TCG_BUFFER_ENV}={text!r} is not a size in MiB; fix: a whole number such as 32 (0: QEMU's default)"
        )
    return int(text)


def _accel(spec: MachineSpec) -> str:
    if spec.accel.name != "tcg":
        return spec.accel.name
    size = tcg_buffer_mb()
    return f"tcg,tb-size={size}" if size else "tcg"


def _ram_backend(spec: MachineSpec) -> str:
    size = f"id=ram,size={spec.memory_mb}M"
    if spec.ram_file is not None:
        return f"memory-backend-file,{size},mem-path={spec.ram_file},share=off"
    if spec.ram_private:
        return f"memory-backend-ram,{size}"
    return f"memory-backend-memfd,{size},share=on"


class _QemuProcess(asyncio.SubprocessProtocol):
    """Keeps the head of QEMU's stderr (why it failed) as it arrives: no reader task to supervise."""

    def __init__(self) -> None:
        self.stderr = bytearray()
        self.exited = asyncio.Event()
        self.finished = asyncio.Event()  # exited, and every pipe closed

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.stderr += data[: max(0, STDERR_LIMIT - len(self.stderr))]

    def process_exited(self) -> None:
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finished.set()


class Machine:
    """One QEMU process. `aclose()` stops it (gracefully when it can) and always releases it; `kill()` at once."""

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.qmp: QMPClient | None = None
        self.agent_socket: socket.socket | None = None
        self.vfs_socket: socket.socket | None = None  # host end of the VFS port, with `spec.vfs_port`
        self._transport: asyncio.SubprocessTransport | None = None
        self._process = _QemuProcess()

    @property
    def pid(self) -> int | None:
        return self._transport.get_pid() if self._transport else None

    @property
    def returncode(self) -> int | None:
        return self._transport.get_returncode() if self._transport else None

    @property
    def running(self) -> bool:
        return self._transport is not None and self._transport.get_returncode() is None

    async def start(self) -> socket.socket:
        """Launch QEMU; returns the host end of the agent channel."""
        agent_host, agent_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_host, qmp_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        vfs_guest = None
        if self.spec.vfs_port:
            self.vfs_socket, vfs_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        vfs_fds = (vfs_guest.fileno(),) if vfs_guest is not None else ()
        argv = build_argv(self.spec, agent_guest.fileno(), qmp_guest.fileno(), *vfs_fds)
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise SetupError("setpriv not found; fix: apt-get install util-linux")
        network = self.spec.network
        extra_fds: tuple[int, ...] = (network.tap_fd,) if network is not None else ()
        try:
            # setpriv sets the parent-death signal, which survives the exec into QEMU.
            self._transport, _ = await asyncio.get_running_loop().subprocess_exec(
                lambda: self._process,
                setpriv, "--pdeathsig", "KILL", "--", *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(agent_guest.fileno(), qmp_guest.fileno(), *vfs_fds, *extra_fds),
                # Out of the terminal's process group: Ctrl-C is for the CLI, which then
                # cancels the command and closes the VM itself; pdeathsig still ties QEMU to us.
                start_new_session=True,
            )  # fmt: skip
        finally:
            agent_guest.close()
            qmp_guest.close()
            if vfs_guest is not None:
                vfs_guest.close()
        self.qmp = QMPClient(qmp_host)
        self.agent_socket = agent_host
        try:
            async with asyncio.timeout(30):
                await self.qmp.connect()
        except (TimeoutError, QMPError, ConnectionError) as exc:
            await self.kill()
            raise VMError(f"QEMU did not start: {self.stderr_text() or exc}") from None
        if self.spec.incoming is not None:
            if self.spec.ignore_shared:  # QEMU 7.2 has no -global for a capability
                await self.qmp.execute(
                    "migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}]
                )
            try:
                await self._load(self.spec.incoming)
            except (OSError, QMPError) as exc:
                await self.kill()
                raise VMError(f"restoring {self.spec.incoming} failed: {exc}") from None
            await self._finish_restore()
        return agent_host

    async def _load(self, state: Path) -> None:
        """Start loading `state`, which QEMU reads itself (`fd:`): no shell or `cat` to start first."""
        assert self.qmp is not None
        with open(state, "rb") as stream:
            await self.qmp.send_fd("incoming", stream.fileno())
        await self.qmp.execute("migrate-incoming", uri="fd:incoming")

    async def _finish_restore(self) -> None:
        """Wait until the saved state is loaded, then let the restored guest run."""
        assert self.qmp is not None
        deadline = asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < deadline:
            status = (await self.qmp.execute("query-status"))["status"]
            if status == "running":
                return
            migration = (await self.qmp.execute("query-migrate")).get("status")
            if migration == "completed" and status == "paused":
                await self.qmp.execute("cont")  # the template was saved stopped
                continue
            if migration == "failed" or not self.running:
                break
            await asyncio.sleep(0.005)
        raise VMError(f"restoring the boot template failed: {self.stderr_text() or 'migration did not finish'}")

    async def add_vfs_port(self) -> None:
        """Hot-plug the VFS port (`vfs_socket` is then its host end) into a machine restored without one.

        Only after the restore: a boot template is saved without the port, and the restored device set
        must be the saved one. The template's virtio-serial device has free slots (max_ports=31).
        """
        assert self.qmp is not None and self.vfs_socket is None
        host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                await self.qmp.send_fd("vfs", guest.fileno())
            finally:
                guest.close()  # QEMU has its own copy, or none
            socket_backend = {"addr": {"type": "fd", "data": {"str": "vfs"}}, "server": False}
            await self.qmp.execute("chardev-add", id="vfs", backend={"type": "socket", "data": socket_backend})
            await self.qmp.execute(
                "device_add", driver="virtserialport", id="vfs", bus=VFS_PORT_BUS, chardev="vfs", name=VFS_PORT_NAME
            )
        except BaseException:
            host.close()
            raise
        self.vfs_socket = host

    async def wake(self, seed: bytes) -> None:
        """A restored guest waits for this: fresh entropy, then it continues its boot."""
        assert self.agent_socket is not None
        await asyncio.get_running_loop().sock_sendall(self.agent_socket, seed)

    def stderr_text(self) -> str:
        return self._process.stderr.decode(errors="replace").strip()

    async def wait(self) -> int:
        assert self._transport is not None
        await self._process.exited.wait()
        # The last words on stderr may still be in the pipe; a child of QEMU
        # can hold it open, so wait only briefly.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await self._process.finished.wait()
        code = self._transport.get_returncode()
        assert code is not None
        return code

    async def aclose(self, *, timeout: float = 2.0) -> None:
        """Ask QEMU to quit and give it `timeout` seconds, then SIGKILL. Always releases; idempotent.

        A failed or cancelled grace still ends with QEMU killed and the
        sockets closed: failing to be graceful is not failing to close.
        """
        try:
            if self.running:
                with contextlib.suppress(TimeoutError, QMPError, ConnectionError):
                    async with asyncio.timeout(max(timeout, 0.1)):
                        if self.qmp is not None:
                            await self.qmp.execute("quit")
                        await self.wait()
        finally:
            self._signal_kill()
            self._release()
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL now, reap, release. Idempotent."""
        self._signal_kill()
        if self._transport is not None:
            await self.wait()
        self._release()

    def _signal_kill(self) -> None:
        if self.running:
            assert self._transport is not None
            with contextlib.suppress(ProcessLookupError):
                self._transport.send_signal(signal.SIGKILL)

    def _release(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.agent_socket is not None:
            self.agent_socket.close()
        if self.vfs_socket is not None:
            self.vfs_socket.close()
        if self._transport is not None and not self.running:
            self._transport.close()


def console_tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
