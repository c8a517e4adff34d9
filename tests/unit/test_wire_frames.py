"""The frame codec: 9-byte header framing, never trusting the peer."""

from __future__ import annotations

import random
import struct

import pytest

from matchlock.wire.frames import (
    HEADER_SIZE,
    KIND_NAMES,
    MAX_PAYLOAD,
    MAX_STREAM_ID,
    Frame,
    FrameDecoder,
    FrameKind,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    encode_frame,
)

ALL_KINDS = sorted(KIND_NAMES)


def raw_header(length: int, kind: int, stream: int) -> bytes:
    return struct.pack(">IBI", length, kind, stream)


# --- encoding ---------------------------------------------------------------


def test_header_layout_is_length_kind_stream_big_endian():
    assert HEADER_SIZE == 9
    data = encode_frame(FrameKind.DATA, 0x01020304, b"xyz")
    assert data == b"\x00\x00\x00\x03" + b"\x03" + b"\x01\x02\x03\x04" + b"xyz"


def test_encode_empty_payload_is_header_only():
    assert encode_frame(FrameKind.CLOSE, 7) == b"\x00\x00\x00\x00\x07\x00\x00\x00\x07"


def test_encode_rejects_oversized_payload():
    with pytest.raises(LocalProtocolError, match=f"exceeds {MAX_PAYLOAD}"):
        encode_frame(FrameKind.DATA, 1, b"\0" * (MAX_PAYLOAD + 1))


def test_kind_names_cover_exactly_the_eight_kinds():
    assert KIND_NAMES == {
        1: "HELLO",
        2: "OPEN",
        3: "DATA",
        4: "EOF",
        5: "MESSAGE",
        6: "WINDOW",
        7: "CLOSE",
        8: "RESET",
    }
    assert FrameKind.DATA == 3 and FrameKind.RESET == 8


@pytest.mark.parametrize("kind", [0, 9, 255])
def test_encode_rejects_unknown_kind(kind):
    with pytest.raises(LocalProtocolError, match=f"unknown frame kind {kind}"):
        encode_frame(kind, 1, b"")


@pytest.mark.parametrize("stream", [-1, MAX_STREAM_ID + 1])
def test_encode_rejects_stream_id_out_of_range(stream):
    with pytest.raises(LocalProtocolError, match=f"stream id {stream} out of range"):
        encode_frame(FrameKind.DATA, stream, b"")


# --- round trips ------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_round_trip_every_kind(kind):
    decoder = FrameDecoder()
    frames = decoder.feed(encode_frame(kind, 42, b"payload"))
    assert frames == [Frame(kind, 42, b"payload")]
    assert frames[0].kind == kind and type(frames[0].kind) is int
    assert decoder.pending == 0
    decoder.close()


def test_round_trip_empty_payload():
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(FrameKind.EOF, 3)) == [Frame(FrameKind.EOF, 3, b"")]
    assert decoder.pending == 0


def test_round_trip_max_payload_and_max_stream_id():
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256)
    assert len(payload) == MAX_PAYLOAD
    decoder = FrameDecoder()
    frames = decoder.feed(encode_frame(FrameKind.DATA, MAX_STREAM_ID, payload))
    assert len(frames) == 1
    assert frames[0].stream == MAX_STREAM_ID
    assert frames[0].payload == payload
    assert decoder.pending == 0


def test_byte_at_a_time_feeding():
    sent = [
        Frame(FrameKind.HELLO, 0, b'{"a":1}'),
        Frame(FrameKind.CLOSE, 5, b""),
        Frame(FrameKind.DATA, 9, b"\x01hello world"),
    ]
    wire = b"".join(encode_frame(f.kind, f.stream, f.payload) for f in sent)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(wire)):
        out = decoder.feed(wire[i : i + 1])
        # A frame only comes out once its last byte arrived.
        for frame in out:
            assert frame in sent
        got += out
        assert decoder.pending < HEADER_SIZE + 20
    assert got == sent
    assert decoder.pending == 0
    decoder.close()


def test_many_frames_in_one_chunk():
    rng = random.Random(1234)
    sent = [
        Frame(rng.choice(ALL_KINDS), rng.randrange(0, 1000), rng.randbytes(rng.randrange(0, 300))) for _ in range(500)
    ]
    wire = b"".join(encode_frame(f.kind, f.stream, f.payload) for f in sent)
    decoder = FrameDecoder()
    assert decoder.feed(wire) == sent
    assert decoder.pending == 0


def test_random_split_points_give_same_frames():
    rng = random.Random(99)
    sent = [Frame(FrameKind.DATA, 1, rng.randbytes(rng.randrange(0, 5000))) for _ in range(50)]
    wire = b"".join(encode_frame(f.kind, f.stream, f.payload) for f in sent)
    decoder = FrameDecoder()
    got = []
    pos = 0
    while pos < len(wire):
        step = rng.randrange(1, 4000)
        got += decoder.feed(wire[pos : pos + step])
        pos += step
    assert got == sent


def test_chunk_ending_mid_frame_keeps_only_the_partial_frame():
    first = encode_frame(FrameKind.MESSAGE, 1, b"{}")
    second = encode_frame(FrameKind.DATA, 1, b"\x01" + b"x" * 100)
    decoder = FrameDecoder()
    assert decoder.feed(first + second[:50]) == [Frame(FrameKind.MESSAGE, 1, b"{}")]
    assert decoder.pending == 50
    assert decoder.feed(second[50:]) == [Frame(FrameKind.DATA, 1, b"\x01" + b"x" * 100)]
    assert decoder.pending == 0


