"""Reply records and the per-stream reply grammars, without any I/O."""

from __future__ import annotations

import pytest

from matchlock.wire.agent import FileInfo
from matchlock.wire.frames import RemoteProtocolError
from matchlock.wire.mux import (
    STDERR,
    STDIN,
    STDOUT,
    ChannelEnded,
    DataReceived,
    MessageReceived,
    StreamClosed,
    StreamReset,
)
from matchlock.wire.replies import (
    ConnectionReplies,
    ExecReplies,
    Exited,
    Fatal,
    FileReplies,
    OpError,
    PortForwardReplies,
    Ready,
    Result,
    Started,
)

SID = 1


def msg(**fields) -> MessageReceived:
    return MessageReceived(SID, fields)


def data(channel: int = STDOUT, payload: bytes = b"x") -> DataReceived:
    return DataReceived(SID, channel, payload)


CLOSE = StreamClosed(SID)


def feed_all(replies, events) -> list:
    return [replies.feed(event) for event in events]


# --- records ------------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        Started(42),
        Started(),
        Exited(0),
        Exited(137, 9),
        Result(),
        Result((FileInfo("a", 1, 0o100644, False),)),
        OpError("cannot read /x: No such file", 2),
        OpError("no errno"),
        Ready(1234, "/etc/ssl/certs/ca-certificates.crt"),
        Ready(5),
        Fatal("OSError: cannot mount"),
    ],
)
def test_records_round_trip(record):
    assert type(record).parse(record.to_wire()) == record


@pytest.mark.parametrize(
    "record, wire, match",
    [
        (Started, {"pid": 0}, r"'pid' = 0 is outside"),
        (Started, {"pid": "7"}, r"'pid' must be an integer"),
        (Exited, {"code": 300}, r"'code' = 300 is outside 0\.\.255"),
        (Result, {"files": "x"}, r"'files' must be a list"),
        (OpError, {}, r"'message' must be a string"),
        (OpError, {"message": "m", "errno": -2}, r"'errno' = -2 is outside"),
        (Ready, {"boot_ms": "fast"}, r"'boot_ms' must be an integer"),
        (Ready, {"boot_ms": 1, "ca_bundle": "relative"}, r"'ca_bundle' must be an absolute path or empty"),
        (Ready, {"boot_ms": 1, "ca_bundle": 3}, r"'ca_bundle' must be a string"),
        (Fatal, {"message": None}, r"'message' must be a string"),
    ],
)
def test_records_name_the_bad_field(record, wire, match):
    with pytest.raises(ValueError, match=match):
        record.parse(wire)


def test_long_texts_are_cut_not_refused():
    assert Fatal.parse({"message": "x" * 100_000}) == Fatal("x" * 2000)
    assert OpError.parse({"message": "y" * 10_000}).message == "y" * 4096


# --- exec -----------------------------------------------------------------------


def test_exec_grammar_happy_path_returns_what_to_act_on():
    replies = ExecReplies()
    events = [
        msg(type="started", pid=7),
        data(STDOUT, b"out"),
        data(STDERR, b"err"),
        ChannelEnded(SID, STDOUT),
        msg(type="exit", code=3),
        CLOSE,
    ]
    outcomes = feed_all(replies, events)
    assert outcomes == [Started(7), events[1], events[2], events[3], Exited(3), CLOSE]
    assert replies.done and replies.final == Exited(3)


def test_exec_error_reply_ends_the_grammar():
    replies = ExecReplies()
    assert replies.feed(msg(type="error", message="no such user")) == OpError("no such user")
    assert replies.final == OpError("no such user")
    assert replies.feed(CLOSE) == CLOSE and replies.done


def test_reset_ends_any_stream_at_any_point():
    for replies in (ExecReplies(), PortForwardReplies(), FileReplies("read_file")):
        reset = StreamReset(SID, "abort")
        assert replies.feed(reset) == reset and replies.done and replies.final is None
        with pytest.raises(RemoteProtocolError, match="after it ended"):
            replies.feed(CLOSE)


@pytest.mark.parametrize(
    "events, match",
    [
        ([data()], r"the guest sent stdout data on an exec stream before 'started'"),
        ([msg(type="exit", code=0)], r"sent 'exit' on an exec stream before 'started'"),
        ([msg(type="started", pid=1), data(STDIN)], r"sent stdin data on an exec stream while the command runs"),
        ([msg(type="started", pid=1), msg(type="started", pid=2)], r"sent 'started' on an exec stream while"),
        ([msg(type="started", pid=1), msg(type="exit", code=0), msg(type="exit", code=1)], r"after the exit status"),
        (
            [msg(type="started", pid=1), msg(type="exit", code=0), data()],
            r"sent stdout data on an exec stream after the exit status",
        ),
        ([msg(type="started", pid=1), msg(type="bogus")], r"sent 'bogus' on an exec stream"),
        ([msg(type="started", pid=1), msg(no="type")], r"sent 'None' on an exec stream"),
        ([msg(type="started", pid=1), CLOSE], r"the guest closed an exec stream without an exit status"),
        ([CLOSE], r"closed an exec stream without an exit status"),
        ([msg(type="started", pid=1), msg(type="exit", code=300)], r"malformed 'exit' reply from the guest: 'code'"),
        ([msg(type="started", pid="x")], r"malformed 'started' reply from the guest: 'pid' must be an integer"),
    ],
)
def test_exec_grammar_violations_are_named(events, match):
    replies = ExecReplies()
    with pytest.raises(RemoteProtocolError, match=match):
        feed_all(replies, events)
    assert not replies.done


