"""The stream multiplexer: two sans-IO Connections wired back to back."""

from __future__ import annotations

import json
import struct

import pytest

from matchlock.wire.frames import (
    KIND_NAMES,
    MAX_PAYLOAD,
    FrameKind,
    LocalProtocolError,
    RemoteProtocolError,
    encode_frame,
)
from matchlock.wire.mux import (
    DATA_CHUNK,
    INITIAL_WINDOW,
    MAX_WINDOW,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    STDERR,
    STDIN,
    STDOUT,
    ChannelEnded,
    Connection,
    DataReceived,
    HandshakeError,
    HelloReceived,
    MessageReceived,
    Role,
    StreamClosed,
    StreamOpened,
    StreamReset,
    WindowOpened,
)


def hello_payload(**overrides) -> bytes:
    body = {"protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION, "role": "guest", "features": []}
    body.update(overrides)
    body = {k: v for k, v in body.items() if v is not ...}
    return json.dumps(body).encode()


def frame(kind: FrameKind, stream: int, payload: bytes = b"") -> bytes:
    return encode_frame(kind, stream, payload)


def window(n: int) -> bytes:
    return struct.pack(">I", n)


def pair(**kwargs) -> tuple[Connection, Connection]:
    """A host and a guest with the handshake done and nothing left in flight."""
    host = Connection(Role.HOST, **kwargs)
    guest = Connection(Role.GUEST, **kwargs)
    guest.send_hello({"agent": "test"})
    assert host.receive_data(guest.data_to_send()) == [HelloReceived({"agent": "test"})]
    host.send_hello({"hostname": "box"})
    assert guest.receive_data(host.data_to_send()) == [HelloReceived({"hostname": "box"})]
    assert host.handshake_complete and guest.handshake_complete
    return host, guest


def deliver(src: Connection, dst: Connection) -> list:
    return dst.receive_data(src.data_to_send())


def open_pair(**kwargs) -> tuple[Connection, Connection, int]:
    host, guest = pair(**kwargs)
    sid = host.open_stream({"op": "exec", "command": "true"})
    assert deliver(host, guest) == [StreamOpened(sid, {"op": "exec", "command": "true"})]
    return host, guest, sid


def guest_ready() -> Connection:
    """A guest-side connection that has received a valid host HELLO."""
    guest = Connection(Role.GUEST)
    guest.send_hello()
    guest.data_to_send()
    guest.receive_data(frame(FrameKind.HELLO, 0, hello_payload(role="host")))
    return guest


# --- handshake --------------------------------------------------------------


def test_handshake_exchanges_info_and_features():
    host = Connection(Role.HOST, features=("a", "b"))
    guest = Connection(Role.GUEST, features=("b", "c"))
    assert not host.handshake_complete
    guest.send_hello({"k": 1})
    [event] = deliver(guest, host)
    assert event == HelloReceived({"k": 1})
    assert host.peer_info == {"k": 1}
    assert not host.handshake_complete  # host has not sent its HELLO yet
    host.send_hello()
    assert host.handshake_complete
    [event] = deliver(host, guest)
    assert event == HelloReceived({})
    assert host.negotiated_features == guest.negotiated_features == frozenset({"b"})


def test_hello_wire_format():
    guest = Connection(Role.GUEST, features=("z", "a"))
    guest.send_hello({"x": 1})
    data = guest.data_to_send()
    length, kind, stream = struct.unpack(">IBI", data[:9])
    assert (kind, stream, length) == (FrameKind.HELLO, 0, len(data) - 9)
    assert json.loads(data[9:]) == {
        "protocol": PROTOCOL_NAME,
        "version": PROTOCOL_VERSION,
        "role": "guest",
        "features": ["a", "z"],
        "info": {"x": 1},
    }


def test_send_hello_twice_is_a_local_error():
    host = Connection(Role.HOST)
    host.send_hello()
    with pytest.raises(LocalProtocolError, match="hello already sent"):
        host.send_hello()


def test_version_mismatch_names_both_versions():
    host = Connection(Role.HOST)
    with pytest.raises(HandshakeError) as info:
        host.receive_data(frame(FrameKind.HELLO, 0, hello_payload(version=PROTOCOL_VERSION + 1)))
    message = str(info.value)
    assert f"version {PROTOCOL_VERSION + 1}" in message
    assert f"this side speaks version {PROTOCOL_VERSION}" in message
    assert "rebuild the guest runtime" in message


def test_missing_version_is_a_mismatch():
    with pytest.raises(HandshakeError, match="version None"):
        Connection(Role.HOST).receive_data(frame(FrameKind.HELLO, 0, hello_payload(version=...)))


def test_wrong_protocol_name():
    with pytest.raises(HandshakeError, match=r"peer speaks 'http', not 'matchlock-wire'"):
        Connection(Role.HOST).receive_data(frame(FrameKind.HELLO, 0, hello_payload(protocol="http")))


@pytest.mark.parametrize(
    "role, claimed, expected",
    [(Role.HOST, "host", "guest"), (Role.GUEST, "guest", "host"), (Role.HOST, None, "guest")],
)
def test_wrong_role(role, claimed, expected):
    with pytest.raises(HandshakeError, match=f"peer claims role {claimed!r}, expected {expected!r}"):
        Connection(role).receive_data(frame(FrameKind.HELLO, 0, hello_payload(role=claimed)))


def test_handshake_error_is_a_protocol_error_and_breaks_the_connection():
    host = Connection(Role.HOST)
    with pytest.raises(RemoteProtocolError):
        host.receive_data(frame(FrameKind.HELLO, 0, hello_payload(version=0)))
    with pytest.raises(RemoteProtocolError, match="connection is broken: .*version 0"):
        host.receive_data(frame(FrameKind.HELLO, 0, hello_payload()))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"features": "abc"}, "features must be a list of strings"),
        ({"features": [1]}, "features must be a list"),
        ({"info": [1, 2]}, "HELLO info must be a JSON object"),
    ],
)
def test_malformed_hello_fields(overrides, match):
    with pytest.raises(RemoteProtocolError, match=match):
        Connection(Role.HOST).receive_data(frame(FrameKind.HELLO, 0, hello_payload(**overrides)))


