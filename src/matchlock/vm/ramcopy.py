"""The RAM of a stopped machine that maps its RAM file copy-on-write, saved without QEMU streaming it.

Sandboxes started from a boot template or a snapshot map that file `share=off`, and QEMU 7.2 saves such
RAM page by page into the migration stream: it reads every page of the guest's size, and a page never
touched before is faulted in from the file, each hole as a page-cache page it must zero. For a 512 MiB
guest that took 1.3 s, 84% of it zeroing those pages, however little the guest had written.

What the guest wrote is known without QEMU: the pages of that mapping that are anonymous, the private
copies a write made (/proc/PID/pagemap: present and not a file page, or swapped out). So the saved RAM
file is the mapped file's data with those pages written over it, read from QEMU's memory
(/proc/PID/mem) while the vCPUs are stopped. The cost follows what the guest wrote, not its size.
QEMU's own state, every section but RAM, comes from QMP `xen-save-devices-state` (vm/checkpoint.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from .ramstream import PAGE_SIZE, data_extents

CHUNK = 1 << 20  # bytes of written pages moved per read
# The top byte of a little-endian pagemap entry: bit 63 present, 62 swapped, 61 a file page (or shared).
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20
# Per top byte: 1 where the page is the process's own copy (present and anonymous, or swapped out).
_OWN_COPY = bytes(1 if b & _SWAPPED or (b & _PRESENT and not b & _FILE) else 0 for b in range(256))
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class MappingNotFound(LookupError):
    """The process maps no such file as one private region from its start (then RAM is saved otherwise)."""


def find_mapping(pid: int, ram_file: Path, size: int) -> int:
    """The address where `pid` maps the first `size` bytes of `ram_file` (that inode: a template
    replaced since by rename is still the one mapped) privately and writably, as one region."""
    stat = os.stat(ram_file)
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}"
    pieces: list[tuple[int, int, int]] = []  # (file offset, start, end): QEMU's madvise may split the region
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] != str(stat.st_ino) or fields[3] != device:
                continue
            if fields[1][:2] != "rw" or fields[1][3] != "p":
                raise MappingNotFound(f"{ram_file} is mapped {fields[1]}, not private and writable")
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pieces.append((int(fields[2], 16), start, end))
    pieces.sort()
    if not pieces or pieces[0][0] != 0:
        raise MappingNotFound(f"process {pid} does not map {ram_file} from its start")
    base = pieces[0][1]
    for offset, start, _end in pieces:
        if start != base + offset:
            raise MappingNotFound(f"process {pid} maps {ram_file} in pieces that are not contiguous")
    if pieces[-1][2] - base < size:
        raise MappingNotFound(f"process {pid} maps less than {size} bytes of {ram_file}")
    return base


def check_readable(pid: int) -> None:
    """Raise OSError unless this process may read `pid`'s memory (ptrace access, checked at open)."""
    os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))


def own_pages(pid: int, base: int, pages: int) -> bytes:
    """One byte per page from `base` on: 1 where `pid` holds its own copy of the page (it was written)."""
    want = pages * 8
    entries = bytearray()
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        while len(entries) < want:
            chunk = os.pread(pagemap.fileno(), want - len(entries), (base // PAGE_SIZE) * 8 + len(entries))
            if not chunk:
                raise OSError(errno.EIO, f"the page map of process {pid} ended early")
            entries += chunk
    return bytes(entries[7::8]).translate(_OWN_COPY)


def write_ram(pid: int, base: int, source: Path, target: Path, own: bytes) -> int:
    """Write `target` (sparse, one page per byte of `own`): `source`'s data, then the pages `own` marks
    read from `pid`'s memory at `base`. Returns the bytes read from the process."""
    size = len(own) * PAGE_SIZE
    moved = 0
    with open(source, "rb") as src, open(target, "wb") as out, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        out.truncate(size)
        for start, end in data_extents(src.fileno(), size):
            _copy_range(src.fileno(), out.fileno(), start, end)
        zero = bytes(CHUNK)
        for first, count in runs(own):
            for at in range(first * PAGE_SIZE, (first + count) * PAGE_SIZE, CHUNK):
                length = min(CHUNK, (first + count) * PAGE_SIZE - at)
                data = _pread_full(mem.fileno(), length, base + at, pid)
                if data == zero[:length]:
                    _punch(out.fileno(), at, length)  # zeroed by the guest: a hole, as in a saved stream
                elif os.pwrite(out.fileno(), data, at) != length:
                    raise OSError(errno.ENOSPC, f"short write of guest RAM at offset {at}")
                moved += length
    return moved


def runs(marks: bytes) -> list[tuple[int, int]]:
    """(first, count) of each run of 1 bytes in `marks`."""
    found, at = [], marks.find(1)
    while at != -1:
        end = marks.find(0, at)
        end = len(marks) if end == -1 else end
        found.append((at, end - at))
        at = marks.find(1, end)
    return found


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    while start < end:
        count = os.copy_file_range(src, dst, end - start, start, start)
        if count <= 0:
            raise OSError(errno.EIO, f"copying guest RAM stopped at offset {start}")
        start += count


def _pread_full(fd: int, length: int, at: int, pid: int) -> bytes:
    data = os.pread(fd, length, at)
    while len(data) < length:
        more = os.pread(fd, length - len(data), at + len(data))
        if not more:
            raise OSError(errno.EIO, f"reading the memory of process {pid} stopped at {at + len(data):#x}")
        data += more
    return data


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"punching a hole in the saved RAM at offset {offset}: {os.strerror(error)}")
