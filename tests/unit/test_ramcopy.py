"""The RAM of a machine mapping its RAM file copy-on-write, copied from the mapping (vm/ramcopy.py).

The mapping is this test process's own (a real private file mapping, its page map and /proc/self/mem),
standing in for QEMU's; the QMP half of the save is a fake (it cannot run without QEMU), the VM tests
(tests/vm/test_snapshots.py) run it against QEMU.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import types
from pathlib import Path

import pytest

from matchlock.vm import checkpoint, ramcopy
from matchlock.vm.checkpoint import SavedRam

PAGE = ramcopy.PAGE_SIZE
PAGES = 768  # 3 MiB (a guest's size is whole MiB), past one CHUNK (256 pages) of written pages


def _page(n: int) -> bytes:
    return bytes([n % 251 + 1]) * PAGE


@pytest.fixture
def mapped(tmp_path):
    """A sparse RAM file (data in pages 10-19 and 300-309) mapped privately, then written as a guest
    would: pages 0-2 (a hole), 15 (data), 300-309 zeroed (data), and 400-767 (holes, past a chunk)."""
    ram = tmp_path / "template-ram"
    with open(ram, "wb") as f:
        f.truncate(PAGES * PAGE)
        for n in [*range(10, 20), *range(300, 310)]:
            os.pwrite(f.fileno(), _page(n), n * PAGE)
    fd = os.open(ram, os.O_RDONLY)
    view = mmap.mmap(fd, PAGES * PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    base = ctypes.addressof(ctypes.c_char.from_buffer(view))
    written = {0, 1, 2, 15, *range(300, 310), *range(400, PAGES)}
    for n in written:
        view[n * PAGE : (n + 1) * PAGE] = bytes(PAGE) if 300 <= n < 310 else _page(n + 7)
    _ = view[50 * PAGE]  # read, not written: still the file's page
    yield types.SimpleNamespace(ram=ram, view=view, base=base, written=written)


def test_the_pages_the_process_wrote_are_found_and_copied_over_the_files_data(mapped, tmp_path):
    base = ramcopy.find_mapping(os.getpid(), mapped.ram, PAGES * PAGE)
    assert base == mapped.base
    own = ramcopy.own_pages(os.getpid(), base, PAGES)
    assert {n for n in range(PAGES) if own[n]} == mapped.written
    target = tmp_path / "saved-ram"
    moved = ramcopy.write_ram(os.getpid(), base, mapped.ram, target, own)
    assert moved == len(mapped.written) * PAGE
    saved = target.read_bytes()
    assert len(saved) == PAGES * PAGE
    for n in range(PAGES):
        assert saved[n * PAGE : (n + 1) * PAGE] == mapped.view[n * PAGE : (n + 1) * PAGE], f"page {n}"
    with open(target, "rb") as f:  # the zeroed run is a hole again, the untouched holes stay holes
        assert ramcopy.data_extents(f.fileno(), PAGES * PAGE) == [
            (0, 3 * PAGE),
            (10 * PAGE, 20 * PAGE),
            (400 * PAGE, PAGES * PAGE),
        ]


def test_a_file_mapped_shared_or_not_at_all_is_not_copied(tmp_path):
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(4 * PAGE))
    with pytest.raises(ramcopy.MappingNotFound, match="does not map"):
        ramcopy.find_mapping(os.getpid(), ram, 4 * PAGE)
    with open(ram, "r+b") as f, mmap.mmap(f.fileno(), 4 * PAGE, flags=mmap.MAP_SHARED):
        with pytest.raises(ramcopy.MappingNotFound, match="not private"):
            ramcopy.find_mapping(os.getpid(), ram, 4 * PAGE)


def test_a_mapping_shorter_than_the_guest_is_not_copied(mapped):
    with pytest.raises(ramcopy.MappingNotFound, match="maps less than"):
        ramcopy.find_mapping(os.getpid(), mapped.ram, (PAGES + 1) * PAGE)


def test_runs():
    assert ramcopy.runs(b"\x00\x01\x01\x00\x01") == [(1, 2), (4, 1)]
    assert ramcopy.runs(b"\x01" * 3) == [(0, 3)] and ramcopy.runs(b"\x00" * 3) == []


RAM_SECTIONS = b"QEVM\x00\x00\x00\x03<configuration and ram sections>"
DEVICES = b"<device sections>\x00"  # QEMU_VM_EOF last


class _FakeQEMU:
    """QMP of a QEMU for `_save_mapped`: `xen-save-devices-state` writes `devices` to the fd set's file."""

    def __init__(self, devices: bytes, fail: str | None = None) -> None:
        self.devices, self.fail, self.fds, self.commands = devices, fail, {}, []

    async def add_fd(self, fd: int) -> int:
        self.fds[len(self.fds)] = os.dup(fd)
        return len(self.fds) - 1

    async def execute(self, command: str, **arguments: object) -> dict:
        self.commands.append(command)
        if command == self.fail:
            raise checkpoint.QMPError(f"QMP {command} failed: CommandNotFound")
        if command == "xen-save-devices-state":
            assert arguments["live"] is False
            fd = self.fds[int(str(arguments["filename"]).removeprefix("/dev/fdset/"))]
            os.write(fd, b"QEVM\x00\x00\x00\x03" + self.devices)
        if command == "remove-fd":
            os.close(self.fds.pop(arguments["fdset-id"]))
        return {}


