"""Move guest RAM out of a QEMU 7.2 migration stream into a sparse file that clones map copy-on-write.

QEMU leaves a RAM block out of the stream (`x-ignore-shared`) only when it is a shared mapping. A
sandbox whose RAM is private (a boot template's RAM file mapped copy-on-write, or a clone's) saves
every page into the stream, and each clone would load them all into memory of its own. So the
saved stream is split: the pages of the guest RAM block go to a sparse file (zero pages stay
holes), and the stream keeps everything else, the same bytes QEMU writes for shared RAM. A clone
then restores it like a snapshot of shared RAM: RAM mapped from the file, device state from the
stream, and its pages shared with every other clone until written.

The stream is QEMU's own (never the guest's), but its format is parsed strictly: anything this
module does not know (a flag, a section, a second RAM section) raises `StreamFormatError`, and the
caller keeps the stream as QEMU wrote it.

Format (QEMU 7.2, migration/savevm.c and migration/ram.c; all integers big-endian): the header,
the configuration section, then the "ram" section: START (block list), PART..., END, each a list of
page records (be64 offset|flags, the block name unless CONTINUE, then a fill byte for ZERO or a
page for PAGE) closed by EOS and a section footer; then the device sections, copied verbatim.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

SECTION_START, SECTION_PART, SECTION_END = 0x01, 0x02, 0x03
SECTION_FOOTER = 0x7E
FLAG_ZERO, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_EOS, FLAG_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
PAGE_SIZE = 4096
RAM_SECTION = b"ram"
_FLAGS = PAGE_SIZE - 1
unpack_be64 = struct.Struct(">Q").unpack_from


class StreamFormatError(ValueError):
    """The stream is not laid out as this module expects; it is left as it is."""


class _Reader:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise StreamFormatError(f"the stream ends inside a record at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def be64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def name(self) -> bytes:
        return bytes(self.take(self.u8()))


def _find_ram_start(data: mmap.mmap) -> int:
    """Offset of the ram section's START header: after the header and the configuration section."""
    if bytes(data[:8]) != b"QEVM\x00\x00\x00\x03":
        raise StreamFormatError("not a version 3 migration stream")
    marker = bytes([len(RAM_SECTION)]) + RAM_SECTION + b"\x00\x00\x00\x00\x00\x00\x00\x04"  # instance 0, version 4
    found = bytes(data[:4096]).find(marker)
    if found < 5 or data[found - 5] != SECTION_START:
        raise StreamFormatError("no ram section at the start of the stream")
    return found - 5


