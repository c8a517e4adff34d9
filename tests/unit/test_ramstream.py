"""Guest RAM moved out of a migration stream (vm/ramstream.py), on streams laid out as QEMU 7.2 writes them."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from matchlock.vm import checkpoint, ramstream
from matchlock.vm.ramstream import FLAG_CONTINUE, FLAG_EOS, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_ZERO, PAGE_SIZE

RAM_SIZE, BIOS_SIZE = 16 * PAGE_SIZE, 2 * PAGE_SIZE
HEADER = b"QEVM\x00\x00\x00\x03" + b"\x07\x00\x00\x00\x07microvm"  # the configuration section, shortened
DEVICES = b"\x04\x00\x00\x00\x03\x06serial" + bytes(range(40)) + b"\x1f"  # a device section and EOF, verbatim


def _name(name: bytes) -> bytes:
    return bytes([len(name)]) + name


def _footer() -> bytes:
    return b"\x7e" + struct.pack(">I", 2)


def _record(offset: int, flags: int, name: bytes | None, payload: bytes) -> bytes:
    return struct.pack(">Q", offset | flags) + (_name(name) if name else b"") + payload


def _start() -> bytes:
    blocks = _name(b"ram") + struct.pack(">QQ", RAM_SIZE, 0) + _name(b"pc.bios") + struct.pack(">QQ", BIOS_SIZE, 1)
    head = b"\x01" + struct.pack(">I", 2) + _name(b"ram") + struct.pack(">II", 0, 4)
    return head + struct.pack(">Q", (RAM_SIZE + BIOS_SIZE) | FLAG_MEM_SIZE) + blocks + struct.pack(">Q", FLAG_EOS)


def _section(kind: int, records: bytes) -> bytes:
    return bytes([kind]) + struct.pack(">I", 2) + records + struct.pack(">Q", FLAG_EOS) + _footer()


PAGE_A, PAGE_B, BIOS = b"A" * PAGE_SIZE, b"B" * PAGE_SIZE, b"F" * PAGE_SIZE


def _stream() -> bytes:
    part = (
        _record(0, FLAG_PAGE, b"ram", PAGE_A)
        + _record(PAGE_SIZE, FLAG_ZERO | FLAG_CONTINUE, None, b"\x00")
        + _record(2 * PAGE_SIZE, FLAG_PAGE | FLAG_CONTINUE, None, PAGE_B)
        + _record(0, FLAG_PAGE, b"pc.bios", BIOS)
        + _record(3 * PAGE_SIZE, FLAG_ZERO, b"ram", b"\x00")
    )
    end = _record(4 * PAGE_SIZE, FLAG_ZERO, b"ram", b"\x07") + _record(PAGE_SIZE, FLAG_PAGE, b"pc.bios", BIOS)
    return HEADER + _start() + _footer() + _section(2, part) + _section(3, end) + DEVICES


def _expected_device_state() -> bytes:
    part = _record(0, FLAG_PAGE, b"pc.bios", BIOS)
    end = _record(PAGE_SIZE, FLAG_PAGE, b"pc.bios", BIOS)
    return HEADER + _start() + _footer() + _section(2, part) + _section(3, end) + DEVICES


def test_the_ram_pages_go_to_a_sparse_file_and_everything_else_stays(tmp_path):
    stream = tmp_path / "stream"
    stream.write_bytes(_stream())
    moved = ramstream.split(stream, tmp_path / "state", tmp_path / "ram")
    assert (tmp_path / "state").read_bytes() == _expected_device_state()
    ram = (tmp_path / "ram").read_bytes()
    assert len(ram) == RAM_SIZE and moved == 3 * PAGE_SIZE
    assert ram[:PAGE_SIZE] == PAGE_A and ram[2 * PAGE_SIZE : 3 * PAGE_SIZE] == PAGE_B
    assert ram[4 * PAGE_SIZE : 5 * PAGE_SIZE] == b"\x07" * PAGE_SIZE  # a filled "zero" page is written
    assert ram[PAGE_SIZE : 2 * PAGE_SIZE] == ram[3 * PAGE_SIZE : 4 * PAGE_SIZE] == bytes(PAGE_SIZE)


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.replace(struct.pack(">Q", FLAG_PAGE) + _name(b"ram"), struct.pack(">Q", 0x40) + _name(b"ram")),
        lambda s: s[: len(s) // 2],
        lambda s: b"",
        lambda s: s.replace(b"QEVM\x00\x00\x00\x03", b"QEVM\x00\x00\x00\x02"),
        lambda s: s.replace(_footer() + b"\x02", b"\x7e\x00\x00\x00\x09\x02"),
    ],
    ids=["unknown flag", "truncated", "empty", "other version", "bad footer"],
)
def test_a_stream_laid_out_otherwise_is_refused_and_kept_whole(tmp_path, damage):
    stream = tmp_path / "memory.partial"
    stream.write_bytes(damage(_stream()))
    with pytest.raises(ramstream.StreamFormatError):
        ramstream.split(stream, tmp_path / "state", tmp_path / "ram")
    kept = stream.read_bytes()
    assert not checkpoint._split_ram(stream, tmp_path / "memory", tmp_path / "ram")
    assert (tmp_path / "memory").read_bytes() == kept and not (tmp_path / "ram").exists()


def test_a_split_snapshot_replaces_the_stream(tmp_path):
    stream = tmp_path / "memory.partial"
    stream.write_bytes(_stream())
    assert checkpoint._split_ram(stream, tmp_path / "memory", tmp_path / "ram")
    assert (tmp_path / "memory").read_bytes() == _expected_device_state()
    assert not stream.exists() and not Path(f"{tmp_path / 'memory'}.split").exists()


def _resident_kib(path: Path) -> int:
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_the_pages_a_save_read_into_a_private_file_mapping_are_given_back(tmp_path):
    import mmap

    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(64 * PAGE_SIZE)  # all hole, as most of a template's RAM file
    with open(ram, "rb") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), PAGE_SIZE)) == 0  # a save reads every page
        assert _resident_kib(ram) == 64 * PAGE_SIZE // 1024
        released = ramstream.release_file_pages(os.getpid(), ram)
        assert released == (not ramstream._swap_in_use())
        assert _resident_kib(ram) == (0 if released else 64 * PAGE_SIZE // 1024)
    assert not ramstream.release_file_pages(os.getpid(), tmp_path / "not-mapped")


def test_the_cached_zero_pages_of_the_holes_are_dropped_and_the_data_kept(tmp_path):
    import subprocess

    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(256 * PAGE_SIZE)
        f.write(b"D" * PAGE_SIZE)
    assert len(ram.read_bytes()) == 256 * PAGE_SIZE  # reads the holes into the page cache

    def cached() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "-o", "RES", str(ram)], capture_output=True)
        return int(out.stdout.split()[0])

    assert cached() > PAGE_SIZE
    ramstream._drop_cached_holes(ram)
    assert cached() == PAGE_SIZE and ram.read_bytes()[:PAGE_SIZE] == b"D" * PAGE_SIZE
