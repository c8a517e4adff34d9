"""A hostile guest fuzzing the host's multiplexer (sans-IO): seeded sequences of legal frames in random
orders, split at random points, with one violation somewhere in most of them.

Each sequence is generated against a model of what the host has granted and closed, so every frame
before the violation is legal: none may raise, and each must give its event (or be dropped, for a
stream that ended). The violation must raise RemoteProtocolError, never anything else, before any
frame after it is looked at, and the connection must then stay broken. Throughout, the decoder keeps
at most one frame the header checks allowed (64 KiB before the handshake, 1 MiB after), no stream's
DATA ever exceeds what the host granted, and no window goes past 2^31-1.
"""

from __future__ import annotations

import random

import pytest

from matchlock.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameKind,
    LocalProtocolError,
    RemoteProtocolError,
    encode_frame,
)
from matchlock.wire.mux import (
    INITIAL_WINDOW,
    MAX_HELLO,
    MAX_WINDOW,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    ChannelEnded,
    Connection,
    DataReceived,
    HelloReceived,
    MessageReceived,
    Role,
    StreamClosed,
    StreamOpened,
    StreamReset,
    WindowOpened,
    _encode_json,
)

SEEDS = range(12)
SEQUENCES = 40  # per seed
HELLO = _encode_json({"protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION, "role": "guest", "features": []})


class Stream:
    """One host-opened stream as the guest sees it."""

    def __init__(self) -> None:
        self.window = INITIAL_WINDOW  # DATA the guest may still send
        self.granted_to_host = 0  # WINDOW the guest sent (the host's send window above INITIAL_WINDOW)
        self.ended: set[int] = set()
        self.guest_closed = False
        self.host_closed = False


class Fuzz:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.host = Connection(Role.HOST)
        self.sent = FrameDecoder()  # what the host sends: its WINDOW grants
        self.streams: dict[int, Stream] = {}
        self.ended: list[int] = []  # host streams gone (closed both ways or reset)
        self.highest_guest = 0
        self.accepted: dict[int, int] = {}  # DATA bytes the host took per stream
        self.granted: dict[int, int] = {}  # WINDOW bytes the host gave per stream

    # --- the host's side ------------------------------------------------------------------------------

    def host_acts(self) -> None:
        rng, live = self.rng, sorted(self.streams)
        choice = rng.random()
        if choice < 0.3 or not live:
            sid = self.host.open_stream({"op": "exec", "n": rng.randrange(100)})
            self.streams[sid] = Stream()
        elif choice < 0.7:
            self.host.consumed(rng.choice(live), rng.choice([1, 1000, INITIAL_WINDOW // 4, INITIAL_WINDOW]))
        elif choice < 0.85:
            sid = rng.choice(live)
            self.host.close_stream(sid)
            self.streams[sid].host_closed = True
            self._maybe_gone(sid)
        else:
            sid = rng.choice(live)
            self.host.reset_stream(sid, "x" * rng.choice([0, 10, 5000]))
            self._gone(sid)
        for frame in self.sent.feed(self.host.data_to_send()):
            if frame.kind == FrameKind.WINDOW:
                grant = int.from_bytes(frame.payload, "big")
                self.granted[frame.stream] = self.granted.get(frame.stream, 0) + grant
                if frame.stream in self.streams:
                    self.streams[frame.stream].window += grant

    def _gone(self, sid: int) -> None:
        del self.streams[sid]
        self.ended.append(sid)

    def _maybe_gone(self, sid: int) -> None:
        stream = self.streams[sid]
        if stream.guest_closed and stream.host_closed:
            self._gone(sid)

    # --- the guest's legal frames ----------------------------------------------------------------------

    def legal(self) -> tuple[bytes, type | None]:
        """A frame the protocol allows now, and the event it gives (None: dropped, or none)."""
        rng = self.rng
        sending = [sid for sid, s in self.streams.items() if not s.guest_closed]
        choice = rng.random()
        if choice < 0.08:
            return encode_frame(FrameKind.MESSAGE, 0, _encode_json({"type": "ready", "boot_ms": 1})), MessageReceived
        if choice < 0.12:
            self.highest_guest += 2 * rng.randint(1, 3)
            return encode_frame(FrameKind.OPEN, self.highest_guest, _encode_json({"op": "x"})), StreamOpened
        if choice < 0.2 and self.ended:
            sid = rng.choice(self.ended)  # a late frame for a stream that ended: dropped
            kind = rng.choice([FrameKind.DATA, FrameKind.MESSAGE, FrameKind.CLOSE, FrameKind.WINDOW])
            payload = {FrameKind.DATA: b"\x01late", FrameKind.MESSAGE: b"{}", FrameKind.CLOSE: b""}.get(
                kind, (1).to_bytes(4, "big")
            )
            return encode_frame(kind, sid, payload), None
        if not self.streams:
            return encode_frame(FrameKind.MESSAGE, 0, b"{}"), MessageReceived
        if choice < 0.3 or not sending:
            sid = rng.choice(sorted(self.streams))
            stream = self.streams[sid]
            if rng.random() < 0.5 and self.host.send_window(sid) + 1000 <= MAX_WINDOW and not stream.host_closed:
                return encode_frame(FrameKind.WINDOW, sid, (1000).to_bytes(4, "big")), WindowOpened
            self._gone(sid)
            return encode_frame(
                FrameKind.RESET, sid, _encode_json({"reason": "r" * rng.choice([0, 9000])})
            ), StreamReset
        sid = rng.choice(sending)
        stream = self.streams[sid]
        open_channels = [c for c in (1, 2) if c not in stream.ended]
        if choice < 0.75 and open_channels and stream.window:
            size = min(stream.window, rng.choice([0, 1, 100, 65536, INITIAL_WINDOW]), MAX_PAYLOAD - 1)
            stream.window -= size
            self.accepted[sid] = self.accepted.get(sid, 0) + size
            return encode_frame(FrameKind.DATA, sid, bytes([rng.choice(open_channels)]) + bytes(size)), DataReceived
        if choice < 0.82 and open_channels:
            channel = rng.choice(open_channels)
            stream.ended.add(channel)
            return encode_frame(FrameKind.EOF, sid, bytes([channel])), ChannelEnded
        if choice < 0.92:
            return encode_frame(FrameKind.MESSAGE, sid, _encode_json({"type": "exit", "code": 0})), MessageReceived
        stream.guest_closed = True
        self._maybe_gone(sid)
        return encode_frame(FrameKind.CLOSE, sid), StreamClosed

    # --- violations ----------------------------------------------------------------------------------------

    def violation(self) -> bytes:
        rng = self.rng
        never = (max([*self.streams, *self.ended, 1]) | 1) + 2 * rng.randint(1, 50)
        makers = [
            lambda: HEADER.pack(0, rng.choice([0, 9, 200, 255]), 1),  # unknown kind
            lambda: HEADER.pack(MAX_PAYLOAD + rng.randrange(1, 1 << 30), FrameKind.DATA, 1),  # too long
            lambda: encode_frame(FrameKind.DATA, never, b"\x01x"),  # a stream the host never opened
            lambda: encode_frame(FrameKind.HELLO, 0, HELLO),  # a second HELLO
            lambda: encode_frame(FrameKind.OPEN, never, b"{}"),  # a guest stream with a host id
            lambda: encode_frame(FrameKind.OPEN, self.highest_guest or 2, b"{}") if self.highest_guest else b"",
            lambda: encode_frame(FrameKind.DATA, 0, b"\x01x"),  # DATA on stream 0
            lambda: encode_frame(FrameKind.MESSAGE, 0, rng.choice([b"[]", b"nul", b"{", b"[" * 100_000, b"\xff"])),
            lambda: encode_frame(FrameKind.MESSAGE, 0, b'{"a": NaN}'),
        ]
        live = sorted(self.streams)
        if live:
            sid = rng.choice(live)
            stream = self.streams[sid]
            makers += [
                lambda: encode_frame(FrameKind.WINDOW, sid, bytes(4)),  # a zero grant
                lambda: encode_frame(FrameKind.WINDOW, sid, (MAX_WINDOW).to_bytes(4, "big")),  # past 2^31-1
                lambda: encode_frame(FrameKind.WINDOW, sid, bytes(3)),
                lambda: encode_frame(FrameKind.EOF, sid, rng.choice([b"", b"\x01\x01", b"\x07"])),
                lambda: encode_frame(FrameKind.RESET, sid, b"[1]"),
            ]
            if stream.guest_closed:
                makers.append(lambda: encode_frame(FrameKind.MESSAGE, sid, b"{}"))  # after its own CLOSE
            else:
                makers += [
                    lambda: encode_frame(FrameKind.DATA, sid, b"\x01" + bytes(stream.window + 1)),  # past the window
                    lambda: encode_frame(FrameKind.DATA, sid, rng.choice([b"", b"\x03x", b"\xffx"])),  # no channel
                    lambda: encode_frame(FrameKind.CLOSE, sid, b"x"),
                ]
                if stream.ended:
                    channel = min(stream.ended)
                    makers.append(lambda: encode_frame(FrameKind.DATA, sid, bytes([channel]) + b"x"))  # after EOF
        frame = b""
        while not frame:
            frame = rng.choice(makers)()
        return frame

    # --- checks ----------------------------------------------------------------------------------------------

    def check_bounds(self) -> None:
        limit = MAX_PAYLOAD if self.host.peer_info is not None else MAX_HELLO
        assert self.host._decoder.pending < HEADER_SIZE + limit
        for sid, accepted in self.accepted.items():
            assert accepted <= INITIAL_WINDOW + self.granted.get(sid, 0), f"stream {sid} took more than granted"
        for sid in self.host.open_streams:
            assert 0 <= self.host._streams[sid].recv_window and self.host.send_window(sid) <= MAX_WINDOW


def feed(fuzz: Fuzz, data: bytes) -> list:
    """`data` in random pieces: what the host made of it (the pieces' events in order)."""
    events, pos = [], 0
    while pos < len(data):
        step = fuzz.rng.choice([1, 7, 4096, 1 << 20, len(data)])
        events += fuzz.host.receive_data(data[pos : pos + step])
        pos += step
        fuzz.check_bounds()
    return events


@pytest.mark.parametrize("seed", SEEDS)
def test_hostile_frame_sequences_get_exactly_the_protocol_error(seed: int) -> None:
    rng = random.Random(seed)
    broke = 0
    for _ in range(SEQUENCES):
        fuzz = Fuzz(rng)
        if rng.random() < 0.1:  # before the handshake: anything but a HELLO on stream 0 breaks it
            bad = rng.choice([encode_frame(FrameKind.MESSAGE, 0, b"{}"), encode_frame(FrameKind.HELLO, 3, HELLO),
                              HEADER.pack(MAX_HELLO + 1, FrameKind.HELLO, 0), encode_frame(FrameKind.HELLO, 0, b"[]")])  # fmt: skip
            with pytest.raises(RemoteProtocolError):
                feed(fuzz, bad + HELLO)
            broke += 1
            continue
        assert [type(e) for e in feed(fuzz, encode_frame(FrameKind.HELLO, 0, HELLO))] == [HelloReceived]
        fuzz.host.send_hello({"config": 1})
        fuzz.host.data_to_send()
        violate_at = rng.randrange(1, 60) if rng.random() < 0.85 else None
        for step in range(60):
            for _ in range(rng.randint(0, 2)):
                fuzz.host_acts()
            if step == violate_at:
                frame = fuzz.violation()
                tail = fuzz.legal()[0]  # never looked at: the violation comes first
                with pytest.raises(RemoteProtocolError):
                    feed(fuzz, frame + tail)
                broke += 1
                # Broken for good: receiving raises, sending is a local error.
                with pytest.raises(RemoteProtocolError):
                    fuzz.host.receive_data(fuzz.legal()[0])
                with pytest.raises(LocalProtocolError):
                    fuzz.host.open_stream({"op": "ping"})
                break
            frames = [fuzz.legal() for _ in range(rng.randint(1, 5))]
            events = feed(fuzz, b"".join(frame for frame, _ in frames))
            expected = [kind for _, kind in frames if kind is not None]
            got = [type(e) for e in events]
            assert got == expected, (seed, step, got, expected)
        fuzz.check_bounds()
    assert broke >= SEQUENCES // 2  # the violations were reached, not only the legal frames