def _machine(qemu: _FakeQEMU, ram: Path, incoming: Path, log: Path):
    spec = types.SimpleNamespace(
        name="vm-test",
        ram_file=ram,
        ram_private=False,
        incoming=incoming,
        memory_mb=PAGES * PAGE >> 20,
        console_log=log,
    )
    return types.SimpleNamespace(qmp=qemu, running=True, spec=spec, pid=os.getpid())


@pytest.fixture
def incoming(tmp_path, monkeypatch):
    """The state the machine was restored from: its ram sections are RAM_SECTIONS."""
    monkeypatch.setattr(checkpoint, "SAVE_TIMEOUT", 5.0)
    path = tmp_path / "restored-from"
    path.write_bytes(b"")
    monkeypatch.setattr("matchlock.vm.ramstream.ram_sections", lambda stream: RAM_SECTIONS)
    return path


def test_a_save_from_the_mapping_is_the_ram_sections_before_the_devices(mapped, incoming, tmp_path):
    qemu = _FakeQEMU(DEVICES)
    machine = _machine(qemu, mapped.ram, incoming, tmp_path / "vm.log")
    saved = asyncio.run(checkpoint.save_memory(machine, tmp_path / "memory", tmp_path / "ram"))
    assert saved is SavedRam.COPIED
    assert (tmp_path / "memory").read_bytes() == RAM_SECTIONS + DEVICES
    assert (tmp_path / "ram").read_bytes() == bytes(mapped.view[: PAGES * PAGE])
    assert "migrate" not in qemu.commands and not qemu.fds  # nothing streamed; the fd set removed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name in ("memory", "ram", "memory.partial")) == [
        "memory",
        "ram",
    ]


def test_a_qemu_without_the_command_leaves_no_file_and_says_why(mapped, incoming, tmp_path):
    qemu = _FakeQEMU(DEVICES, fail="xen-save-devices-state")
    machine = _machine(qemu, mapped.ram, incoming, tmp_path / "vm.log")
    assert not asyncio.run(checkpoint._save_mapped(machine, tmp_path / "memory", tmp_path / "ram"))
    assert not (tmp_path / "memory").exists() and not (tmp_path / "ram").exists()
    assert "the RAM is streamed: QMP xen-save-devices-state failed" in (tmp_path / "vm.log").read_text()
    assert not qemu.fds


def test_device_state_laid_out_otherwise_is_not_used(mapped, incoming, tmp_path):
    qemu = _FakeQEMU(b"<no EOF>")
    machine = _machine(qemu, mapped.ram, incoming, tmp_path / "vm.log")
    assert not asyncio.run(checkpoint._save_mapped(machine, tmp_path / "memory", tmp_path / "ram"))
    assert not (tmp_path / "memory").exists() and not (tmp_path / "ram").exists()
