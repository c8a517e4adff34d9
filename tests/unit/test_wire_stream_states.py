"""The mux stream life cycle: every (state, action) pair against STREAM_TRANSITIONS.

Each case puts a host-side stream into a state with real frames, tries one
action and checks that the Connection does exactly what the table says: a
listed pair moves to the listed state, a missing pair is refused with the
error of whoever broke the rule.
"""

from __future__ import annotations

import itertools
import struct

import pytest

from matchlock.wire.frames import FrameKind, LocalProtocolError, RemoteProtocolError, encode_frame
from matchlock.wire.mux import (
    ACTION_NAMES,
    INITIAL_WINDOW,
    STATE_NAMES,
    STREAM_TRANSITIONS,
    TERMINAL_STATES,
    Connection,
    HelloReceived,
    Role,
    StreamAction,
    StreamState,
)

LIVE_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE)


def host_stream(state: int) -> tuple[Connection, int]:
    """A handshaken host with one stream (id 1) driven into `state`, nothing left to send."""
    host, guest = Connection(Role.HOST), Connection(Role.GUEST)
    guest.send_hello()
    assert host.receive_data(guest.data_to_send()) == [HelloReceived({})]
    host.send_hello()
    guest.receive_data(host.data_to_send())
    sid = host.open_stream({"op": "ping"})
    if state in (StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED):
        host.close_stream(sid)
    if state in (StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED):
        host.receive_data(encode_frame(FrameKind.CLOSE, sid))
    if state == StreamState.RESET:
        host.reset_stream(sid, "test")
    host.data_to_send()
    assert host.stream_state(sid) == (None if state in TERMINAL_STATES else state)
    return host, sid


def perform(host: Connection, sid: int, action: int) -> bytes:
    """Do `action` on the stream; return the frames the host queued because of it."""
    if action == StreamAction.SEND:
        host.send_message(sid, {"type": "signal", "signal": 15})
    elif action == StreamAction.RECEIVE:
        host.receive_data(encode_frame(FrameKind.MESSAGE, sid, b"{}"))
    elif action == StreamAction.CLOSE_LOCAL:
        host.close_stream(sid)
    elif action == StreamAction.CLOSE_REMOTE:
        host.receive_data(encode_frame(FrameKind.CLOSE, sid))
    elif action == StreamAction.RESET:
        host.reset_stream(sid, "abort")
    elif action == StreamAction.GRANT:
        host.consumed(sid, INITIAL_WINDOW)
    elif action == StreamAction.GRANTED:
        host.receive_data(encode_frame(FrameKind.WINDOW, sid, struct.pack(">I", 1)))
    else:
        raise AssertionError(f"no way to perform {ACTION_NAMES[action]}")
    return host.data_to_send()


def test_terminal_states_are_closed_and_reset():
    assert TERMINAL_STATES == {StreamState.CLOSED, StreamState.RESET}
    assert set(STATE_NAMES) == set(LIVE_STATES) | TERMINAL_STATES
    # Every transition starts from a live state and names a known state.
    assert all(state in LIVE_STATES and target in STATE_NAMES for (state, _), target in STREAM_TRANSITIONS.items())


@pytest.mark.parametrize(
    ("state", "action"),
    list(itertools.product(LIVE_STATES, ACTION_NAMES)),
    ids=[f"{STATE_NAMES[s]}-{ACTION_NAMES[a]}" for s, a in itertools.product(LIVE_STATES, ACTION_NAMES)],
)
def test_every_pair_of_a_live_state_does_what_the_table_says(state, action):
    host, sid = host_stream(state)
    target = STREAM_TRANSITIONS.get((state, action))
    if target is not None:
        sent = perform(host, sid, action)
        assert host.stream_state(sid) == (None if target in TERMINAL_STATES else target)
        expected_frame = {
            StreamAction.SEND: FrameKind.MESSAGE,
            StreamAction.CLOSE_LOCAL: FrameKind.CLOSE,
            StreamAction.RESET: FrameKind.RESET,
            StreamAction.GRANT: FrameKind.WINDOW,
        }.get(action)
        assert (sent[4] if sent else None) == expected_frame
        return
    if action == StreamAction.SEND:
        with pytest.raises(LocalProtocolError, match=f"stream {sid} already closed by this side"):
            perform(host, sid, action)
    elif action in (StreamAction.RECEIVE, StreamAction.CLOSE_REMOTE):
        with pytest.raises(RemoteProtocolError, match=f"frame on stream {sid} after the peer closed it"):
            perform(host, sid, action)
    else:
        # Closing twice is a no-op, and credit is not granted to a peer that can send no more.
        assert action in (StreamAction.CLOSE_LOCAL, StreamAction.GRANT)
        assert perform(host, sid, action) == b""
    assert host.stream_state(sid) == state


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES), ids=STATE_NAMES.get)
@pytest.mark.parametrize("action", sorted(ACTION_NAMES), ids=ACTION_NAMES.get)
def test_an_ended_stream_is_gone(state, action):
    host, sid = host_stream(state)
    if action == StreamAction.SEND:
        with pytest.raises(LocalProtocolError, match=f"stream {sid} is not open"):
            perform(host, sid, action)
    else:
        # Local calls are no-ops; late frames from the peer are dropped, not errors.
        assert perform(host, sid, action) == b""
    assert host.stream_state(sid) is None and host.open_streams == []
