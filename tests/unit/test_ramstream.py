"""Guest RAM moved out of a migration stream (vm/ramstream.py), on streams laid out as QEMU 7.2 writes them."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import types
from pathlib import Path

import pytest

from matchlock.api.errors import VMError
from matchlock.vm import checkpoint, ramstream
from matchlock.vm.checkpoint import SavedRam
from matchlock.vm.ramstream import FLAG_CONTINUE, FLAG_EOS, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_ZERO, PAGE_SIZE

RAM_SIZE, BIOS_SIZE = 16 * PAGE_SIZE, 2 * PAGE_SIZE
HEADER = b"QEVM\x00\x00\x00\x03" + b"\x07\x00\x00\x00\x07microvm"  # the configuration section, shortened
DEVICES = b"\x04\x00\x00\x00\x03\x06serial" + bytes(range(40)) + b"\x1f"  # a device section and EOF, verbatim


def _split(stream: Path, device_state: Path, ram: Path) -> int:
    with open(stream, "rb") as f:
        return ramstream.split_fd(f.fileno(), device_state, ram)


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
    moved = _split(stream, tmp_path / "state", tmp_path / "ram")
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
        lambda s: s.replace(struct.pack(">Q", FLAG_PAGE) + _name(b"ram"), struct.pack(">Q", 0x0A) + _name(b"ram")),
    ],
    ids=["unknown flag", "truncated", "empty", "other version", "bad footer", "zero and page at once"],
)
def test_a_stream_laid_out_otherwise_is_refused(tmp_path, damage):
    stream = tmp_path / "memory.partial"
    stream.write_bytes(damage(_stream()))
    with pytest.raises(ramstream.StreamFormatError):
        _split(stream, tmp_path / "state", tmp_path / "ram")


class _FakeQEMU:
    """QMP of a QEMU that migrates by writing `stream` to the descriptor it was given, in small writes,
    and, as QEMU 7.2, refuses to migrate again after a completed migration until `cont`."""

    def __init__(self, stream: bytes, fail: bool = False, keep_open: bool = False) -> None:
        self.stream, self.fail, self.keep_open, self.migrations, self.fd = stream, fail, keep_open, 0, -1
        self.writer: threading.Thread | None = None
        self.state, self.broken = "paused", False

    async def send_fd(self, name: str, fd: int) -> None:
        self.fd = os.dup(fd)

    async def execute(self, command: str, **arguments: object) -> dict:
        if command == "migrate":
            if self.state == "postmigrate":
                raise VMError("QMP migrate failed: Can't migrate the vm that was paused due to previous migration")
            self.migrations += 1
            self.writer = threading.Thread(target=self._write, args=(self.fd,))
            self.writer.start()
        if command == "query-migrate":
            assert self.writer is not None
            if self.writer.is_alive():
                return {"status": "active"}
            failed = self.fail or self.broken
            self.state = self.state if failed else "postmigrate"
            return {"status": "failed" if failed else "completed"}
        if command in ("cont", "stop"):
            self.state = "running" if command == "cont" else "paused"
        if command == "query-status":
            return {"status": self.state}
        return {}

    def _write(self, fd: int) -> None:
        data = self.stream[: len(self.stream) // 2] if self.fail else self.stream
        try:
            for at in range(0, len(data), 65521):
                os.write(fd, data[at : at + 65521])
        except BrokenPipeError:
            self.broken = True
        finally:
            if not self.keep_open:
                os.close(fd)


def _machine(qemu: _FakeQEMU):
    spec = types.SimpleNamespace(name="vm-test", ram_file=None, ram_private=True)
    return types.SimpleNamespace(qmp=qemu, running=True, spec=spec, pid=None)


def test_private_ram_is_split_while_qemu_writes(tmp_path):
    records = [(p, FLAG_PAGE, _page(p)) if p % 3 else (p, FLAG_ZERO, b"\x00") for p in range(3000)]
    qemu = _FakeQEMU(_big_stream(records, 4000 * PAGE_SIZE))
    assert asyncio.run(checkpoint.save_memory(_machine(qemu), tmp_path / "memory", tmp_path / "ram")) is SavedRam.SPLIT
    assert (tmp_path / "memory").read_bytes() == _big_stream(records, 4000 * PAGE_SIZE, split=True)
    ram = (tmp_path / "ram").read_bytes()
    assert all(
        ram[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] == (_page(p) if p % 3 and p < 3000 else bytes(PAGE_SIZE))
        for p in range(4000)
    )
    assert qemu.migrations == 1 and sorted(f.name for f in tmp_path.iterdir()) == ["memory", "ram"]


@pytest.mark.parametrize(
    "damage", [lambda s: s.replace(b"\x7e", b"\x7f", 1), lambda s: s[: len(s) // 2]], ids=["footer", "cut"]
)
def test_a_stream_the_split_refuses_is_read_to_its_end_and_saved_again_whole(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(checkpoint, "SAVE_TIMEOUT", 10.0)  # a reader that stopped would leave QEMU stuck
    stream = damage(_big_stream([(p, FLAG_PAGE, _page(p)) for p in range(2000)], 2000 * PAGE_SIZE))
    qemu = _FakeQEMU(stream)
    assert (
        asyncio.run(checkpoint.save_memory(_machine(qemu), tmp_path / "memory", tmp_path / "ram")) is SavedRam.IN_STREAM
    )
    assert (tmp_path / "memory").read_bytes() == stream  # as QEMU wrote it: clones load its RAM
    assert qemu.migrations == 2 and [f.name for f in tmp_path.iterdir()] == ["memory"]
    assert qemu.state == "postmigrate"  # stopped: saved again only after `cont` took it out of the first


def test_a_qemu_that_keeps_its_end_open_after_completing_still_gets_its_stream_split(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "READER_GRACE", 0.2)
    records = [(p, FLAG_PAGE, _page(p)) for p in range(300)]
    qemu = _FakeQEMU(_big_stream(records, 300 * PAGE_SIZE), keep_open=True)
    try:
        assert (
            asyncio.run(checkpoint.save_memory(_machine(qemu), tmp_path / "memory", tmp_path / "ram")) is SavedRam.SPLIT
        )
    finally:
        os.close(qemu.fd)
    assert (tmp_path / "ram").read_bytes() == b"".join(_page(p) for p in range(300))


@pytest.mark.parametrize("private", [True, False], ids=["private RAM, split", "shared RAM, saved whole"])
def test_a_failed_migration_leaves_no_file(tmp_path, private):
    qemu = _FakeQEMU(_big_stream([(p, FLAG_PAGE, _page(p)) for p in range(2000)], 2000 * PAGE_SIZE), fail=True)
    machine = _machine(qemu)
    machine.spec.ram_private = private
    with pytest.raises(VMError, match="migration failed"):
        asyncio.run(checkpoint.save_memory(machine, tmp_path / "memory", tmp_path / "ram"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pages", [100, 4000], ids=["read whole before the write", "QEMU still writing"])
def test_a_reader_that_cannot_write_the_ram_file_fails_the_save_by_name_and_leaves_no_file(
    tmp_path, monkeypatch, pages
):
    monkeypatch.setattr(ramstream.os, "pwritev", lambda fd, parts, at: 0)  # a full disk: nothing written
    qemu = _FakeQEMU(_big_stream([(p, FLAG_PAGE, _page(p)) for p in range(pages)], pages * PAGE_SIZE))
    with pytest.raises(VMError, match=f"{tmp_path / 'ram'} failed: .*short write of guest RAM at offset 0"):
        asyncio.run(checkpoint.save_memory(_machine(qemu), tmp_path / "memory", tmp_path / "ram"))
    assert list(tmp_path.iterdir()) == []


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


def _big_stream(records: list[tuple[int, int, bytes]], ram_size: int, *, split: bool = False) -> bytes:
    """A stream of one ram block of `ram_size` whose records are (page, flags, payload), CONTINUE added
    after the first (200 records a section, as QEMU ends sections by time and then continues the block);
    `split`: as it must be once the pages are moved out (the sections kept, empty)."""
    head = b"\x01" + struct.pack(">I", 2) + _name(b"ram") + struct.pack(">II", 0, 4)
    blocks = _name(b"ram") + struct.pack(">QQ", ram_size, 0)
    start = head + struct.pack(">Q", ram_size | FLAG_MEM_SIZE) + blocks + struct.pack(">Q", FLAG_EOS) + _footer()
    sections = []
    for first in range(0, len(records), 200):
        body = b"".join(
            _record(page * PAGE_SIZE, flags | (FLAG_CONTINUE if i else 0), None if i else b"ram", payload)
            for i, (page, flags, payload) in enumerate(records[first : first + 200], start=first)
        )
        sections.append(_section(2, b"" if split else body))
    return HEADER + start + b"".join(sections) + _section(3, b"") + DEVICES


def _page(n: int) -> bytes:
    return n.to_bytes(4, "big") * (PAGE_SIZE // 4)


def test_long_runs_of_pages_and_zero_pages_land_where_a_record_at_a_time_puts_them(tmp_path):
    pages = 6000
    records: list[tuple[int, int, bytes]] = []
    for page in range(pages):  # runs of every length, longer than a section and than ramstream.RUN
        data = page % 2500 < 300 or 3000 <= page < 5200 or page % 7 == 3
        records.append((page, FLAG_PAGE, _page(page)) if data else (page, FLAG_ZERO, b"\x00"))
    # Out of order inside a continued run (a bulk match overshoots), a data page sent again as zero, a filled one.
    records[3500:3503] = [(p, FLAG_PAGE, _page(p)) for p in (3502, 3501, 3500)]
    records += [(10, FLAG_ZERO, b"\x00"), (11, FLAG_ZERO, b"\x09"), (pages + 3, FLAG_PAGE, _page(99))]
    expected = bytearray((pages + 8) * PAGE_SIZE)
    for page, flags, payload in records:
        expected[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = payload if flags & FLAG_PAGE else payload * PAGE_SIZE
    stream = tmp_path / "stream"
    stream.write_bytes(_big_stream(records, len(expected)))
    moved = _split(stream, tmp_path / "state", tmp_path / "ram")
    assert (tmp_path / "ram").read_bytes() == expected
    assert (tmp_path / "state").read_bytes() == _big_stream(records, len(expected), split=True)
    data_pages = sum(1 for _, flags, payload in records if flags & FLAG_PAGE or payload != b"\x00")
    assert moved == (data_pages + 1) * PAGE_SIZE  # + page 10, sent as data, then as zero: zeroed
    assert os.stat(tmp_path / "ram").st_blocks * 512 < (data_pages + 64) * PAGE_SIZE  # the zero pages are holes


@pytest.mark.parametrize("where", [2100, 3100, 5999])
@pytest.mark.parametrize(
    "damage",
    ["unknown flag", "truncated", "outside the block"],
)
def test_a_bad_record_deep_in_a_run_refuses_the_stream(tmp_path, where, damage):
    records = [(p, FLAG_ZERO, b"\x00") if p < 3000 else (p, FLAG_PAGE, _page(p)) for p in range(6000)]
    size = 6000 * PAGE_SIZE
    if damage == "outside the block":
        size = where * PAGE_SIZE  # the record at `where` is the first page past the block's end
    stream = _big_stream(records, size)
    if damage == "unknown flag":
        page, flags, payload = records[where]
        good = _record(page * PAGE_SIZE, flags | FLAG_CONTINUE, None, payload)
        assert stream.count(good) == 1
        stream = stream.replace(good, _record(page * PAGE_SIZE, flags | FLAG_CONTINUE | 0x40, None, payload))
    elif damage == "truncated":
        at = stream.index(_record(where * PAGE_SIZE, records[where][1] | FLAG_CONTINUE, None, b""))
        stream = stream[: at + 12]
    (tmp_path / "stream").write_bytes(stream)
    with pytest.raises(ramstream.StreamFormatError):
        _split(tmp_path / "stream", tmp_path / "state", tmp_path / "ram")


def test_ram_sections_are_a_split_stream_up_to_its_devices(tmp_path):
    stream = tmp_path / "stream"
    stream.write_bytes(_stream())
    _split(stream, tmp_path / "state", tmp_path / "ram")
    expected = _expected_device_state()
    assert ramstream.ram_sections(tmp_path / "state") == expected[: len(expected) - len(DEVICES)]


def test_ram_sections_refuse_a_stream_holding_the_ram_itself(tmp_path):
    stream = tmp_path / "stream"
    stream.write_bytes(_stream())  # as QEMU wrote it: the guest RAM's pages are in it
    with pytest.raises(ramstream.StreamFormatError, match="a page of block b'ram'"):
        ramstream.ram_sections(stream)