# --- files ------------------------------------------------------------------------


def test_read_file_streams_data_then_result():
    replies = FileReplies("read_file")
    assert feed_all(replies, [data(payload=b"ab"), msg(type="result"), CLOSE]) == [data(payload=b"ab"), Result(), CLOSE]
    assert replies.final == Result()


def test_list_files_result_carries_the_listing():
    replies = FileReplies("list_files")
    entry = {"name": "hosts", "size": 1, "mode": 0o100644, "is_dir": False}
    assert replies.feed(msg(type="result", files=[entry])) == Result((FileInfo("hosts", 1, 0o100644, False),))


@pytest.mark.parametrize(
    "op, events, match",
    [
        ("read_file", [data(STDERR)], r"sent stderr data on a file stream before its reply"),
        ("write_file", [data()], r"sent stdout data on a file stream before its reply"),
        ("read_file", [msg(type="result"), msg(type="result")], r"sent 'result' on a file stream after its reply"),
        ("read_file", [msg(type="result"), data()], r"sent stdout data on a file stream after its reply"),
        ("ping", [CLOSE], r"the guest closed a file stream without a reply"),
        ("read_file", [msg(type="weird")], r"sent 'weird' on a file stream"),
        ("read_file", [msg(type="started")], r"sent 'started' on a file stream"),
        ("list_files", [msg(type="result")], r"result for list_files has no 'files'"),
        ("read_file", [msg(type="result", files=[])], r"result for read_file carries a file list"),
        ("list_files", [msg(type="result", files=[{"name": ".."}])], r"malformed 'result' reply.*invalid file name"),
    ],
)
def test_file_grammar_violations_are_named(op, events, match):
    with pytest.raises(RemoteProtocolError, match=match):
        feed_all(FileReplies(op), events)


# --- port forward -------------------------------------------------------------------


def test_port_forward_grammar():
    replies = PortForwardReplies()
    events = [msg(type="started"), data(), ChannelEnded(SID, STDOUT), msg(type="result"), CLOSE]
    assert feed_all(replies, events) == [Started(), events[1], events[2], Result(), CLOSE]
    failed = PortForwardReplies()
    assert failed.feed(msg(type="error", message="connection refused")) == OpError("connection refused")


@pytest.mark.parametrize(
    "events, match",
    [
        ([data()], r"sent stdout data on a port-forward stream before 'started'"),
        ([msg(type="result")], r"sent 'result' on a port-forward stream before 'started'"),
        (
            [msg(type="started"), data(STDERR)],
            r"sent stderr data on a port-forward stream while the connection is open",
        ),
        ([msg(type="started"), CLOSE], r"closed a port-forward stream without a result"),
    ],
)
def test_port_forward_grammar_violations(events, match):
    with pytest.raises(RemoteProtocolError, match=match):
        feed_all(PortForwardReplies(), events)


# --- stream 0 -------------------------------------------------------------------------


def test_connection_ready_then_fatal():
    replies = ConnectionReplies()
    assert replies.feed(MessageReceived(0, {"type": "ready", "boot_ms": 9})) == Ready(9)
    assert replies.feed(MessageReceived(0, {"type": "fatal", "message": "late"})) == Fatal("late")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"type": "surprise"}], r"sent 'surprise' on the connection \(stream 0\) before 'ready'"),
        ([{"type": "ready", "boot_ms": 1}, {"type": "ready", "boot_ms": 2}], r"sent 'ready' .* after 'ready'"),
        ([{"type": "ready", "boot_ms": "fast"}], r"malformed 'ready' reply from the guest: 'boot_ms'"),
        ([{"type": "fatal", "message": "x"}, {"type": "ready", "boot_ms": 1}], r"sent 'ready' .* after 'fatal'"),
    ],
)
def test_connection_grammar_violations(messages, match):
    replies = ConnectionReplies()
    with pytest.raises(RemoteProtocolError, match=match):
        feed_all(replies, [MessageReceived(0, m) for m in messages])


@pytest.mark.parametrize("made_up", ["close", "stdout data", "data", "EOF"])
def test_a_made_up_type_cannot_pass_for_data_eof_or_close(made_up):
    replies = ExecReplies()
    feed_all(replies, [msg(type="started", pid=1), msg(type="exit", code=0)])
    with pytest.raises(
        RemoteProtocolError, match=f"the guest sent '{made_up}' on an exec stream after the exit status"
    ):
        replies.feed(msg(type=made_up))
    assert replies.feed(CLOSE) == CLOSE and replies.done
