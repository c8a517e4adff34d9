"""Move guest RAM out of a QEMU 7.2 migration stream into a sparse file that clones map copy-on-write.

QEMU leaves a RAM block out of the stream (`x-ignore-shared`) only when it is a shared mapping. A
sandbox whose RAM is private (a boot template's RAM file mapped copy-on-write, or a clone's) saves
every page into the stream, and each clone would load them all into memory of its own. So the
stream is split: the pages of the guest RAM block go to a sparse file (zero pages stay holes), and
the rest, the same bytes QEMU writes for shared RAM, to the device state. A clone then restores it
like a snapshot of shared RAM: RAM mapped from the file, device state from the stream, and its
pages shared with every other clone until written. The split reads the stream once, in order, so it
runs on a socket while QEMU writes (vm/checkpoint.py).

The stream is QEMU's own (never the guest's), but its format is parsed strictly: anything this
module does not know (a flag, a section, a second RAM section) raises `StreamFormatError`, and the
caller keeps the stream as QEMU wrote it.

Format (QEMU 7.2, migration/savevm.c and migration/ram.c; all integers big-endian): the header,
the configuration section, then the "ram" section: START (block list), PART..., END, each a list of
page records (be64 offset|flags, the block name unless CONTINUE, then a fill byte for ZERO or a
page for PAGE) closed by EOS and a section footer; then the device sections, copied verbatim.
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import struct
import sys
from pathlib import Path

SECTION_START, SECTION_PART, SECTION_END = 0x01, 0x02, 0x03
SECTION_FOOTER = 0x7E
FLAG_ZERO, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_EOS, FLAG_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
PAGE_SIZE = 4096
RAM_SECTION = b"ram"
_FLAGS = PAGE_SIZE - 1
unpack_be64 = struct.Struct(">Q").unpack_from
BUFFER = 8 << 20  # the stream read so far and not yet moved on
LOW = 1 << 20  # below this much read ahead, the buffer is filled again (runs stop at its end)
RECORD_MAX = 8 + 1 + 255 + PAGE_SIZE  # header, block name, page


class StreamFormatError(ValueError):
    """The stream is not laid out as this module expects; it is left as it is."""


class _Input:
    """The stream through a buffer, in order, from a file or a socket: `buf[pos:end]` is read and unused.

    The page writes take views of the buffer (no copy) and release them at once; moving the unused
    bytes to the front is a same-size slice assignment, which views do not prevent.
    """

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, bytearray(BUFFER)
        self.view = memoryview(self.buf)
        self.pos = self.end = self.base = 0  # `base`: the stream offset of buf[0]
        self.eof = False

    @property
    def at(self) -> int:
        return self.base + self.pos

    def fill(self) -> int:
        """Read until the buffer is full or the stream ends; returns the bytes read ahead."""
        if self.pos:
            left = self.end - self.pos
            self.buf[:left] = self.buf[self.pos : self.end]
            self.base, self.pos, self.end = self.base + self.pos, 0, left
        while not self.eof and self.end < len(self.buf):
            count = os.readv(self.fd, [self.view[self.end :]])
            self.eof, self.end = count == 0, self.end + count
        return self.end - self.pos

    def ahead(self, count: int) -> int:
        """At least `count` bytes read ahead (fewer only at the stream's end, `count` <= LOW); how many."""
        if self.end - self.pos < max(count, LOW) and not self.eof:
            self.fill()
        return self.end - self.pos

    def take(self, count: int) -> bytes:
        if self.ahead(count) < count:
            raise StreamFormatError(f"the stream ends inside a record at byte {self.at}")
        chunk = bytes(self.buf[self.pos : self.pos + count])
        self.pos += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def be64(self) -> int:
        return int(unpack_be64(self.take(8))[0])

    def name(self) -> bytes:
        return self.take(self.u8())

    def close(self) -> None:
        self.view.release()


def _find_ram_start(data: bytes) -> int:
    """Offset of the ram section's START header: after the header and the configuration section."""
    if data[:8] != b"QEVM\x00\x00\x00\x03":
        raise StreamFormatError("not a version 3 migration stream")
    marker = bytes([len(RAM_SECTION)]) + RAM_SECTION + b"\x00\x00\x00\x00\x00\x00\x00\x04"  # instance 0, version 4
    found = data[:4096].find(marker)
    if found < 5 or data[found - 5] != SECTION_START:
        raise StreamFormatError("no ram section at the start of the stream")
    return found - 5


def split_fd(fd: int, device_state: Path, ram: Path, block: bytes = RAM_SECTION) -> int:
    """Write the stream read from `fd` (a socket QEMU writes to, or a saved file) up to its end without
    the pages of RAM block `block` to `device_state`, and those pages to `ram` (sparse, the block's
    size). Returns the bytes of page data moved. On a `StreamFormatError` the rest is still read, so
    that the writer can finish."""
    source = _Input(fd)
    try:
        return _split(source, device_state, ram, block)
    except StreamFormatError:
        while source.fill():
            source.pos = source.end
        raise
    finally:
        source.close()


def ram_sections(stream: Path, block: bytes = RAM_SECTION) -> bytes:
    """The start of a saved stream that leaves RAM block `block` out (a boot template's or a snapshot's):
    its header, configuration and ram sections, up to its first device section. They are what QEMU
    writes before the devices for RAM it leaves out, so device sections saved alone (QMP
    `xen-save-devices-state`, vm/checkpoint.py) behind them make a stream a clone restores."""
    with open(stream, "rb") as file:
        source = _Input(file.fileno())
        try:
            section, sizes = _block_list(source, block)
            while source.ahead(1) and source.buf[source.pos] in (SECTION_PART, SECTION_END):
                source.u8()
                if source.be32() != section:
                    raise StreamFormatError("a section other than ram between the ram sections")
                _skip_records(source, sizes, block)
                _footer(source, section)
            if source.base:
                raise StreamFormatError(f"the ram sections of {stream} end past byte {len(source.buf)}")
            return bytes(source.buf[: source.pos])
        finally:
            source.close()


def _skip_records(source: _Input, sizes: dict[bytes, int], block: bytes) -> None:
    """Read a ram section's records up to its EOS, strictly; none may be a page of `block`."""
    current = b""
    while True:
        record = source.at
        header = source.be64()
        flags, offset = header & _FLAGS, header & ~_FLAGS
        if flags == FLAG_EOS:
            return
        if flags & ~(FLAG_ZERO | FLAG_PAGE | FLAG_CONTINUE) or bool(flags & FLAG_ZERO) == bool(flags & FLAG_PAGE):
            raise StreamFormatError(f"page record flags {flags:#x} at byte {record}")
        if not flags & FLAG_CONTINUE:
            current = source.name()
        if current == block or current not in sizes or offset + PAGE_SIZE > sizes[current]:
            raise StreamFormatError(f"a page of block {current!r} at byte {record}")
        source.take(1 if flags & FLAG_ZERO else PAGE_SIZE)


def _block_list(source: _Input, block: bytes) -> tuple[int, dict[bytes, int]]:
    """Read the stream up to the end of the ram section's START (its block list): its section id and
    every block's size; block `block` must be among them."""
    if source.fill() < 8:
        raise StreamFormatError("the stream is empty")
    source.pos = _find_ram_start(bytes(source.buf[: min(source.end, 4096)])) + 1
    section = source.be32()
    source.take(len(RAM_SECTION) + 1 + 8)  # name, instance, version (matched above)
    total = source.be64()
    if not total & FLAG_MEM_SIZE:
        raise StreamFormatError("the ram section does not start with its block list")
    total &= ~_FLAGS
    sizes: dict[bytes, int] = {}
    while sum(sizes.values()) < total:
        name = source.name()
        sizes[name] = source.be64()
        source.be64()  # the block's guest address (x-ignore-shared is always set when saving)
    if block not in sizes or source.be64() != FLAG_EOS:
        raise StreamFormatError(f"the ram section has no block {block!r} or does not end its block list")
    _footer(source, section)
    if source.base:
        raise StreamFormatError(f"the ram section's block list ends at byte {source.at}, past the first read")
    return section, sizes


def _split(source: _Input, device_state: Path, ram: Path, block: bytes) -> int:
    section, sizes = _block_list(source, block)
    with open(device_state, "wb") as out, open(ram, "wb") as pages:
        pages.truncate(sizes[block])
        out.write(source.buf[: source.pos])
        splitter = _Splitter(source, sizes, block, out, pages.fileno())
        while source.ahead(1) and source.buf[source.pos] in (SECTION_PART, SECTION_END):
            kind = source.u8()
            if source.be32() != section:
                raise StreamFormatError("a section other than ram between the ram sections")
            out.write(bytes([kind]) + struct.pack(">I", section))
            splitter.section()
            out.write(struct.pack(">Q", FLAG_EOS))
            _footer(source, section)
            out.write(bytes([SECTION_FOOTER]) + struct.pack(">I", section))
        while source.ahead(1):  # the device sections, as they are
            out.write(source.view[source.pos : source.end])
            source.pos = source.end
    return splitter.moved


ZERO_RECORD, PAGE_RECORD = 9, 8 + PAGE_SIZE  # a page record of a continued block: header, then a fill byte or a page
RUN = 2048  # records checked at once; a run of zero pages or of pages is checked and moved in a few C calls
IOV_MAX = 1024


def _headers(first: int, count: int) -> bytes:
    """The big-endian headers of `count` records of consecutive pages, the first header `first`."""
    values = array.array("Q", range(first, first + count * PAGE_SIZE, PAGE_SIZE))
    if sys.byteorder == "little":
        values.byteswap()
    return values.tobytes()


class _Splitter:
    """The records of the ram sections: block `block`'s to the ram file, the others' to the device state.

    A record at a time is slow in Python (a 512 MiB guest is ~131k records, most of them 9-byte zero
    pages), so after each record of the block the records that continue it, the same kind on the next
    pages, are matched in bulk: their headers are compared with the headers they must have, byte for
    byte, and their pages written with one `pwritev`. A record that does not match ends the run and is
    read on its own, strictly.
    """

    def __init__(self, source: _Input, sizes: dict[bytes, int], block: bytes, out, fd: int):
        self.source, self.sizes, self.block, self.out, self.fd = source, sizes, block, out, fd
        self.limit = sizes[block]
        self.written = bytearray(self.limit // PAGE_SIZE)  # 1 where a page of the ram file holds data
        self.moved = 0
        self.current = b""  # the block of the record before: QEMU continues a block across sections

    def section(self) -> None:
        """Move the records up to the section's EOS, and the EOS."""
        source = self.source
        while True:
            size = source.pos + source.ahead(RECORD_MAX)  # the buffer may move only here
            data, pos = source.buf, source.pos
            record = source.at
            if pos + 8 > size:
                raise StreamFormatError(f"the stream ends inside a record at byte {record}")
            (header,) = unpack_be64(data, pos)
            pos += 8
            flags, offset = header & _FLAGS, header & ~_FLAGS
            if flags == FLAG_EOS:
                source.pos = pos
                return
            if flags & ~(FLAG_ZERO | FLAG_PAGE | FLAG_CONTINUE) or bool(flags & FLAG_ZERO) == bool(flags & FLAG_PAGE):
                raise StreamFormatError(f"page record flags {flags:#x} at byte {record}")
            if not flags & FLAG_CONTINUE:
                length = data[pos] if pos < size else 0
                self.current = bytes(data[pos + 1 : pos + 1 + length])
                pos += 1 + length
            current = self.current
            if current not in self.sizes or offset + PAGE_SIZE > self.sizes[current]:
                raise StreamFormatError(f"a page outside block {current!r} at byte {record}")
            end = pos + (1 if flags & FLAG_ZERO else PAGE_SIZE)
            if end > size:
                raise StreamFormatError(f"the stream ends inside a record at byte {record}")
            if current != self.block:
                # Another block (the firmware's): kept, named again, since the record before may be gone.
                self.out.write(struct.pack(">QB", offset | (flags & ~FLAG_CONTINUE), len(current)) + current)
                self.out.write(data[pos:end])
                source.pos = end
            elif flags & FLAG_PAGE:
                more = self._run(end, offset + PAGE_SIZE, FLAG_PAGE | FLAG_CONTINUE, PAGE_RECORD)
                self._write([pos, *range(end + 8, end + 8 + more * PAGE_RECORD, PAGE_RECORD)], offset)
                source.pos = end + more * PAGE_RECORD
            elif data[pos]:  # a "zero" page filled with another byte
                self._write_page(bytes([data[pos]]) * PAGE_SIZE, offset)
                source.pos = end
            else:
                more = self._run(end, offset + PAGE_SIZE, FLAG_ZERO | FLAG_CONTINUE, ZERO_RECORD)
                self._zero(offset, 1 + more)
                source.pos = end + more * ZERO_RECORD

    def _run(self, pos: int, offset: int, flags: int, stride: int) -> int:
        """How many records from `pos` on (read ahead already) are `flags` records (zero pages filled
        with 0) of the pages from `offset` on, in order, each inside the block."""
        data, flag = self.source.buf, bytes([flags])
        room = min((self.source.end - pos) // stride, (self.limit - offset) // PAGE_SIZE, RUN)
        # An estimate from the flag bytes (and fill bytes) where the records must have them, in windows
        # that grow: a short run of pages must not read a byte from each of the next thousand pages ...
        count, window = 0, 8
        while count < room:
            start, width = pos + count * stride, min(window, room - count)
            stop = start + width * stride
            found = width - len(data[start + 7 : stop : stride].lstrip(flag))
            if stride == ZERO_RECORD:
                found = min(found, width - len(data[start + 8 : stop : stride].lstrip(b"\x00")))
            count += found
            if found < width:
                break
            window *= 4
        if count == 0:
            return 0
        # ... then every header compared whole; the longest prefix that matches is the run.
        headers = _headers(offset | flags, count)

        def matches(n: int) -> bool:
            end = pos + n * stride
            return all(data[pos + i : end : stride] == headers[i : 8 * n : 8] for i in range(8))

        if matches(count):
            return count
        good, bad = 0, count
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if matches(middle) else (good, middle)
        return good

    def _write(self, payloads: list[int], offset: int) -> None:
        """The pages at stream positions `payloads` into the ram file from `offset` on."""
        for first in range(0, len(payloads), IOV_MAX):
            chunk = payloads[first : first + IOV_MAX]
            parts = [self.source.view[p : p + PAGE_SIZE] for p in chunk]
            try:
                at = offset + first * PAGE_SIZE
                if os.pwritev(self.fd, parts, at) != len(parts) * PAGE_SIZE:
                    raise OSError(errno.ENOSPC, f"short write of guest RAM at offset {at}")
            finally:
                for part in parts:
                    part.release()
        page = offset // PAGE_SIZE
        self.written[page : page + len(payloads)] = b"\x01" * len(payloads)
        self.moved += len(payloads) * PAGE_SIZE

    def _write_page(self, page: bytes, offset: int) -> None:
        if os.pwrite(self.fd, page, offset) != PAGE_SIZE:
            raise OSError(errno.ENOSPC, f"short write of guest RAM at offset {offset}")
        self.written[offset // PAGE_SIZE] = 1
        self.moved += PAGE_SIZE

    def _zero(self, offset: int, count: int) -> None:
        """Zero pages stay holes; one the stream wrote before (never in practice) is zeroed."""
        first = offset // PAGE_SIZE
        end = first + count
        while (page := self.written.find(1, first, end)) != -1:
            self._write_page(bytes(PAGE_SIZE), page * PAGE_SIZE)
            first = page + 1


def _footer(reader: _Input, section: int) -> None:
    if reader.u8() != SECTION_FOOTER or reader.be32() != section:
        raise StreamFormatError(f"no section footer at byte {reader.at}")


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
        fd, end = f.fileno(), os.fstat(f.fileno()).st_size
        hole = 0
        for start, stop in [*data_extents(fd, end), (end, end)]:
            if start > hole:
                os.posix_fadvise(fd, hole, start - hole, os.POSIX_FADV_DONTNEED)
            hole = stop


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of each run of data below `size` in the file `fd` (SEEK_DATA/SEEK_HOLE)."""
    extents, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # holes to the end
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        offset = end
    return extents


def _page_out(pid: int, target: str) -> bool:
    if _swap_in_use():
        return False
    pidfd = os.pidfd_open(pid)  # before the maps: a pid reused meanwhile cannot get another's ranges advised
    try:
        return _advise(pidfd, pid, target)
    finally:
        os.close(pidfd)


def _advise(pidfd: int, pid: int, target: str) -> bool:
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
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.syscall(SYS_PROCESS_MADVISE, pidfd, vector, len(ranges), MADV_PAGEOUT, 0) >= 0)


def _swap_in_use() -> bool:
    with open("/proc/swaps") as swaps:
        return len(swaps.read().splitlines()) > 1