def test_hello_on_nonzero_stream_rejected():
    with pytest.raises(RemoteProtocolError, match="HELLO on a stream other than 0"):
        Connection(Role.HOST).receive_data(frame(FrameKind.HELLO, 1, hello_payload()))


@pytest.mark.parametrize(
    "kind, stream, payload",
    [
        (FrameKind.OPEN, 2, b"{}"),
        (FrameKind.MESSAGE, 0, b'{"type":"ready"}'),
        (FrameKind.DATA, 1, b"\x01x"),
        (FrameKind.WINDOW, 1, window(5)),
        (FrameKind.CLOSE, 1, b""),
    ],
)
def test_frames_before_hello_rejected(kind, stream, payload):
    host = Connection(Role.HOST)
    with pytest.raises(RemoteProtocolError, match=f"{KIND_NAMES[kind]} frame before HELLO"):
        host.receive_data(frame(kind, stream, payload))


def test_duplicate_hello_rejected():
    host, guest = pair()
    with pytest.raises(RemoteProtocolError, match="duplicate HELLO"):
        host.receive_data(frame(FrameKind.HELLO, 0, hello_payload()))


def test_operations_before_handshake_are_local_errors():
    host = Connection(Role.HOST)
    with pytest.raises(LocalProtocolError, match="handshake not complete"):
        host.open_stream({})
    host.send_hello()  # sent but not received
    with pytest.raises(LocalProtocolError, match="handshake not complete"):
        host.send_message(0, {"type": "x"})


# --- streams ----------------------------------------------------------------


def test_stream_ids_by_role():
    host, guest = pair()
    assert [host.open_stream({}) for _ in range(3)] == [1, 3, 5]
    assert [guest.open_stream({}) for _ in range(3)] == [2, 4, 6]
    events = deliver(host, guest)
    assert [e.stream for e in events] == [1, 3, 5]
    events = deliver(guest, host)
    assert [type(e) for e in events] == [StreamOpened] * 3 and [e.stream for e in events] == [2, 4, 6]