# --- truncation -------------------------------------------------------------


def test_truncated_header_stays_pending_then_close_raises():
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(FrameKind.DATA, 1, b"abc")[:5]) == []
    assert decoder.pending == 5
    with pytest.raises(RemoteProtocolError, match=r"middle of a frame \(5 bytes pending\)"):
        decoder.close()


def test_truncated_payload_stays_pending_then_close_raises():
    wire = encode_frame(FrameKind.DATA, 1, b"0123456789")
    decoder = FrameDecoder()
    assert decoder.feed(wire[:-1]) == []
    assert decoder.pending == len(wire) - 1
    with pytest.raises(RemoteProtocolError, match=f"{len(wire) - 1} bytes pending"):
        decoder.close()


def test_close_after_complete_frames_is_fine():
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(FrameKind.CLOSE, 1)) == [Frame(FrameKind.CLOSE, 1, b"")]
    assert decoder.pending == 0
    assert decoder.close() is None
    assert decoder.feed(b"") == []  # closing did not leave anything behind
    assert FrameDecoder().close() is None  # nothing fed at all


def test_protocol_error_is_an_abstract_base():
    with pytest.raises(TypeError, match="raise RemoteProtocolError or LocalProtocolError"):
        ProtocolError("which side?")
    assert issubclass(RemoteProtocolError, ProtocolError) and issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


# --- hostile headers --------------------------------------------------------


def test_oversized_length_rejected_from_header_alone():
    decoder = FrameDecoder()
    with pytest.raises(
        RemoteProtocolError, match=f"frame of {MAX_PAYLOAD + 1} bytes exceeds the {MAX_PAYLOAD}-byte limit"
    ):
        decoder.feed(raw_header(MAX_PAYLOAD + 1, FrameKind.DATA, 1))


def test_huge_length_rejected_without_waiting_for_payload():
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="4294967295 bytes exceeds"):
        decoder.feed(raw_header(0xFFFFFFFF, FrameKind.DATA, 1) + b"a few bytes")


def test_oversized_length_rejected_after_byte_at_a_time_header():
    header = raw_header(MAX_PAYLOAD + 1, FrameKind.MESSAGE, 1)
    decoder = FrameDecoder()
    for b in header[:-1]:
        assert decoder.feed(bytes([b])) == []
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.feed(header[-1:])


def test_custom_limit_is_enforced():
    decoder = FrameDecoder(max_payload=10)
    assert decoder.feed(encode_frame(FrameKind.DATA, 1, b"x" * 10)) == [Frame(FrameKind.DATA, 1, b"x" * 10)]
    with pytest.raises(RemoteProtocolError, match="frame of 11 bytes exceeds the 10-byte limit"):
        decoder.feed(raw_header(11, FrameKind.DATA, 1))


@pytest.mark.parametrize("kind", [0, 9, 200, 255])
def test_unknown_kind_rejected(kind):
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match=f"unknown frame kind {kind}$"):
        decoder.feed(raw_header(0, kind, 1))


def test_unknown_kind_after_valid_frames_in_same_chunk():
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match="unknown frame kind 77"):
        decoder.feed(encode_frame(FrameKind.CLOSE, 1) + raw_header(3, 77, 1) + b"abc")


# --- fuzz -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_garbage_only_raises_protocol_error_and_stays_bounded(seed):
    rng = random.Random(seed)
    errors = 0
    for _ in range(300):
        decoder = FrameDecoder()
        stream = bytearray()
        consumed = 0
        try:
            for _ in range(rng.randrange(1, 20)):
                mode = rng.random()
                if mode < 0.5:
                    chunk = rng.randbytes(rng.randrange(1, 64))
                elif mode < 0.8:
                    # Plausible header: valid kind, arbitrary length, maybe a payload.
                    length = rng.choice([0, 1, 17, MAX_PAYLOAD, MAX_PAYLOAD + 1, rng.randrange(1 << 32)])
                    chunk = raw_header(length, rng.randrange(1, 9), rng.randrange(1 << 32))
                    chunk += rng.randbytes(rng.randrange(0, 200))
                else:
                    chunk = rng.randbytes(rng.randrange(1, 4096))
                stream += chunk
                frames = decoder.feed(chunk)
                for frame in frames:
                    assert frame.kind in KIND_NAMES
                    assert len(frame.payload) <= MAX_PAYLOAD
                    consumed += HEADER_SIZE + len(frame.payload)
                # What is kept is exactly the unconsumed tail, and it is at
                # most one incomplete frame whose header passed the checks.
                assert decoder.pending == len(stream) - consumed
                assert decoder.pending < HEADER_SIZE + MAX_PAYLOAD
                if decoder.pending >= HEADER_SIZE:
                    length, kind, _ = struct.unpack_from(">IBI", stream, consumed)
                    assert 1 <= kind <= 8 and length <= MAX_PAYLOAD
                    assert decoder.pending < HEADER_SIZE + length
            decoder.close()
        except RemoteProtocolError:
            errors += 1
        assert decoder.pending < HEADER_SIZE + MAX_PAYLOAD
    # Garbage is overwhelmingly rejected rather than silently accepted.
    assert errors > 150
