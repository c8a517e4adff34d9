"""Rooted boot templates: one per image, saved with the root mounted; clones copy its upper disk."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

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