def test_data_on_channels_eof_messages_and_close_from_both_sides():
    host, guest, sid = open_pair()
    host.send_data(sid, STDIN, b"input")
    host.end_channel(sid, STDIN)
    host.send_message(sid, {"type": "resize", "rows": 1, "cols": 2})
    assert deliver(host, guest) == [
        DataReceived(sid, STDIN, b"input"),
        ChannelEnded(sid, STDIN),
        MessageReceived(sid, {"type": "resize", "rows": 1, "cols": 2}),
    ]
    guest.send_message(sid, {"type": "started", "pid": 7})
    guest.send_data(sid, STDOUT, b"out")
    guest.send_data(sid, STDERR, b"err")
    guest.end_channel(sid, STDOUT)
    guest.end_channel(sid, STDERR)
    guest.send_message(sid, {"type": "exit", "code": 0})
    guest.close_stream(sid)
    assert guest.is_open(sid)  # only half closed
    assert deliver(guest, host) == [
        MessageReceived(sid, {"type": "started", "pid": 7}),
        DataReceived(sid, STDOUT, b"out"),
        DataReceived(sid, STDERR, b"err"),
        ChannelEnded(sid, STDOUT),
        ChannelEnded(sid, STDERR),
        MessageReceived(sid, {"type": "exit", "code": 0}),
        StreamClosed(sid),
    ]
    assert host.is_open(sid)
    host.close_stream(sid)
    assert not host.is_open(sid) and host.open_streams == []
    assert deliver(host, guest) == [StreamClosed(sid)]
    assert not guest.is_open(sid) and guest.open_streams == []


def test_close_is_idempotent_and_forbids_further_sends():
    host, guest, sid = open_pair()
    host.close_stream(sid)
    first = host.data_to_send()
    host.close_stream(sid)
    assert host.data_to_send() == b""
    assert first == frame(FrameKind.CLOSE, sid)
    with pytest.raises(LocalProtocolError, match=f"stream {sid} already closed by this side"):
        host.send_data(sid, STDIN, b"x")
    assert host.send_window(sid) == 0


def test_frames_after_peer_close_rejected():
    host, guest, sid = open_pair()
    guest.close_stream(sid)
    deliver(guest, host)
    with pytest.raises(RemoteProtocolError, match=f"MESSAGE frame on stream {sid} after the peer closed it"):
        host.receive_data(frame(FrameKind.MESSAGE, sid, b"{}"))


