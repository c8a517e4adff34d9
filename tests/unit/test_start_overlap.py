"""The pieces `run` overlaps to start sooner: the namespace made on a thread, the timing trace."""

from __future__ import annotations

import asyncio
import os

import pytest

from matchlock.net.namespace import SandboxNamespace, namespace_alive
from matchlock.util import trace

pytestmark = pytest.mark.timeout(60)


async def test_a_cancelled_namespace_creation_waits_for_the_helper_and_releases_its_namespace(monkeypatch):
    namespace = SandboxNamespace(1500)
    made: list[int] = []
    create = namespace.create

    def slow_create() -> None:
        create()
        assert namespace.inode is not None
        made.append(namespace.inode)

    monkeypatch.setattr(namespace, "create", slow_create)
    fds_before = len(os.listdir("/proc/self/fd"))
    task = asyncio.get_running_loop().create_task(namespace.acreate())
    await asyncio.sleep(0)  # the helper is running on its thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The cancelled call returned only after the helper finished, with everything it made closed.
    assert made and namespace.fd is None and namespace.tap_fd is None and not namespace_alive(made[0])
    assert len(os.listdir("/proc/self/fd")) <= fds_before


async def test_namespace_creation_on_a_thread_hands_over_its_descriptors():
    namespace = SandboxNamespace(1500)
    await namespace.acreate()
    try:
        assert namespace.tap_fd is not None and namespace.inode is not None and namespace_alive(namespace.inode)
    finally:
        await namespace.aclose()


def test_marks_print_labels_with_times_only_when_enabled(monkeypatch, capsys):
    monkeypatch.setattr(trace, "ENABLED", False)
    trace.mark("quiet")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(trace, "ENABLED", True)
    trace.mark("boot: step")
    trace.guest_phases({"init_started_ms": 100, "hello_ms": 340}, 530)
    trace.guest_phases({"hello_ms": "x"}, None)  # a guest's stamps are not trusted to be numbers
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[timing]") and lines[0].endswith(") boot: step")
    assert lines[1].endswith("guest side: init to HELLO 240 ms, HELLO to ready 190 ms")
    assert lines[2].endswith("guest side: no timing stamps")
