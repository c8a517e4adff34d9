"""Pause, resume and snapshot requests that arrive together, default snapshot names, and how the owner's
refusals reach the CLI (the VM side is tests/vm/test_snapshots.py)."""

from __future__ import annotations

import asyncio
import types

import pytest

from matchlock.api.errors import VMError
from matchlock.api.vfs import VFSConfig
from matchlock.sandbox import relay_protocol as rp
from matchlock.sandbox import snapshots
from matchlock.state import snapshots as records
from matchlock.state.store import StateStore


class FakeVcpus:
    """Stands in for QMP `stop`/`cont`: records what ran and lets the loop switch tasks in between."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.stopped = False

    async def pause(self, machine) -> None:
        await asyncio.sleep(0)
        self.stopped = True
        self.log.append("stop")

    async def resume(self, machine) -> None:
        await asyncio.sleep(0)
        self.stopped = False
        self.log.append("cont")


@pytest.fixture
def vcpus(monkeypatch) -> FakeVcpus:
    fake = FakeVcpus()
    monkeypatch.setattr(snapshots.checkpoint, "pause", fake.pause)
    monkeypatch.setattr(snapshots.checkpoint, "resume", fake.resume)
    return fake


@pytest.fixture
def store(tmp_path):
    store = StateStore(tmp_path / "state")
    yield store
    store.close()


def _sandbox():
    """What pause, resume and create read of a Sandbox (a registered one would also mark the database)."""
    return types.SimpleNamespace(
        id="vm-0000ctrl", machine=types.SimpleNamespace(running=True, spec=None, pid=None), closed=False,
        paused=False, control_lock=asyncio.Lock(), tracker=types.SimpleNamespace(registered=False, store=None),
        config=types.SimpleNamespace(vfs=VFSConfig()),
    )  # fmt: skip


async def _outcomes(*calls) -> list[object]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


def test_two_pauses_at_once_pause_once_and_the_second_says_already_paused(vcpus):
    async def main():
        box = _sandbox()
        first, second = await _outcomes(snapshots.pause(box), snapshots.pause(box))
        return box, first, second

    box, first, second = asyncio.run(main())
    assert first is None and isinstance(second, VMError) and "already paused" in str(second)
    assert box.paused and vcpus.log == ["stop"]


def test_a_pause_during_a_snapshot_waits_for_it_and_is_not_undone(vcpus, store, monkeypatch):
    # A snapshot of a running sandbox stops the vCPUs and starts them again when it ends. A pause that
    # came in meanwhile used to be undone by that: the database said paused, the guest ran, and
    # `resume` answered "not paused".
    saving = asyncio.Event

    async def main():
        started, release = saving(), saving()

        async def save(sandbox, directory):
            await vcpus.pause(None)
            started.set()
            await release.wait()
            await vcpus.resume(None)

        monkeypatch.setattr(snapshots, "_describe", lambda sandbox, spec, mode: {"mode": mode})
        monkeypatch.setattr(snapshots, "_save_disks", save)
        box = _sandbox()
        creating = asyncio.ensure_future(snapshots.create(box, store, "s1", "filesystem"))
        await started.wait()
        pausing = asyncio.ensure_future(snapshots.pause(box))
        for _ in range(20):  # let the pause run as far as it can (FakeVcpus steps take one loop turn each)
            await asyncio.sleep(0)
        paused_during_the_save = box.paused
        release.set()
        record = await creating
        await pausing
        return box, record, paused_during_the_save

    box, record, paused_during_the_save = asyncio.run(main())
    assert record.name == "s1" and not paused_during_the_save
    assert vcpus.log == ["stop", "cont", "stop"] and vcpus.stopped and box.paused


def test_snapshots_without_a_name_in_the_same_second_get_distinct_names(vcpus, store, monkeypatch):
    monkeypatch.setattr(records, "default_name", lambda vm_id: f"{vm_id}-20261203-120000")
    monkeypatch.setattr(snapshots, "_describe", lambda sandbox, spec, mode: {"mode": mode})

    async def save(sandbox, directory):
        await asyncio.sleep(0)

    monkeypatch.setattr(snapshots, "_save_disks", save)

    async def main():
        box = _sandbox()
        return await _outcomes(*(snapshots.create(box, store, "", "filesystem") for _ in range(3)))

    made = asyncio.run(main())
    assert [r.name for r in made] == ["vm-0000ctrl-20261203-120000", "vm-0000ctrl-20261203-120000-2",
                                      "vm-0000ctrl-20261203-120000-3"]  # fmt: skip
    records.begin(store, "given", "vm-0000ctrl", "full")
    with pytest.raises(records.NameTaken, match="'given' already exists"):  # a chosen name is never changed
        asyncio.run(snapshots.create(_sandbox(), store, "given", "filesystem"))


# --- the owner's refusals through the relay ---------------------------------------------------


def test_control_replies_say_whether_the_request_was_bad():
    reader = rp.ReplyReader()
    assert reader.feed(rp.ControlReply(error="taken", usage=True).encode()) == [rp.ControlReply(None, "taken", True)]
    assert reader.feed(rp.ControlReply(error="stopped").encode()) == [rp.ControlReply(None, "stopped", False)]
    with pytest.raises(rp.RelayProtocolError):
        rp.ControlReply.parse(b'{"error": "x", "usage": "yes"}')


# --- how a paused sandbox is shown ---------------------------------------------------------------


def test_get_and_list_json_keep_the_contract_status_and_carry_paused_for_every_sandbox(cli, state_dir):
    import json
    import os

    store = StateStore()
    try:
        for vm_id in ("vm-0000aaaa", "vm-0000bbbb"):
            store.register(vm_id, image="img", config={}, pid=os.getpid())  # this process: a live owner
        records.set_paused(store, "vm-0000aaaa", True)
    finally:
        store.close()
    got = {vm_id: json.loads(cli("get", vm_id).stdout) for vm_id in ("vm-0000aaaa", "vm-0000bbbb")}
    listed = {vm["id"]: vm for vm in json.loads(cli("list", "--json").stdout)}
    assert listed == got  # the same object from both
    assert (got["vm-0000aaaa"]["status"], got["vm-0000aaaa"]["paused"]) == ("running", True)
    assert (got["vm-0000bbbb"]["status"], got["vm-0000bbbb"]["paused"]) == ("running", False)
    assert list(got["vm-0000aaaa"]) == list(got["vm-0000bbbb"])  # every sandbox has the same keys
    table = cli("list").stdout.splitlines()
    assert [line.split()[1] for line in table[1:]] == ["paused", "running"]
    assert cli("list", "--running", "-q").stdout.split() == ["vm-0000aaaa", "vm-0000bbbb"]  # a paused one runs


def test_gc_keeps_a_snapshot_begun_while_it_looks_for_stray_directories(store, monkeypatch):
    # `gc` (remove_abandoned) removes snapshot directories no record names. A snapshot begun (a fork's,
    # say) between its reading the names and listing the directories used to be removed while being made.
    from pathlib import Path

    store.register("vm-live0002", image="img", config={})
    records.begin(store, "older", "vm-live0002", "full")
    root, original, begun = records.snapshots_dir(store), Path.iterdir, []

    def iterdir(path):
        if path == root and not begun:  # the other snapshot starts just as gc lists the directories
            begun.append(records.begin(store, "fork-0000new", "vm-live0002", "full"))
        return original(path)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert records.remove_abandoned(store) == []
    monkeypatch.undo()
    assert begun and records.snapshot_dir(store, "fork-0000new").is_dir()
    assert sorted(r.name for r in records.partial(store)) == ["fork-0000new", "older"]


def test_snapshot_rm_waits_for_a_restore_that_is_reading_the_snapshot(store, monkeypatch):
    # A removal in the middle of a restore used to fail that start half way ("kernel is gone", "can't
    # open backing store .../ram", "damaged"); now the removal waits until the restore has what it needs.
    import threading

    store.register("vm-live0003", image="img", config={})
    directory = records.begin(store, "busy", "vm-live0003", "full")
    (directory / "memory").write_bytes(b"state")
    records.complete(store, "busy", {})
    with records.reading(directory, "busy"), records.reading(directory, "busy"):  # restores share it
        with pytest.raises(records.SnapshotInUse, match="'busy' is in use: a sandbox is still being restored"):
            records.remove(store, "busy", wait=0)
        assert (directory / "memory").exists() and records.require(store, "busy")
    restoring, removing = threading.Event(), threading.Event()

    def restore() -> None:
        with records.reading(directory, "busy"):
            restoring.set()
            removing.wait()  # the removal has started waiting

    import time

    sleep, polls = time.sleep, []

    def polled(seconds: float) -> None:  # the removal found it busy and waits: let the restore finish
        polls.append(seconds)
        removing.set()
        sleep(seconds)

    reader = threading.Thread(target=restore)
    reader.start()
    restoring.wait()
    monkeypatch.setattr(time, "sleep", polled)
    waiter = StateStore(store.root)  # the removal as another process: its own connection
    try:
        records.remove(waiter, "busy")  # returns once the restore let go
    finally:
        waiter.close()
        monkeypatch.undo()
    reader.join()
    assert polls  # it did wait
    assert not directory.exists() and records.get(store, "busy") is None
    with pytest.raises(records.NotFoundError, match="'busy' was removed before this restore could read it"):
        with records.reading(directory, "busy"):
            pass