def test_data_split_into_chunks():
    host, guest, sid = open_pair()
    payload = bytes(range(256)) * ((DATA_CHUNK * 2 + 10) // 256 + 1)
    payload = payload[: DATA_CHUNK * 2 + 10]
    host.send_data(sid, STDIN, payload)
    events = deliver(host, guest)
    assert [len(e.data) for e in events] == [DATA_CHUNK, DATA_CHUNK, 10]
    assert b"".join(e.data for e in events) == payload


def test_local_misuse():
    host, guest, sid = open_pair()
    with pytest.raises(LocalProtocolError, match="unknown channel 3"):
        host.send_data(sid, 3, b"x")
    with pytest.raises(LocalProtocolError, match="unknown channel 9"):
        host.end_channel(sid, 9)
    with pytest.raises(LocalProtocolError, match="stream 99 is not open"):
        host.send_data(99, STDIN, b"x")
    with pytest.raises(LocalProtocolError, match="too large for one frame"):
        host.send_message(sid, {"x": "a" * MAX_PAYLOAD})


def test_messages_on_stream_zero():
    host, guest = pair()
    guest.send_message(0, {"type": "ready", "boot_ms": 5})
    assert deliver(guest, host) == [MessageReceived(0, {"type": "ready", "boot_ms": 5})]


@pytest.mark.parametrize("kind", [FrameKind.DATA, FrameKind.EOF, FrameKind.WINDOW, FrameKind.CLOSE, FrameKind.RESET])
def test_non_message_frames_on_stream_zero_rejected(kind):
    host, _ = pair()
    with pytest.raises(RemoteProtocolError, match=f"{KIND_NAMES[kind]} frame on stream 0"):
        host.receive_data(frame(kind, 0, b"\x01"))


# --- flow control -----------------------------------------------------------


def test_sender_cannot_exceed_window():
    host, guest, sid = open_pair(initial_window=100)
    assert host.send_window(sid) == 100
    host.send_data(sid, STDIN, b"x" * 60)
    assert host.send_window(sid) == 40
    with pytest.raises(LocalProtocolError, match=f"stream {sid}: 41 bytes exceed the send window of 40"):
        host.send_data(sid, STDIN, b"x" * 41)
    assert host.send_window(sid) == 40  # a refused send costs nothing
    host.send_data(sid, STDIN, b"x" * 40)
    assert host.send_window(sid) == 0
    with pytest.raises(LocalProtocolError):
        host.send_data(sid, STDIN, b"x")


def test_peer_exceeding_window_is_protocol_error():
    host, guest, sid = open_pair(initial_window=100)
    host.receive_data(frame(FrameKind.DATA, sid, b"\x01" + b"a" * 100))  # exactly the window: fine
    with pytest.raises(RemoteProtocolError, match=f"stream {sid}: peer sent 1 bytes with only 0 granted"):
        host.receive_data(frame(FrameKind.DATA, sid, b"\x01a"))


def test_peer_exceeding_default_window_in_one_frame():
    host, guest, sid = open_pair()
    with pytest.raises(RemoteProtocolError, match=f"peer sent {INITIAL_WINDOW + 1} bytes with only {INITIAL_WINDOW}"):
        host.receive_data(frame(FrameKind.DATA, sid, b"\x01" + b"a" * (INITIAL_WINDOW + 1)))


def test_window_granted_after_a_quarter_window_consumed():
    host, guest, sid = open_pair(initial_window=400)
    guest.send_data(sid, STDOUT, b"x" * 400)
    assert guest.send_window(sid) == 0
    deliver(guest, host)
    host.consumed(sid, 99)
    assert host.data_to_send() == b""  # below a quarter: batched
    host.consumed(sid, 1)
    assert host.data_to_send() == frame(FrameKind.WINDOW, sid, window(100))
    host.consumed(sid, 0)
    host.consumed(sid, -5)
    assert host.data_to_send() == b""
    host.consumed(sid, 300)
    assert deliver(host, guest) == [WindowOpened(sid)]
    assert guest.send_window(sid) == 300  # only the later grant was delivered here
    # The host now accepts a full window again.
    host.receive_data(frame(FrameKind.DATA, sid, b"\x01" + b"y" * 400))


def test_round_trip_flow_control_sustains_transfer():
    host, guest, sid = open_pair(initial_window=1024)
    total = 0
    for _ in range(50):
        n = guest.send_window(sid)
        assert n > 0
        guest.send_data(sid, STDOUT, b"z" * n)
        for event in deliver(guest, host):
            host.consumed(sid, len(event.data))
            total += len(event.data)
        deliver(host, guest)
    assert total >= 50 * 256


def test_no_grant_after_peer_closed():
    host, guest, sid = open_pair(initial_window=100)
    guest.send_data(sid, STDOUT, b"x" * 100)
    guest.close_stream(sid)
    deliver(guest, host)
    host.consumed(sid, 100)
    assert host.data_to_send() == b""


def test_consumed_for_unknown_stream_is_ignored():
    host, guest = pair()
    host.consumed(77, 10**6)
    assert host.data_to_send() == b""


@pytest.mark.parametrize(
    "payload, match",
    [
        (window(0), "invalid WINDOW increment 0"),
        (window(MAX_WINDOW), f"invalid WINDOW increment {MAX_WINDOW}"),
        (window(0xFFFFFFFF), "invalid WINDOW increment 4294967295"),
        (b"\x00\x01", "WINDOW frame with 2-byte payload"),
        (b"", "WINDOW frame with 0-byte payload"),
    ],
)
def test_bad_window_increments_rejected(payload, match):
    host, guest, sid = open_pair()
    with pytest.raises(RemoteProtocolError, match=match):
        host.receive_data(frame(FrameKind.WINDOW, sid, payload))


def test_window_up_to_max_accepted_then_overflow_rejected():
    host, guest, sid = open_pair()
    [event] = host.receive_data(frame(FrameKind.WINDOW, sid, window(MAX_WINDOW - INITIAL_WINDOW)))
    assert event == WindowOpened(sid)
    assert host.send_window(sid) == MAX_WINDOW
    with pytest.raises(RemoteProtocolError, match="invalid WINDOW increment 1 on stream"):
        host.receive_data(frame(FrameKind.WINDOW, sid, window(1)))


# --- stream id rules --------------------------------------------------------


def test_guest_opening_odd_id_rejected():
    host, _ = pair()
    with pytest.raises(RemoteProtocolError, match="peer opened stream 3, which is not in its id space"):
        host.receive_data(frame(FrameKind.OPEN, 3, b"{}"))


def test_host_opening_even_id_rejected_by_guest():
    guest = guest_ready()
    with pytest.raises(RemoteProtocolError, match="peer opened stream 2, which is not in its id space"):
        guest.receive_data(frame(FrameKind.OPEN, 2, b"{}"))


def test_open_on_stream_zero_rejected():
    host, _ = pair()
    with pytest.raises(RemoteProtocolError, match="peer opened stream 0"):
        host.receive_data(frame(FrameKind.OPEN, 0, b"{}"))


def test_reused_stream_id_rejected():
    host, guest = pair()
    host.receive_data(frame(FrameKind.OPEN, 4, b"{}"))
    with pytest.raises(RemoteProtocolError, match="peer reused stream id 4"):
        host.receive_data(frame(FrameKind.OPEN, 4, b"{}"))


def test_lower_stream_id_after_higher_rejected():
    host, guest = pair()
    host.receive_data(frame(FrameKind.OPEN, 6, b"{}"))
    with pytest.raises(RemoteProtocolError, match="peer reused stream id 2"):
        host.receive_data(frame(FrameKind.OPEN, 2, b"{}"))


@pytest.mark.parametrize("kind", [FrameKind.DATA, FrameKind.MESSAGE, FrameKind.CLOSE, FrameKind.WINDOW, FrameKind.EOF])
@pytest.mark.parametrize("sid", [1, 2, 101])
def test_frames_for_never_opened_streams_rejected(kind, sid):
    host, _ = pair()
    with pytest.raises(RemoteProtocolError, match=f"{KIND_NAMES[kind]} frame for stream {sid}, which was never opened"):
        host.receive_data(frame(kind, sid, b"\x01"))


def test_late_frames_for_finished_stream_dropped_silently():
    host, guest, sid = open_pair()
    host.close_stream(sid)
    guest.close_stream(sid)
    deliver(host, guest)
    deliver(guest, host)
    assert not host.is_open(sid)
    late = (
        frame(FrameKind.DATA, sid, b"\x01late")
        + frame(FrameKind.MESSAGE, sid, b"{}")
        + frame(FrameKind.WINDOW, sid, window(10))
        + frame(FrameKind.EOF, sid, b"\x01")
        + frame(FrameKind.CLOSE, sid)
    )
    assert host.receive_data(late) == []
    # still healthy
    guest.send_message(0, {"type": "ping"})
    assert deliver(guest, host) == [MessageReceived(0, {"type": "ping"})]


def test_late_frames_for_reset_guest_stream_dropped():
    host, guest = pair()
    gid = guest.open_stream({})
    deliver(guest, host)
    host.reset_stream(gid, "no")
    assert host.receive_data(frame(FrameKind.DATA, gid, b"\x01x")) == []


# --- reset ------------------------------------------------------------------


def test_reset_from_host_forgets_stream_on_both_sides():
    host, guest, sid = open_pair()
    host.reset_stream(sid, "cancelled by user")
    assert not host.is_open(sid)
    assert deliver(host, guest) == [StreamReset(sid, "cancelled by user")]
    assert not guest.is_open(sid)
    host.reset_stream(sid, "again")  # unknown now: nothing sent
    assert host.data_to_send() == b""


def test_reset_from_guest_and_reason_truncated():
    host, guest, sid = open_pair()
    guest.reset_stream(sid, "r" * 10000)
    [event] = deliver(guest, host)
    assert isinstance(event, StreamReset) and event.reason == "r" * 4096
    assert not host.is_open(sid)
    with pytest.raises(LocalProtocolError):
        host.send_data(sid, STDIN, b"x")


def test_reset_with_oversized_reason_from_peer_truncated():
    host, guest, sid = open_pair()
    [event] = host.receive_data(frame(FrameKind.RESET, sid, json.dumps({"reason": "q" * 50000}).encode()))
    assert event == StreamReset(sid, "q" * 4096)


def test_reset_without_reason_and_with_bad_json():
    host, guest, sid = open_pair()
    assert host.receive_data(frame(FrameKind.RESET, sid, b"{}")) == [StreamReset(sid, "")]
    host2, guest2, sid2 = open_pair()
    with pytest.raises(RemoteProtocolError, match="malformed JSON in RESET frame"):
        host2.receive_data(frame(FrameKind.RESET, sid2, b"nope"))


# --- hostile payloads -------------------------------------------------------


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"{not json", "malformed JSON in MESSAGE frame"),
        (b"\xff\xfe", "malformed JSON in MESSAGE frame"),
        (b"", "malformed JSON in MESSAGE frame"),
        (b"[1,2]", "MESSAGE frame must carry a JSON object, got list"),
        (b'"str"', "MESSAGE frame must carry a JSON object, got str"),
        (b"null", "MESSAGE frame must carry a JSON object, got NoneType"),
        (b"[" * 100000, "malformed JSON in MESSAGE frame"),
        (b'{"a":' * 100000, "malformed JSON in MESSAGE frame"),
        (b"1" * 10000, "malformed JSON in MESSAGE frame"),
        (b'{"code": NaN}', "malformed JSON in MESSAGE frame: invalid JSON constant NaN"),
        (b'{"a":1} {"b":2}', "malformed JSON in MESSAGE frame: extra data"),
        (b'{"a":"\x01"}', "malformed JSON in MESSAGE frame"),
    ],
)
def test_bad_json_message_is_protocol_error(payload, match):
    host, guest, sid = open_pair()
    with pytest.raises(RemoteProtocolError, match=match):
        host.receive_data(frame(FrameKind.MESSAGE, sid, payload))


