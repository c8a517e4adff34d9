"""The VFS port hot-plugged into a sandbox restored from a boot template, without a VM.

QMP runs against a fake QEMU on a socketpair that receives the descriptor as QEMU would (SCM_RIGHTS);
the guest's side is driven through the agent's HELLO handling and init's port wait with stand-ins.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import types
from pathlib import Path

import pytest

from matchlock.api.events import FileEvent
from matchlock.api.vfs import MountConfig, VFSConfig, VFSInterceptionConfig
from matchlock.guest import agent as guest_agent
from matchlock.guest import init as guest_init
from matchlock.sandbox.vfs import SandboxVFS
from matchlock.vm.machine import VFS_PORT_BUS, Machine
from matchlock.vm.qmp import QMPClient, QMPError
from matchlock.wire.agent import GuestConfig
from matchlock.wire.boot import VFS_PORT_NAME
from matchlock.wire.replies import Fatal, Ready


class FakeQemu:
    """Answers QMP commands on its end of a socketpair; keeps what it got, descriptors included."""

    def __init__(self, sock: socket.socket, fail: str = "") -> None:
        self.sock = sock
        self.fail = fail  # a command to answer with an error
        self.commands: list[dict] = []
        self.fds: list[int] = []

    def _send(self, message: dict) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def serve(self) -> None:
        self._send({"QMP": {"version": {}}})
        buffer = b""
        while True:
            data, fds, _, _ = socket.recv_fds(self.sock, 4096, 4)
            if not data:
                return
            self.fds += fds
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = json.loads(line)
                self.commands.append(command)
                if command["execute"] == self.fail:
                    self._send({"id": command["id"], "error": {"class": "GenericError", "desc": "Bus is full"}})
                else:
                    self._send({"id": command["id"], "return": {}})


async def _connected(fail: str = ""):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu = FakeQemu(theirs, fail)
    serving = asyncio.get_running_loop().run_in_executor(None, qemu.serve)
    client = QMPClient(ours)
    await client.connect()
    return client, qemu, serving


async def _finish(client: QMPClient, qemu: FakeQemu, serving) -> None:
    client.close()
    await serving
    qemu.sock.close()
    for fd in qemu.fds:
        os.close(fd)


async def test_send_fd_hands_over_a_working_descriptor_with_getfd() -> None:
    client, qemu, serving = await _connected()
    try:
        left, right = socket.socketpair()
        with left, right:
            await client.send_fd("vfs", right.fileno())
            assert qemu.commands[-1]["execute"] == "getfd"
            assert qemu.commands[-1]["arguments"] == {"fdname": "vfs"}
            assert len(qemu.fds) == 1
            os.write(qemu.fds[0], b"through the copy")  # QEMU's copy is the same socket
            assert left.recv(100) == b"through the copy"
    finally:
        await _finish(client, qemu, serving)


def _machine(client: QMPClient) -> Machine:
    machine = Machine.__new__(Machine)  # no QEMU: only the QMP client and the VFS socket matter here
    machine.qmp, machine.vfs_socket = client, None
    return machine


async def test_add_vfs_port_adds_a_socket_chardev_and_a_named_port_on_the_existing_bus() -> None:
    client, qemu, serving = await _connected()
    try:
        machine = _machine(client)
        await machine.add_vfs_port()
        getfd, chardev, device = qemu.commands[-3:]
        assert getfd["execute"] == "getfd" and chardev["execute"] == "chardev-add"
        assert chardev["arguments"]["backend"] == {
            "type": "socket",
            "data": {"addr": {"type": "fd", "data": {"str": getfd["arguments"]["fdname"]}}, "server": False},
        }
        assert device["arguments"] == {
            "driver": "virtserialport",
            "id": "vfs",
            "bus": VFS_PORT_BUS,
            "chardev": chardev["arguments"]["id"],
            "name": VFS_PORT_NAME,
        }
        assert machine.vfs_socket is not None
        machine.vfs_socket.sendall(b"to the guest")
        assert os.read(qemu.fds[0], 100) == b"to the guest"  # what QEMU got is the other end
        machine.vfs_socket.close()
    finally:
        await _finish(client, qemu, serving)


async def test_a_refused_device_add_raises_and_keeps_no_socket() -> None:
    client, qemu, serving = await _connected(fail="device_add")
    try:
        machine = _machine(client)
        with pytest.raises(QMPError, match="QMP device_add failed: Bus is full"):
            await machine.add_vfs_port()
        assert machine.vfs_socket is None
    finally:
        await _finish(client, qemu, serving)


def test_guest_config_vfs_flag_round_trips_and_must_be_a_boolean() -> None:
    config = GuestConfig("box", 1, vfs=True)
    assert GuestConfig.parse(config.to_wire()) == config
    assert GuestConfig.parse({"hostname": "box", "time_ns": 1}).vfs is False  # an older host sends none
    with pytest.raises(ValueError, match="'vfs' must be a boolean"):
        GuestConfig.parse({**config.to_wire(), "vfs": 1})


class _Conn:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send_message(self, stream: int, message: dict) -> None:
        self.sent.append(message)


def _agent(start_vfs) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        restored=False, start_vfs=start_vfs, hidden_devices=("/dev/vport0p1",), conn=_Conn(), privileged=False,
        flush_blocking=lambda: None,
    )  # fmt: skip


def test_the_agent_starts_the_daemon_before_ready_and_hides_its_port(monkeypatch) -> None:
    order: list[str] = []
    monkeypatch.setattr(guest_agent, "apply_config", lambda config: order.append("configured") or "")
    agent = _agent(lambda: order.append("vfs started") or "/dev/vport0p2")
    guest_agent.Agent._configure(agent, GuestConfig("box", 1, vfs=True).to_wire())
    assert order == ["vfs started", "configured"]
    assert agent.hidden_devices == ("/dev/vport0p1", "/dev/vport0p2")
    assert agent.conn.sent[-1]["type"] == Ready(0).to_wire()["type"]  # ready only once the mounts are up


def test_the_agent_without_mounts_starts_nothing(monkeypatch) -> None:
    monkeypatch.setattr(guest_agent, "apply_config", lambda config: "")
    agent = _agent(lambda: pytest.fail("no mounts were asked for"))
    guest_agent.Agent._configure(agent, GuestConfig("box", 1).to_wire())
    assert agent.hidden_devices == ("/dev/vport0p1",)


def test_a_second_request_for_mounts_is_fatal(monkeypatch) -> None:
    monkeypatch.setattr(guest_agent, "apply_config", lambda config: "")
    agent = _agent(lambda: "/dev/vport0p2")
    guest_agent.Agent._configure(agent, GuestConfig("box", 1, vfs=True).to_wire())
    with pytest.raises(SystemExit):
        guest_agent.Agent._configure(agent, GuestConfig("box", 1, vfs=True).to_wire())
    assert Fatal.parse(agent.conn.sent[-1]).message.endswith("started its FUSE daemon already")


def test_init_waits_for_the_hot_plugged_port_to_be_named(monkeypatch) -> None:
    answers = iter([None, None, "/dev/vport0p2"])
    monkeypatch.setattr(guest_init, "_device_with", lambda base, attribute, value: next(answers))
    started: list[str] = []
    monkeypatch.setattr("matchlock.guest.fuse_daemon.start", started.append)
    assert guest_init.start_vfs() == "/dev/vport0p2"
    assert started == ["/dev/vport0p2"]


def test_init_gives_up_on_a_port_that_never_appears(monkeypatch) -> None:
    monkeypatch.setattr(guest_init, "_device_with", lambda base, attribute, value: None)
    monkeypatch.setattr(guest_init, "VFS_PORT_TIMEOUT", 0.01)
    with pytest.raises(RuntimeError, match=f"no port named '{VFS_PORT_NAME}' appeared"):
        guest_init.start_vfs()


def _ignore(event: FileEvent) -> None:
    pass


async def test_a_second_start_serves_a_fresh_set_of_providers(tmp_path: Path) -> None:
    """A template boot that failed after it was served is followed by a cold boot: no state carries over."""
    lower = tmp_path / "lower"
    lower.mkdir()
    # Events wanted: the host-side overlay, whose private copy is what must not carry over.
    config = VFSConfig(mounts={"/ovl": MountConfig("overlay", str(lower))}, interception=VFSInterceptionConfig(True))
    vfs = SandboxVFS(config, tmp_path / "sandbox", _ignore)
    upper = tmp_path / "sandbox" / "vfs" / "overlay-0"
    sockets = [socket.socketpair() for _ in range(2)]
    try:
        await vfs.start(sockets[0][1])
        first = vfs.router
        (upper / "left-by-the-failed-guest").write_text("x")
        await vfs.start(sockets[1][1])
        assert vfs.router is not first
        assert upper.is_dir() and not list(upper.iterdir())
    finally:
        await vfs.aclose()
        for ours, _ in sockets:
            ours.close()
    assert not upper.exists()
