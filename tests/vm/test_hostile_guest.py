"""A hostile guest on the real kernel, QEMU and virtio-serial port.

Each test boots a runtime disk whose /init is a deliberately misbehaving
agent (written with the same interpreter and wire code as the real one). The
host must fail fast with a clear error naming the violation, never hang, and
still clean up. `asyncio.wait_for` bounds are hang detectors, not timings.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from matchlock.api.config import SandboxConfig
from matchlock.api.errors import GuestProtocolError, VMError
from matchlock.image.runtime import build_disk
from matchlock.sandbox.sandbox import ExecSpec, Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

HOSTILE_INIT = """#!/usr/bin/python3.11 -IS
import os, sys, time
sys.path.insert(0, "/opt/matchlock")
from matchlock.guest import syscalls
from matchlock.guest.init import find_port
from matchlock.wire.boot import AGENT_PORT_NAME
from matchlock.wire.frames import HEADER, FrameKind
from matchlock.wire.mux import Connection, Role, StreamOpened
from matchlock.wire.replies import Exited, Ready, Started

syscalls.mount("sysfs", "/sys", "sysfs")
fd = os.open(find_port(AGENT_PORT_NAME), os.O_RDWR)
mode = "MODE"

def write_all(data):
    view = memoryview(data)
    while view:  # virtio-serial takes at most 32 KiB per write
        view = view[os.write(fd, view):]

def handshake():
    conn = Connection(Role.GUEST)
    conn.send_hello({})
    write_all(conn.data_to_send())
    while not conn.handshake_complete:
        conn.receive_data(os.read(fd, 65536))
    conn.send_message(0, Ready(1).to_wire())
    write_all(conn.data_to_send())
    return conn

if mode == "garbage":
    write_all(bytes(range(256)) * 16)
elif mode == "oversized":
    write_all(HEADER.pack(0xFFFFFFF0, FrameKind.DATA, 1))
elif mode == "bad-version":
    hello = b'{"protocol":"matchlock-wire","version":99,"role":"guest"}'
    write_all(HEADER.pack(len(hello), FrameKind.HELLO, 0) + hello)
elif mode == "exec-garbage":
    conn = handshake()
    while True:
        if any(isinstance(e, StreamOpened) for e in conn.receive_data(os.read(fd, 65536))):
            break
    write_all(b"\\x00\\x00\\x00\\x05\\x03\\x00\\x00\\x00\\x01ABCDE" + os.urandom(64))
elif mode == "exec-flood":
    conn = handshake()
    while True:
        events = conn.receive_data(os.read(fd, 65536))
        opened = [e for e in events if isinstance(e, StreamOpened)]
        if opened:
            break
    conn.send_message(opened[0].stream, Started(1).to_wire())  # a well-formed start, then the flood
    write_all(conn.data_to_send())
    # DATA far beyond the window the host granted (256 KiB), bypassing the codec's checks.
    chunk = HEADER.pack(65537, FrameKind.DATA, opened[0].stream) + b"\\x01" + b"x" * 65536
    for _ in range(8):
        write_all(chunk)
elif mode == "exec-out-of-order":
    conn = handshake()
    while True:  # answer every exec with an exit status but no 'started' before it
        for event in conn.receive_data(os.read(fd, 65536)):
            if isinstance(event, StreamOpened):
                conn.send_message(event.stream, Exited(0).to_wire())
                conn.close_stream(event.stream)
        write_all(conn.data_to_send())
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def hostile_disks(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    disks = {}
    for mode in ("garbage", "oversized", "bad-version", "exec-garbage", "exec-flood", "exec-out-of-order", "silent"):
        disk = root / f"{mode}.erofs"
        build_disk(disk, HOSTILE_INIT.replace("MODE", mode))
        disks[mode] = disk
    return disks


def boot(mode, disks):
    return Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin"), runtime_disk=disks[mode])


def no_qemu_left(state_dir) -> bool:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{state_dir}"], capture_output=True, text=True)
    return out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("garbage", "wire protocol"),
        ("oversized", "exceeds"),
        ("bad-version", "version 99"),
    ],
)
def test_broken_handshake_fails_fast_and_cleans_up(mode, message, hostile_disks, state_dir):
    with pytest.raises(VMError, match=message) as info:
        asyncio.run(asyncio.wait_for(boot(mode, hostile_disks), 60))
    assert "failed to start" in str(info.value)
    assert not any((state_dir / "vms").glob("vm-*"))
    assert no_qemu_left(state_dir)


def test_silent_guest_times_out_with_console_tail(hostile_disks, state_dir, monkeypatch):
    monkeypatch.setattr("matchlock.sandbox.sandbox.BOOT_TIMEOUT_SECONDS", 8.0)
    with pytest.raises(VMError, match="not ready after 8 s"):
        asyncio.run(asyncio.wait_for(boot("silent", hostile_disks), 60))
    assert no_qemu_left(state_dir)


@pytest.mark.parametrize(("mode", "message"), [("exec-garbage", "wire protocol"), ("exec-flood", "granted")])
def test_garbage_during_exec_fails_the_exec_not_the_host(mode, message, hostile_disks, state_dir):
    async def scenario():
        box = await asyncio.wait_for(boot(mode, hostile_disks), 60)
        stalled = asyncio.Event()  # a consumer that never catches up: no window goes back

        async def slow_reader(_data):
            await stalled.wait()

        try:
            with pytest.raises(GuestProtocolError, match=message):
                process = box.start_exec(ExecSpec("true"), on_stdout=slow_reader)
                await asyncio.wait_for(process.wait(), 60)
            with pytest.raises(GuestProtocolError):
                box.start_exec(ExecSpec("true"))  # the channel stays marked broken
        finally:
            await asyncio.wait_for(box.aclose(), 30)

    asyncio.run(scenario())
    assert not any((state_dir / "vms").glob("vm-*"))
    assert no_qemu_left(state_dir)


def test_reply_out_of_grammar_fails_that_exec_naming_the_violation(hostile_disks, state_dir):
    async def scenario():
        box = await asyncio.wait_for(boot("exec-out-of-order", hostile_disks), 60)
        try:
            for _ in range(2):  # a reply out of order fails the one operation, not the channel
                with pytest.raises(GuestProtocolError, match="sent 'exit' on an exec stream before 'started'"):
                    await asyncio.wait_for(box.start_exec(ExecSpec("true")).wait(), 60)
        finally:
            await asyncio.wait_for(box.aclose(), 30)

    asyncio.run(scenario())
    assert not any((state_dir / "vms").glob("vm-*"))
    assert no_qemu_left(state_dir)