def test_deeply_nested_json_in_hello_and_open():
    with pytest.raises(RemoteProtocolError, match="malformed JSON in HELLO frame"):
        Connection(Role.HOST).receive_data(frame(FrameKind.HELLO, 0, b"[" * 60000))
    with pytest.raises(RemoteProtocolError, match="HELLO of 100000 bytes exceeds"):
        Connection(Role.HOST).receive_data(frame(FrameKind.HELLO, 0, b"[" * 100000))
    host, _ = pair()
    with pytest.raises(RemoteProtocolError, match="malformed JSON in OPEN frame"):
        host.receive_data(frame(FrameKind.OPEN, 2, b"{" * 100000))


@pytest.mark.parametrize(
    "payload, match", [(b"", "missing or malformed channel byte"), (b"\x05x", "unknown channel 5")]
)
def test_bad_data_channel(payload, match):
    host, guest, sid = open_pair()
    with pytest.raises(RemoteProtocolError, match=match):
        host.receive_data(frame(FrameKind.DATA, sid, payload))


@pytest.mark.parametrize(
    "payload, match",
    [(b"", "missing or malformed"), (b"\x01\x02", "missing or malformed"), (b"\x03", "unknown channel 3")],
)
def test_bad_eof_channel(payload, match):
    host, guest, sid = open_pair()
    with pytest.raises(RemoteProtocolError, match=match):
        host.receive_data(frame(FrameKind.EOF, sid, payload))


