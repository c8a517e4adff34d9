"""What the guest does ahead of a start so a restored sandbox skips it: the network, the read-only /sys, the stamps."""

from __future__ import annotations

import asyncio
import io

import pytest
from fake_guest import CONFIG, accept

from matchlock.api.network import DEFAULT_MTU
from matchlock.guest import agent, confine, init, syscalls, timing
from matchlock.net import namespace
from matchlock.sandbox.process import GuestProcess
from matchlock.util import trace
from matchlock.wire import boot
from matchlock.wire.agent import ExecRequest, GuestNetwork
from matchlock.wire.mux import HelloReceived
from matchlock.wire.replies import Exited, Ready

USUAL = (boot.GUEST_INTERFACE, boot.GUEST_ADDRESS, boot.GUEST_PREFIX_LENGTH, boot.GUEST_GATEWAY, boot.GUEST_MTU)


def test_the_usual_network_is_the_one_the_host_builds() -> None:
    # A template configures these before its snapshot: they must be what the host asks for by default.
    assert (boot.GUEST_ADDRESS, boot.GUEST_GATEWAY) == (namespace.GUEST_ADDRESS, namespace.GATEWAY)
    assert (boot.GUEST_PREFIX_LENGTH, boot.GUEST_MTU) == (namespace.PREFIX_LENGTH, DEFAULT_MTU)


@pytest.fixture
def net_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    monkeypatch.setattr(agent.netconfig, "configure_interface", lambda *a: calls.append(("configure", *a)))
    monkeypatch.setattr(agent.netconfig, "clear_address", lambda name: calls.append(("clear", name)))
    return calls


def _network(mtu: int = boot.GUEST_MTU) -> GuestNetwork:
    return GuestNetwork(boot.GUEST_INTERFACE, boot.GUEST_ADDRESS, boot.GUEST_PREFIX_LENGTH, boot.GUEST_GATEWAY, mtu)


def test_a_restored_guest_keeps_the_network_its_template_configured(monkeypatch, net_calls) -> None:
    monkeypatch.setattr(agent, "_network", USUAL)
    agent._apply_network(_network())
    assert net_calls == []


def test_another_mtu_replaces_the_template_network(monkeypatch, net_calls) -> None:
    monkeypatch.setattr(agent, "_network", USUAL)
    agent._apply_network(_network(mtu=1400))
    assert net_calls == [("clear", "eth0"), ("configure", *USUAL[:4], 1400)]
    assert agent._network == (*USUAL[:4], 1400)


def test_no_network_removes_the_template_address(monkeypatch, net_calls) -> None:
    monkeypatch.setattr(agent, "_network", USUAL)
    agent._apply_network(None)
    assert net_calls == [("clear", "eth0")]
    assert agent._network is None


def test_a_guest_without_a_template_network_configures_it(monkeypatch, net_calls) -> None:
    monkeypatch.setattr(agent, "_network", None)
    agent._apply_network(_network())
    assert net_calls == [("configure", *USUAL)]
    agent._apply_network(None)
    assert net_calls[-1] == ("clear", "eth0")


def test_the_sys_copy_is_found_where_init_leaves_it() -> None:
    assert confine.READ_ONLY_SYS == init.RUNTIME_MOUNT + init.SYS_COPY


MOUNTINFO = """\
22 1 0:20 / /proc rw - proc proc rw
23 22 0:21 / /proc/sys rw - proc proc rw
24 23 0:22 / /proc/sys/fs/binfmt_misc rw - binfmt_misc none rw
25 1 0:23 / /sys rw - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
27 25 0:24 / /sysroot rw - tmpfs tmpfs rw
28 23 0:22 / /proc/sys/fs/binfmt_misc rw - binfmt_misc none rw
"""


@pytest.fixture
def mounts(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple], list[str]]:
    calls: list[tuple] = []
    reads: list[str] = []

    def fake_open(path: str, *args, **kwargs):
        reads.append(path)
        return io.StringIO(MOUNTINFO)

    monkeypatch.setattr(confine, "open", fake_open, raising=False)
    monkeypatch.setattr(syscalls, "mount", lambda src, target, fs, flags=0, data=None: calls.append((target, flags)))
    monkeypatch.setattr(confine.os, "makedirs", lambda *a, **k: None)
    return calls, reads


def test_mounts_under_several_tops_reads_mountinfo_once(mounts) -> None:
    _, reads = mounts
    assert confine._mounts_under("/proc/sys", "/sys") == ["/proc/sys/fs/binfmt_misc", "/sys/fs/cgroup"]
    assert reads == ["/proc/self/mountinfo"]
    assert confine._mounts_under() == []


READ_ONLY_REMOUNT = syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY


def _remounted(calls: list[tuple]) -> list[str]:
    return [target for target, flags in calls if flags & READ_ONLY_REMOUNT == READ_ONLY_REMOUNT]


