"""The checkpoint contract: how the agent parks for a snapshot and how it is woken.

A full snapshot must catch the guest at a point both sides understand. The
host opens a `checkpoint` stream; the agent answers it, flushes, and then
reads raw bytes from the agent port (no frames) until it has one wake
record. The host saves the machine while it waits there, so every clone
restored from that memory continues from the same read:

    magic  8 bytes   WAKE_MAGIC
    flags  u8        WAKE_NEW_HOST: a restored clone talking to a new host
    time   u64 BE    the host's CLOCK_REALTIME in ns (the guest's clock stood still)
    seed   WAKE_SIZE bytes of host entropy for the kernel RNG

The machine that was snapshotted gets a record without WAKE_NEW_HOST and
carries on with its channel. A clone gets one with it: the agent drops the
old host's streams (their processes keep running, their output is
discarded), starts a fresh channel with a new HELLO and applies the new
host's settings (clock, hostname, network, a new CA) without mounting its
disks again. Stdlib only: the guest imports it.
"""

from __future__ import annotations

import struct

from .boot import WAKE_SIZE

WAKE_MAGIC = b"MLWAKE01"
WAKE_NEW_HOST = 1
_HEADER = struct.Struct(">8sBQ")
WAKE_RECORD_SIZE = _HEADER.size + WAKE_SIZE


def encode_wake(*, new_host: bool, time_ns: int, seed: bytes) -> bytes:
    if len(seed) != WAKE_SIZE:
        raise ValueError(f"the wake seed must be {WAKE_SIZE} bytes")
    return _HEADER.pack(WAKE_MAGIC, WAKE_NEW_HOST if new_host else 0, time_ns) + seed


def decode_wake(record: bytes) -> tuple[bool, int, bytes]:
    """(new_host, time_ns, seed); a ValueError for anything that is not a wake record."""
    if len(record) != WAKE_RECORD_SIZE:
        raise ValueError(f"a wake record is {WAKE_RECORD_SIZE} bytes, not {len(record)}")
    magic, flags, time_ns = _HEADER.unpack_from(record)
    if magic != WAKE_MAGIC or flags & ~WAKE_NEW_HOST:
        raise ValueError("not a wake record")
    return bool(flags & WAKE_NEW_HOST), time_ns, record[_HEADER.size :]
