"""Rooted boot templates: one per image, saved with the root mounted; clones copy its upper disk."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path

import pytest

from matchlock.vm import checkpoint, snapshot
from matchlock.vm.accel import AccelChoice
from matchlock.vm.machine import Disk, MachineSpec
from matchlock.vm.snapshot import TemplateCache, rooted_template_spec, template_key, template_upper
from matchlock.wire.boot import (
    LOWER_DISK_SERIAL,
    RUNTIME_DISK_SERIAL,
    TEMPLATE_FLAG,
    TEMPLATE_READY,
    TEMPLATE_ROOTED_FLAG,
    UPPER_DISK_SERIAL,
)


def _file(path: Path, data: bytes, size: int | None = None) -> Path:
    with open(path, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    return path


def _spec(tmp_path: Path, lower: Path, upper: Path) -> MachineSpec:
    runtime = tmp_path / "runtime.img"
    if not runtime.exists():
        _file(runtime, b"runtime")
    return MachineSpec(
        name="vm-1", kernel=tmp_path / "vmlinux", kernel_args=("console=hvc0",),
        disks=(Disk(runtime, RUNTIME_DISK_SERIAL, True), Disk(lower, LOWER_DISK_SERIAL, True),
               Disk(upper, UPPER_DISK_SERIAL, ephemeral=True)),
        console_log=tmp_path / "log", accel=AccelChoice("tcg", "test"), memory_mb=1,
    )  # fmt: skip


def _rooted_key(tmp_path: Path, spec: MachineSpec) -> str:
    return template_key(rooted_template_spec(spec, tmp_path))


def test_a_rooted_template_is_keyed_by_its_image_and_upper_size_but_not_the_upper_path(tmp_path):
    lower = _file(tmp_path / "lower.erofs", b"image")
    other_image = _file(tmp_path / "other.erofs", b"other image")
    uppers = [_file(tmp_path / f"upper-{i}.img", b"", size=1 << 30) for i in range(2)]
    bigger = _file(tmp_path / "upper-big.img", b"", size=2 << 30)
    key = _rooted_key(tmp_path, _spec(tmp_path, lower, uppers[0]))
    assert _rooted_key(tmp_path, _spec(tmp_path, lower, uppers[1])) == key  # every sandbox has its own upper
    assert _rooted_key(tmp_path, _spec(tmp_path, other_image, uppers[0])) != key
    assert _rooted_key(tmp_path, _spec(tmp_path, lower, bigger)) != key  # clones copy the template's upper
    plain = template_key(snapshot.template_spec(_spec(tmp_path, lower, uppers[0]), tmp_path))
    assert plain != key
    os.utime(lower, (1, 1))  # a re-pulled image: the template's page cache no longer matches it
    assert _rooted_key(tmp_path, _spec(tmp_path, lower, uppers[0])) != key


def test_a_rooted_template_boots_with_the_real_disks_and_both_flags(tmp_path):
    spec = _spec(tmp_path, _file(tmp_path / "lower.erofs", b"image"), _file(tmp_path / "u.img", b"", 1 << 20))
    rooted = rooted_template_spec(spec, tmp_path)
    assert rooted.disks == spec.disks
    assert rooted.kernel_args[-2:] == (TEMPLATE_FLAG, TEMPLATE_ROOTED_FLAG)
    assert TEMPLATE_ROOTED_FLAG not in snapshot.template_spec(spec, tmp_path).kernel_args


class _FakeQMP:
    async def execute(self, command: str, **arguments: object) -> dict:
        return {}


class _WritingMachine:
    """A template guest that writes to its upper disk before its ready marker."""

    booted: list[MachineSpec] = []

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.qmp = _FakeQMP()
        self.host, self.guest = socket.socketpair()
        _WritingMachine.booted.append(spec)

    async def start(self) -> socket.socket:
        upper = next(d.path for d in self.spec.disks if d.serial == UPPER_DISK_SERIAL)
        with open(upper, "r+b") as f:
            f.write(b"mounted root")
        self.host.setblocking(False)
        self.guest.sendall(TEMPLATE_READY)
        return self.host

    async def kill(self) -> None:
        self.host.close()
        self.guest.close()


async def _save_memory(machine, path: Path, ram: Path) -> bool:
    path.write_bytes(b"QEVM")
    _file(ram, b"ram", size=1 << 20)
    return True


def test_a_rooted_build_keeps_the_disk_it_booted_with_and_leaves_the_sandboxs_blank(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "Machine", _WritingMachine)
    monkeypatch.setattr(checkpoint, "save_memory", _save_memory)
    monkeypatch.setattr(TemplateCache, "prune", lambda self: [])
    blank = _file(tmp_path / "sandbox-upper.img", b"blank", size=1 << 20)
    spec = _spec(tmp_path, _file(tmp_path / "lower.erofs", b"image"), blank)
    state = asyncio.run(TemplateCache(tmp_path / "templates").ensure(spec, rooted=True))
    booted = _WritingMachine.booted[-1]
    assert TEMPLATE_ROOTED_FLAG in booted.kernel_args
    assert next(d.path for d in booted.disks if d.serial == UPPER_DISK_SERIAL) != blank
    assert template_upper(state).read_bytes()[:12] == b"mounted root"
    assert template_upper(state).stat().st_size == 1 << 20
    assert blank.read_bytes()[:5] == b"blank"  # the sandbox copies the template's upper over it
    assert sorted(p.name for p in state.parent.iterdir()) == ["console.log", "inputs.json", "ram", "state", "upper"]
    assert "root of" in TemplateCache(tmp_path / "templates").templates()[0].shape


def test_a_rooted_template_without_its_upper_is_built_again(tmp_path, monkeypatch):
    """A removal cut short (state and RAM left, upper gone) must not make every clone boot cold."""
    monkeypatch.setattr(snapshot, "Machine", _WritingMachine)
    monkeypatch.setattr(checkpoint, "save_memory", _save_memory)
    monkeypatch.setattr(TemplateCache, "prune", lambda self: [])
    spec = _spec(tmp_path, _file(tmp_path / "lower.erofs", b"image"), _file(tmp_path / "u.img", b"", 1 << 20))
    cache = TemplateCache(tmp_path / "templates")
    state = asyncio.run(cache.ensure_rooted(spec))
    template_upper(state).unlink()
    builds = len(_WritingMachine.booted)
    assert asyncio.run(cache.ensure_rooted(spec)) == state
    assert len(_WritingMachine.booted) == builds + 1
    assert template_upper(state).read_bytes()[:12] == b"mounted root"


def test_a_failed_rooted_restore_boots_cold_on_a_fresh_blank_upper(tmp_path, monkeypatch):
    from matchlock.api.errors import VMError
    from matchlock.sandbox import sandbox as sandbox_module
    from matchlock.sandbox.sandbox import Sandbox, SandboxPaths

    state = tmp_path / "templates" / "k" / "state"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"QEVM")
    _file(state.with_name(checkpoint.RAM_FILE), b"", size=1 << 20)
    _file(template_upper(state), b"template upper")

    async def ensure_rooted(self, spec, network_wrapper=None):
        return state

    monkeypatch.setattr(TemplateCache, "ensure_rooted", ensure_rooted)
    monkeypatch.setattr(TemplateCache, "wants_rooted", lambda self, spec: True)  # started before
    monkeypatch.delenv(snapshot.DISABLE_ENV, raising=False)
    monkeypatch.setattr(checkpoint, "template_restore", lambda spec, state: spec)
    monkeypatch.setattr(sandbox_module, "make_upper_disk", lambda path, size: path.write_bytes(b"blank"))
    box = Sandbox.__new__(Sandbox)
    box.paths = SandboxPaths(tmp_path / "vm")
    box.paths.console_log.parent.mkdir(parents=True)
    box.machine, box.channel = None, None
    box.config = type("Config", (), {"resources": type("R", (), {"disk_size_mb": 1})()})()
    uppers: list[bytes] = []

    async def start_machine(spec, *, wake: bool) -> None:
        uppers.append(box.paths.upper_disk.read_bytes())
        if wake:  # the clone ran a while, writing to its copy, then failed
            box.paths.upper_disk.write_bytes(b"written by the failed clone")
            raise VMError("sandbox x failed to start: the guest was not ready")

    box._start_machine = start_machine  # type: ignore[method-assign]
    spec = _spec(tmp_path, _file(tmp_path / "lower.erofs", b"image"), box.paths.upper_disk)
    asyncio.run(box._boot(spec, rooted=True))
    assert uppers == [b"template upper", b"blank"]  # the restore had the copy; the cold boot a blank


def test_a_failed_upper_copy_leaves_no_namespace_and_no_partial_disk(tmp_path, monkeypatch):
    from matchlock.api.errors import VMError
    from matchlock.vm.machine import MachineNetwork

    monkeypatch.setattr(TemplateCache, "prune", lambda self: [])
    namespaces: list[str] = []

    def network_wrapper():
        namespaces.append("open")
        return 99, lambda: namespaces.remove("open")

    def copy_disk(source: Path, target: Path) -> None:
        target.write_bytes(b"half")
        raise VMError("copying failed: No space left on device")

    monkeypatch.setattr(checkpoint, "copy_disk", copy_disk)
    spec = _spec(tmp_path, _file(tmp_path / "lower.erofs", b"image"), _file(tmp_path / "u.img", b"", 1 << 20))
    spec = dataclasses.replace(spec, network=MachineNetwork("52:54:00:00:00:01", -1))
    cache = TemplateCache(tmp_path / "templates")
    with pytest.raises(VMError, match="No space"):
        asyncio.run(cache.ensure_rooted(spec, network_wrapper))
    assert namespaces == []
    assert not list((tmp_path / "templates").glob("*/upper.partial-*"))


def test_an_image_gets_its_rooted_template_only_from_its_second_start(tmp_path):
    cache = TemplateCache(tmp_path / "templates")
    spec = _spec(tmp_path, _file(tmp_path / "lower.erofs", b"image"), _file(tmp_path / "u.img", b"", 1 << 20))
    other = _spec(tmp_path, _file(tmp_path / "other.erofs", b"other"), _file(tmp_path / "v.img", b"", 1 << 20))
    assert not cache.wants_rooted(spec)  # run once: the plain template, no rooted build
    assert cache.wants_rooted(spec)
    assert not cache.wants_rooted(other)  # noted per image


def test_the_notes_of_images_started_once_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "KEEP_WANTED", 2)
    cache = TemplateCache(tmp_path / "templates")
    for i in range(4):
        spec = _spec(tmp_path, _file(tmp_path / f"l{i}.erofs", b"%d" % i), _file(tmp_path / "u.img", b"", 1 << 20))
        cache.wants_rooted(spec)
        newest = max(cache.root.glob("*.wanted"), key=lambda p: p.stat().st_mtime_ns)
        os.utime(newest, (i + 1, i + 1))  # distinct ages, oldest first
    kept = sorted(cache.root.glob("*.wanted"), key=lambda p: p.stat().st_mtime)[-2:]
    cache.prune()
    assert sorted(cache.root.glob("*.wanted")) == sorted(kept)