def test_kernel_files_are_read_only_with_their_submounts(mounts) -> None:
    calls, reads = mounts
    confine.restrict_kernel_files()
    assert _remounted(calls) == [*confine.READ_ONLY_PROC, "/proc/sys/fs/binfmt_misc"]
    assert reads == ["/proc/self/mountinfo"]
    targets = [target for target, _ in calls]
    assert "/sys" not in targets  # the read-only copy covers it, made once at boot
    assert set(confine.MASKED_FILES) | set(confine.MASKED_DIRS) <= set(targets)


def test_the_sys_copy_is_read_only_with_every_mount_under_it(mounts) -> None:
    calls, _ = mounts
    confine.prepare_read_only_sys("/sys")  # the fake mountinfo lists the submounts of /sys
    assert calls[0] == ("/sys", syscalls.MS_BIND | syscalls.MS_REC)
    assert _remounted(calls) == ["/sys", "/sys/fs/cgroup"]


def test_stamps_are_taken_until_the_last_take(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "stamps", [])
    timing.stamp("woken")
    timing.stamp("ready")
    first = timing.take()
    assert [label for label, _ in first] == ["woken", "ready"]
    assert first[0][1] <= first[1][1]
    timing.stamp("exec")
    assert [label for label, _ in timing.take(last=True)] == ["exec"]
    timing.stamp("later")
    assert timing.stamps is None
    assert timing.take() == []


def test_the_host_prints_the_guest_timeline_only_when_well_formed(monkeypatch, capsys) -> None:
    monkeypatch.setattr(trace, "ENABLED", True)
    trace.guest_stamps(Exited.parse({"code": 0, "stamps": [["woken", 100], ["configured", 112.5]]}).stamps)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[timing]   guest      0.0 ms (+   0.0) woken",
        "[timing]   guest     12.5 ms (+  12.5) configured",
    ]
    huge = [["a", 10**400]], [["a", float("inf")]], [["a", float("nan")]], [["a", -1]]  # float() would overflow
    labels = [["\x1b[2J", 1]], [["\u202eb", 1]], [["", 1]], [["a" * 41, 1]]
    for hostile in (*huge, *labels, [["a", True]], [["a", 1, 2]], "stamps", [["a", 1]] * 65, []):
        for record in (Exited, Ready):  # a malformed reply breaks the stream, as any field of the wrong type
            with pytest.raises(ValueError, match="'stamps'"):
                record.parse({"code": 0, "boot_ms": 1, "stamps": hostile})
    trace.guest_stamps(Ready.parse({"boot_ms": 1}).stamps)  # a guest that was not asked
    assert capsys.readouterr().err == ""


def test_the_host_prints_nothing_without_the_switch(monkeypatch, capsys) -> None:
    monkeypatch.setattr(trace, "ENABLED", False)
    trace.guest_stamps([["woken", 100.0]])
    assert capsys.readouterr().err == ""


@pytest.mark.timeout(60)  # a hang detector, not a performance assertion
@pytest.mark.parametrize("enabled", [False, True])
async def test_the_host_asks_for_the_guest_timeline_only_under_the_switch(monkeypatch, connected, enabled) -> None:
    monkeypatch.setattr(trace, "ENABLED", enabled)
    channel, guest = connected
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(channel.handshake(CONFIG))
        guest.conn.send_hello({})
        await guest.flush()
        event = await guest.next_event()
        assert isinstance(event, HelloReceived)
        assert (boot.DEBUG_TIMING_FLAG in event.info) is enabled
        guest.conn.send_message(0, Ready(1).to_wire())
        await guest.flush()


def test_a_template_that_cannot_configure_the_network_leaves_it_to_the_settings(monkeypatch, net_calls) -> None:
    def refuse(*args):
        raise OSError(19, "No such device")

    monkeypatch.setattr(agent, "_network", None)
    monkeypatch.setattr(agent.os, "listdir", lambda path: ["eth0", "lo"])
    monkeypatch.setattr(agent.netconfig, "set_link_up", lambda sock, name: None)
    monkeypatch.setattr(agent.netconfig, "configure_interface", refuse)
    agent.prepare_network()
    assert agent._network is None
    monkeypatch.setattr(agent.netconfig, "configure_interface", lambda *a: net_calls.append(("configure", *a)))
    agent._apply_network(_network())
    assert net_calls == [("configure", *USUAL)]


@pytest.mark.timeout(60)  # a hang detector, not a performance assertion
async def test_the_host_prints_stamps_of_an_exit_status_only(monkeypatch, booted, capsys) -> None:
    monkeypatch.setattr(trace, "ENABLED", True)
    channel, guest = booted
    capsys.readouterr()
    proc = GuestProcess(channel.open(ExecRequest("true", {}, "/").to_wire()), None, None)
    sid, _ = await accept(guest, "exec")
    guest.conn.send_message(sid, {"type": "started", "pid": 9, "stamps": [["not from an exit", 1]]})
    await guest.reply_and_close(sid, {"type": "exit", "code": 0, "stamps": [["exit sent", 1]]})
    assert (await proc.wait()).exit_code == 0
    assert capsys.readouterr().err.splitlines() == ["[timing]   guest      0.0 ms (+   0.0) exit sent"]