def test_data_after_peer_eof_on_that_channel():
    host, guest, sid = open_pair()
    guest.send_data(sid, STDOUT, b"a")
    guest.end_channel(sid, STDOUT)
    deliver(guest, host)
    # other channels still flow
    assert host.receive_data(frame(FrameKind.DATA, sid, b"\x02err")) == [DataReceived(sid, STDERR, b"err")]
    with pytest.raises(RemoteProtocolError, match=f"DATA on channel 1 of stream {sid} after its EOF"):
        host.receive_data(frame(FrameKind.DATA, sid, b"\x01more"))


def test_connection_stays_broken_after_protocol_error():
    host, guest, sid = open_pair()
    with pytest.raises(RemoteProtocolError):
        host.receive_data(b"\xff" * 9)
    good = frame(FrameKind.MESSAGE, 0, b'{"type":"ok"}')
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="connection is broken: unknown frame kind 255"):
            host.receive_data(good)
    # Sending on a broken connection is the caller's mistake, not a new fault of the peer.
    with pytest.raises(LocalProtocolError, match="connection is broken"):
        host.open_stream({})
    with pytest.raises(LocalProtocolError, match="connection is broken"):
        host.send_data(sid, STDIN, b"x")
    with pytest.raises(LocalProtocolError, match="connection is broken"):
        host.send_message(0, {})


def test_receive_eof_mid_frame_breaks_connection():
    host, guest = pair()
    host.receive_data(frame(FrameKind.MESSAGE, 0, b"{}")[:4])
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        host.receive_eof()
    with pytest.raises(RemoteProtocolError, match="connection is broken"):
        host.receive_data(b"")


def test_receive_eof_on_frame_boundary_is_clean():
    host, guest = pair()
    host.receive_eof()
    host.receive_data(frame(FrameKind.MESSAGE, 0, b"{}"))  # not broken


def test_oversized_frame_header_breaks_connection():
    host, guest = pair()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        host.receive_data(struct.pack(">IBI", MAX_PAYLOAD + 1, FrameKind.DATA, 1))
    with pytest.raises(RemoteProtocolError, match="connection is broken"):
        host.receive_data(b"")
