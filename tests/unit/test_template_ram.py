"""A boot template's RAM file: mapped copy-on-write by every sandbox, so only ever replaced, never rewritten."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from matchlock.api.errors import VMError
from matchlock.vm import checkpoint, snapshot
from matchlock.vm.accel import AccelChoice
from matchlock.vm.machine import MachineSpec, build_argv
from matchlock.vm.snapshot import TemplateCache
from matchlock.wire.boot import TEMPLATE_READY

MEMORY_MB = 1


def _spec(tmp_path: Path) -> MachineSpec:
    return MachineSpec(
        name="vm-1", kernel=Path("/k"), kernel_args=(), disks=(), console_log=tmp_path / "log",
        accel=AccelChoice("tcg", "test"), memory_mb=MEMORY_MB,
    )  # fmt: skip


def _template(tmp_path: Path, ram_size: int = MEMORY_MB << 20) -> Path:
    state = tmp_path / "k" / "state"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"QEVM")
    with open(state.with_name(checkpoint.RAM_FILE), "wb") as ram:
        ram.truncate(ram_size)
    return state


def test_a_restore_maps_the_template_ram_privately_and_loads_only_device_state(tmp_path):
    state = _template(tmp_path)
    spec = checkpoint.template_restore(_spec(tmp_path), state)
    argv = build_argv(spec, 3, 4)
    backend = argv[argv.index("-object") + 1]
    assert backend == f"memory-backend-file,id=ram,size={MEMORY_MB}M,mem-path={state.with_name('ram')},share=off"
    assert not checkpoint.ram_is_shared(type("M", (), {"spec": spec})())  # its snapshots carry RAM in the stream
    assert argv[argv.index("-incoming") + 1] == "defer"  # x-ignore-shared is set before the stream loads


@pytest.mark.parametrize("ram_size", [None, (MEMORY_MB << 20) - 4096])
def test_a_missing_or_short_ram_file_is_refused_not_created(tmp_path, ram_size):
    state = _template(tmp_path)
    ram = state.with_name(checkpoint.RAM_FILE)
    if ram_size is None:
        ram.unlink()
    else:
        ram.write_bytes(b"\0" * ram_size)
    with pytest.raises(VMError, match="RAM file .* is missing or short; fix: matchlock image templates --clear"):
        checkpoint.template_restore(_spec(tmp_path), state)
    assert ram_size is not None or not ram.exists()


class _FakeQMP:
    async def execute(self, command: str, **arguments: object) -> dict:
        return {}


class _FakeMachine:
    """Boots to the template's ready marker at once."""

    def __init__(self, spec: MachineSpec) -> None:
        self.qmp = _FakeQMP()
        self.host, self.guest = socket.socketpair()

    async def start(self) -> socket.socket:
        self.host.setblocking(False)
        self.guest.sendall(TEMPLATE_READY)
        return self.host

    async def kill(self) -> None:
        self.host.close()
        self.guest.close()


def _build_with_ram(monkeypatch, content: bytes) -> None:
    async def save_memory(machine, path: Path, ram: Path) -> bool:
        path.write_bytes(b"QEVM")
        ram.write_bytes(content)
        return True

    monkeypatch.setattr(snapshot, "Machine", _FakeMachine)
    monkeypatch.setattr(checkpoint, "save_memory", save_memory)


def test_a_rebuilt_template_replaces_the_ram_file_and_leaves_the_mapped_one_intact(tmp_path, monkeypatch):
    """A sandbox maps the RAM file; a rebuild must give it a new inode, not rewrite the one it maps."""
    monkeypatch.setattr(snapshot, "template_spec", lambda spec, root: spec)
    monkeypatch.setattr(snapshot, "template_key", lambda spec: "k")
    monkeypatch.setattr(TemplateCache, "prune", lambda self: [])
    cache = TemplateCache(tmp_path)
    _build_with_ram(monkeypatch, b"old")
    state = asyncio.run(cache.ensure(_spec(tmp_path)))
    ram = state.with_name(checkpoint.RAM_FILE)
    with open(ram, "rb") as mapped:  # what a running sandbox holds
        state.unlink()  # a template condemned by a failed restore
        _build_with_ram(monkeypatch, b"new")
        assert asyncio.run(cache.ensure(_spec(tmp_path))) == state
        assert mapped.read() == b"old"
    assert ram.read_bytes() == b"new"


def test_a_template_without_its_ram_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "template_spec", lambda spec, root: spec)
    monkeypatch.setattr(snapshot, "template_key", lambda spec: "k")
    monkeypatch.setattr(TemplateCache, "prune", lambda self: [])
    state = _template(tmp_path)
    state.with_name(checkpoint.RAM_FILE).unlink()
    _build_with_ram(monkeypatch, b"rebuilt")
    asyncio.run(TemplateCache(tmp_path).ensure(_spec(tmp_path)))
    assert state.with_name(checkpoint.RAM_FILE).read_bytes() == b"rebuilt"