def split(stream: Path, device_state: Path, ram: Path, block: bytes = RAM_SECTION) -> int:
    """Write `stream` without the pages of RAM block `block` to `device_state`, and those pages to `ram`
    (sparse, the block's size). Returns the bytes of page data moved."""
    # Mapped, not read: the stream holds every page the guest wrote. Slices of an mmap are copies, so no
    # view outlives it (an exception's traceback would otherwise keep one, and closing it would fail).
    with open(stream, "rb") as f:
        if os.fstat(f.fileno()).st_size < 8:
            raise StreamFormatError("the stream is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _split(data, device_state, ram, block)


def _split(data: mmap.mmap, device_state: Path, ram: Path, block: bytes) -> int:
    start = _find_ram_start(data)
    reader = _Reader(data)
    reader.pos = start + 1
    section = reader.be32()
    reader.take(len(RAM_SECTION) + 1 + 8)  # name, instance, version (matched above)
    total = reader.be64()
    if not total & FLAG_MEM_SIZE:
        raise StreamFormatError("the ram section does not start with its block list")
    total &= ~_FLAGS
    sizes: dict[bytes, int] = {}
    while sum(sizes.values()) < total:
        name = reader.name()
        sizes[name] = reader.be64()
        reader.be64()  # the block's guest address (x-ignore-shared is always set when saving)
    if block not in sizes or reader.be64() != FLAG_EOS:
        raise StreamFormatError(f"the ram section has no block {block!r} or does not end its block list")
    _footer(reader, section)
    moved, written = 0, set()
    with open(device_state, "wb") as out, open(ram, "wb") as pages:
        pages.truncate(sizes[block])
        out.write(data[: reader.pos])
        current = b""
        while reader.pos < len(data) and data[reader.pos] in (SECTION_PART, SECTION_END):
            kind = reader.u8()
            if reader.be32() != section:
                raise StreamFormatError("a section other than ram between the ram sections")
            out.write(bytes([kind]) + struct.pack(">I", section))
            # Inlined (no _Reader calls): a 512 MiB guest is ~131k records, most of them 9-byte zero pages.
            pos, size = reader.pos, len(data)
            while True:
                record = pos
                if pos + 8 > size:
                    raise StreamFormatError(f"the stream ends inside a record at byte {pos}")
                (header,) = unpack_be64(data, pos)
                pos += 8
                flags, offset = header & _FLAGS, header & ~_FLAGS
                if flags == FLAG_EOS:
                    break
                if flags & ~(FLAG_ZERO | FLAG_PAGE | FLAG_CONTINUE) or (flags & FLAG_ZERO) == (flags & FLAG_PAGE):
                    raise StreamFormatError(f"page record flags {flags:#x} at byte {record}")
                if not flags & FLAG_CONTINUE:
                    length = data[pos] if pos < size else 0
                    current = bytes(data[pos + 1 : pos + 1 + length])
                    pos += 1 + length
                if current not in sizes or offset + PAGE_SIZE > sizes[current]:
                    raise StreamFormatError(f"a page outside block {current!r} at byte {record}")
                end = pos + (1 if flags & FLAG_ZERO else PAGE_SIZE)
                if end > size:
                    raise StreamFormatError(f"the stream ends inside a record at byte {record}")
                payload, pos = data[pos:end], end
                if current != block:
                    # Another block (the firmware's): kept, named again, since the record before may be gone.
                    out.write(struct.pack(">QB", offset | (flags & ~FLAG_CONTINUE), len(current)) + current)
                    out.write(payload)
                elif flags & FLAG_PAGE or payload[0] or offset in written:  # a zero page stays a hole
                    page = payload if flags & FLAG_PAGE else bytes([payload[0]]) * PAGE_SIZE
                    os.pwrite(pages.fileno(), page, offset)
                    written.add(offset)
                    moved += PAGE_SIZE
            reader.pos = pos
            out.write(struct.pack(">Q", FLAG_EOS))
            _footer(reader, section)
            out.write(bytes([SECTION_FOOTER]) + struct.pack(">I", section))
        out.write(data[reader.pos :])
    return moved


def _footer(reader: _Reader, section: int) -> None:
    if reader.u8() != SECTION_FOOTER or reader.be32() != section:
        raise StreamFormatError(f"no section footer at byte {reader.pos}")


SYS_PROCESS_MADVISE = 440  # x86_64
MADV_PAGEOUT = 21


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def release_file_pages(pid: int, ram_file: Path) -> bool:
    """Reclaim the pages of `ram_file` that QEMU `pid` alone maps; whether the kernel took the advice.

    Saving reads every page of the guest RAM, and where RAM is a private mapping of a file, each page
    never touched before is then mapped from the page cache (the file's holes as zero-filled pages): up
    to the guest's whole size, in this QEMU's memory. They are clean file pages, so MADV_PAGEOUT drops
    them (a page other sandboxes map stays; the guest reads one back on its next touch). Only without
    swap: with it, the pages the guest wrote would be swapped out too. Best effort: another user's
    kernel may refuse (CAP_SYS_NICE), and nothing breaks then.
    """
    try:
        released = _page_out(pid, str(ram_file))
        _drop_cached_holes(ram_file)
    except OSError:  # QEMU gone, or /proc unreadable: nothing to release
        return False
    return released


def _drop_cached_holes(ram_file: Path) -> None:
    """The zero-filled pages that reading the file's holes left in the page cache (readahead adds
    more than were mapped): no mapping holds them now, and the file's data pages are left alone."""
    with open(ram_file, "rb") as f:
        fd, end, offset = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while offset < end:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            try:
                offset = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole up to the end
                offset = end
            if offset > hole:
                os.posix_fadvise(fd, hole, offset - hole, os.POSIX_FADV_DONTNEED)


def _page_out(pid: int, target: str) -> bool:
    if _swap_in_use():
        return False
    ranges = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append(_IOVec(start, end - start))
    if not ranges:
        return False
    vector = (_IOVec * len(ranges))(*ranges)
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_PROCESS_MADVISE, pidfd, vector, len(ranges), MADV_PAGEOUT, 0) >= 0
    finally:
        os.close(pidfd)


def _swap_in_use() -> bool:
    with open("/proc/swaps") as swaps:
        return len(swaps.read().splitlines()) > 1
