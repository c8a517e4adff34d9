"""A hostile guest fuzzing the host's agent channel (vm/channel.py) over a real socketpair.

The host opens exec streams and reads them as the sandbox does (`next_reply` with the exec grammar),
some consumers slowly or not at all; the guest answers each with seeded random frames: replies in
any order and with bad fields, data on any channel (past the window too), floods of messages nobody
reads, frames for streams that ended or never existed, resets and closes. Whatever the interleaving:

- a consumer only ever gets a record or event of its grammar, or GuestProtocolError (never another
  exception, never VMError's "the agent channel failed", which is the channel's catch-all for bugs);
- every queue stays within its documented bound: at most MAX_QUEUED_EVENTS unread events, of them at
  most MAX_QUEUED_MESSAGES messages, and no more unread DATA than the window allows;
- once the guest breaks the protocol the channel stays broken with GuestProtocolError and every
  waiting consumer ends (the pytest timeout catches a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from fake_guest import booted

from matchlock.api.errors import GuestProtocolError
from matchlock.vm.channel import MAX_QUEUED_EVENTS, MAX_QUEUED_MESSAGES, GuestStream
from matchlock.wire.frames import HEADER, FrameKind, encode_frame
from matchlock.wire.mux import INITIAL_WINDOW, DataReceived, MessageReceived, StreamClosed, StreamReset, _encode_json
from matchlock.wire.replies import ExecReplies, Exited, OpError

pytestmark = pytest.mark.timeout(120)  # a hang detector, not a performance assertion

SEEDS = range(8)
ROUNDS = 80

REPLIES = [{"type": "started", "pid": 7}, {"type": "started"}, {"type": "exit", "code": 0},
           {"type": "exit", "code": 3, "signal": 9}, {"type": "error", "message": "no", "errno": 2},
           {"type": "exit", "code": 300}, {"type": "started", "pid": True}, {"type": 5}, {"type": None},
           {"type": "result"}, {"type": "ready", "boot_ms": 1}, {"type": "error", "message": "m" * 10_000},
           {"type": "exit", "code": 0, "stamps": [["a", 1]] * 70}, {"no": "type"}]  # fmt: skip


async def consume(stream: GuestStream, rng: random.Random, slow: bool) -> str:
    """Read the stream as a sandbox consumer would; how it ended."""
    replies = ExecReplies()
    while True:
        try:
            reply = await stream.next_reply(replies)
        except GuestProtocolError:
            return "protocol error"
        if isinstance(reply, DataReceived):
            if not slow or rng.random() < 0.2:
                stream.consumed(len(reply.data))
            await asyncio.sleep(0)
        elif isinstance(reply, (StreamClosed, StreamReset)):
            return type(reply).__name__
        else:
            assert isinstance(reply, (MessageReceived, Exited, OpError)) or type(reply).__name__ in (
                "Started", "ChannelEnded"), reply  # fmt: skip


def guest_frames(rng: random.Random, sid: int, never: int, ended: dict[int, set[int]], closed: set[int]) -> bytes:
    """A burst from the hostile guest for stream `sid`: frames the multiplexer takes (in any order the
    exec grammar may refuse), and now and then one that breaks the whole channel."""
    out = []
    channels = ended.setdefault(sid, set())
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        if 0.35 <= choice < 0.7 and len(channels) == 3:
            choice = 0.9
        if choice < 0.35:
            out.append(encode_frame(FrameKind.MESSAGE, sid, _encode_json(rng.choice(REPLIES))))
        elif choice < 0.6:
            size = rng.choice([0, 1, 1000, 65535, INITIAL_WINDOW // 8])
            channel = rng.choice(sorted({0, 1, 2} - channels))
            out.append(encode_frame(FrameKind.DATA, sid, bytes([channel]) + bytes(size)))
        elif choice < 0.7:
            channel = rng.choice(sorted({0, 1, 2} - channels))
            channels.add(channel)
            out.append(encode_frame(FrameKind.EOF, sid, bytes([channel])))
        elif choice < 0.78:
            closed.add(sid)
            out.append(
                encode_frame(FrameKind.CLOSE, sid) if choice < 0.75 else encode_frame(FrameKind.RESET, sid, b"{}")
            )
            break
        elif choice < 0.985:
            out.append(encode_frame(FrameKind.WINDOW, sid, rng.choice([1, 4096, 1 << 20]).to_bytes(4, "big")))
        else:
            out.append(rng.choice([
                encode_frame(FrameKind.MESSAGE, sid, b'{"type": "started"}') * (MAX_QUEUED_MESSAGES + 2),
                encode_frame(FrameKind.MESSAGE, 0, _encode_json(rng.choice(REPLIES))),
                encode_frame(FrameKind.DATA, never, b"\x01x"),
                encode_frame(FrameKind.OPEN, 2 * rng.randint(1, 5), b'{"op": "exec"}'),
                HEADER.pack(rng.choice([17, 1 << 21, 1 << 31]), rng.choice([3, 5, 9]), sid),
                encode_frame(FrameKind.WINDOW, sid, (1 << 31).to_bytes(4, "big")),
            ]))  # fmt: skip
    return b"".join(out)


def check_bounds(stream: GuestStream) -> None:
    events = list(stream._events)
    assert len(events) <= MAX_QUEUED_EVENTS
    assert sum(isinstance(e, MessageReceived) for e in events) <= MAX_QUEUED_MESSAGES
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) <= INITIAL_WINDOW


@pytest.mark.parametrize("seed", SEEDS)
async def test_hostile_guest_frames_end_in_the_protocol_error_only(seed: int) -> None:
    rng = random.Random(seed)
    outcomes: list[str] = []
    async with booted() as (channel, guest):
        consumers: list[asyncio.Task] = []
        streams: list[GuestStream] = []
        ended: dict[int, set[int]] = {}
        closed: set[int] = set()
        for _ in range(ROUNDS):
            if channel.broken is not None:
                break
            if rng.random() < 0.3 or len(closed) == len(streams):
                stream = channel.open({"op": "exec", "argv": ["true"]})
                streams.append(stream)
                consumers.append(asyncio.create_task(consume(stream, rng, slow=rng.random() < 0.5)))
            live = [s.id for s in streams if s.id not in closed]
            if not live:
                continue
            sid = rng.choice(live)
            with contextlib.suppress(ConnectionError):  # the host closes its end once the guest broke the protocol
                await guest.send_raw(guest_frames(rng, sid, never=streams[-1].id + 2, ended=ended, closed=closed))
            for _ in range(5):
                await asyncio.sleep(0)
            for stream in streams:
                check_bounds(stream)
        # The end: a frame no stream state allows (a second HELLO) breaks whatever is still open.
        with contextlib.suppress(ConnectionError):
            await guest.send_raw(encode_frame(FrameKind.HELLO, 0, b"{}"))
        async with asyncio.timeout(60):
            outcomes = list(await asyncio.gather(*consumers))
        assert isinstance(channel.broken, GuestProtocolError), repr(channel.broken)
        assert "agent channel failed" not in str(channel.broken)
        for stream in streams:
            check_bounds(stream)
    assert set(outcomes) <= {"protocol error", "StreamClosed", "StreamReset"}, outcomes
    assert "protocol error" in outcomes
