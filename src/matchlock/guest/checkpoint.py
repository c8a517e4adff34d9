"""The agent's side of snapshots: park, wake, and take over a new host (wire/checkpoint.py).

While parked the agent does nothing but read the raw port, so the host can
save the machine at a point where neither side has a frame in flight. Frames
the old host sent just before the wake record (a CLOSE split from its OPEN)
are passed back to the old channel, or dropped when a new host takes over.
"""

from __future__ import annotations

import os
import time

from ..wire import agent as msgs
from ..wire.checkpoint import WAKE_MAGIC, WAKE_RECORD_SIZE, decode_wake
from ..wire.mux import Connection, Role
from ..wire.replies import Result
from . import syscalls


class _Discard:
    """The channel of a stream whose host is gone: its process runs on, its output goes nowhere."""

    def send_window(self, stream: int) -> int:
        return 1 << 20  # keep reading output, so the process never blocks on a full pipe

    def send_data(self, *args) -> None:
        pass

    send_message = close_stream = reset_stream = consumed = end_channel = send_data

    def is_open(self, stream: int) -> bool:
        return False


DISCARD = _Discard()


def read_wake(fd: int) -> tuple[bytes, bytes]:
    """(bytes before the record, the record), reading never past the record's end."""
    buffer = b""
    while True:
        start = buffer.find(WAKE_MAGIC)
        if start >= 0:
            need = start + WAKE_RECORD_SIZE - len(buffer)
        else:
            need = max(1, WAKE_RECORD_SIZE - len(buffer))
        if need <= 0:
            return buffer[:start], buffer[start:]
        chunk = os.read(fd, need)
        if not chunk:
            raise ConnectionError("the host went away while the guest was parked")
        buffer += chunk


def park(agent, stream: int) -> None:
    """Answer the checkpoint, wait for the wake record, then continue or take over a new host."""
    agent.conn.send_message(stream, Result().to_wire())
    agent.conn.close_stream(stream)
    agent.flush_blocking()
    before, record = read_wake(agent.port)
    new_host, time_ns, seed = decode_wake(record)
    syscalls.reseed_random(seed)
    syscalls.set_realtime_clock(time_ns)
    if not new_host:
        for event in agent.conn.receive_data(before):
            agent._dispatch(event)
        return
    for handler in agent.handlers.values():
        handler.sink = DISCARD
    agent.handlers = {}
    agent.restored = True
    agent.conn = Connection(Role.GUEST)
    agent.conn.send_hello({"restored": True, "hello_ms": int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1000)})
    agent.flush_blocking()


def apply_restored_config(config: msgs.GuestConfig, etc, render_hosts, system_bundles) -> str:
    """A new host's settings for a restored clone: its disks are mounted and its network is the same,
    so only the clock, names and the CA change. Returns the system bundle holding the new CA.

    `etc` is an `etcfiles.EtcFiles`: nothing is written into a VFS mount (a clone's mounts are up)."""
    import _socket

    syscalls.set_realtime_clock(config.time_ns)
    _socket.sethostname(config.hostname)
    etc.write("/etc/hostname", config.hostname + "\n")
    etc.write("/etc/hosts", render_hosts(config.hostname, config.extra_hosts))
    return replace_ca(config.ca_certificate, etc, system_bundles)


def replace_ca(pem: str, etc, system_bundles) -> str:
    """Swap the sandbox CA for `pem` in its own file and in the system bundle ("" removes it)."""
    ca_file = etc.ca_path()
    try:
        with open(ca_file) as f:
            old = f.read()
    except OSError:
        old = ""
    if pem:
        etc.write(ca_file, pem)
    elif old:
        os.unlink(ca_file)
    alone = etc.ca_alone(ca_file) if pem else ""
    for bundle in system_bundles:
        if not os.path.isfile(bundle):
            continue
        path = os.path.realpath(bundle)
        if etc.on_mount(path):
            return alone  # the user's mounted bundle, never changed
        try:
            with open(path) as f:
                text = f.read()
            if old:
                text = text.replace("\n" + old, "")
            with open(path, "w") as f:
                f.write(text + ("\n" + pem if pem else ""))
        except OSError:
            continue  # a read-only or odd bundle: the CA file and env vars still work
        return bundle if pem else ""
    return alone
