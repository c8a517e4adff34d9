"""What the guest answers, as records, and the grammar of each stream (sans-IO, stdlib only).

The guest builds every reply with a record here and sends `to_wire()`; the
host feeds each mux event of a stream to that stream's tracker, which parses
MESSAGE frames into records and checks the order of everything against the
stream's grammar:

    exec          (started, (stdout|stderr data|EOF)*, (exit|error) | error), close
    read_file     (stdout data|EOF)*, (result|error), close
    write_file,
    list_files,
    ping          (result|error), close
    port_forward  (started, (stdout data|EOF)*, (result|error) | error), close
    stream 0      (ready | fatal), fatal?

A RESET may end any stream at any point. Anything else (a reply out of
order, a field of the wrong type, data on a channel the op does not use)
raises RemoteProtocolError naming the violation.
"""

from __future__ import annotations

from ._records import Record
from .agent import OP_LIST_FILES, OP_READ_FILE, FileInfo, _int, _str, parse_files
from .frames import RemoteProtocolError
from .mux import STDERR, STDIN, STDOUT, ChannelEnded, DataReceived, MessageReceived, StreamClosed, StreamReset

REPLY_STARTED = "started"
REPLY_EXIT = "exit"
REPLY_RESULT = "result"
REPLY_ERROR = "error"
EVENT_READY = "ready"
EVENT_FATAL = "fatal"

MAX_ERROR_TEXT = 4096
MAX_FATAL_TEXT = 2000
MAX_STAMPS = 64
MAX_STAMP_LABEL = 40
# A guest uptime in ms (decades). A bound rather than math.isfinite, which raises on an int of hundreds of
# digits (the wire's JSON allows those, and 1e999, which is infinity).
_MAX_STAMP_MS = 1e12
Stamps = tuple[tuple[str, float], ...]


def _text(msg: dict, key: str, limit: int) -> str:
    # Error texts are cut, not refused: a long (but well-typed) message is still the guest's answer.
    return _str(msg, key, max_len=1 << 20)[:limit]


def _stamp_ok(stamp: object) -> bool:
    if not isinstance(stamp, list) or len(stamp) != 2:
        return False
    label, at = stamp
    return (
        isinstance(label, str) and 0 < len(label) <= MAX_STAMP_LABEL and label.isascii() and label.isprintable()
        and isinstance(at, (int, float)) and not isinstance(at, bool) and 0 <= at <= _MAX_STAMP_MS
    )  # fmt: skip


def _stamps(msg: dict) -> Stamps | None:
    """The optional `stamps` of `ready` and `exit`: the guest's timeline under MATCHLOCK_DEBUG_TIMING, as
    [label, uptime ms] pairs with short printable ASCII labels (they reach the host's terminal)."""
    value = msg.get("stamps")
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_STAMPS:
        raise ValueError(f"'stamps' must be a list of 1 to {MAX_STAMPS} [label, ms] pairs")
    for index, stamp in enumerate(value):
        if not _stamp_ok(stamp):  # never repr'd: it may be an int of thousands of digits
            raise ValueError(f"'stamps' entry {index} is not a [label of 1 to {MAX_STAMP_LABEL} printable "
                             f"ASCII characters, 0 to {_MAX_STAMP_MS:.0f} ms] pair")  # fmt: skip
    return tuple((label, float(at)) for label, at in value)


def _stamps_to_wire(reply: dict, stamps: Stamps | None) -> dict:
    if stamps:  # never an empty list, which the host refuses
        reply["stamps"] = [[label, at] for label, at in stamps]
    return reply


class Started(Record):
    """The command (pid) or the forwarded connection (no pid) is running.

    An exec is started once the command was executed as its user in its working directory; a
    command that could not get there is answered with `error` (the reason) instead."""

    __slots__ = ("pid",)
    pid: int | None
    _defaults = {"pid": None}

    @classmethod
    def parse(cls, msg: dict) -> Started:
        return cls(_int(msg, "pid", lo=1, hi=1 << 22) if msg.get("pid") is not None else None)

    def to_wire(self) -> dict:
        reply: dict = {"type": REPLY_STARTED}
        if self.pid is not None:
            reply["pid"] = self.pid
        return reply


class Exited(Record):
    """code: 0..255; signal: the terminating signal or None; stamps: the guest's timeline, on the first exit
    status after a HELLO with `debug_timing` only."""

    __slots__ = ("code", "signal", "stamps")
    code: int
    signal: int | None
    stamps: Stamps | None
    _defaults = {"signal": None, "stamps": None}

    @classmethod
    def parse(cls, msg: dict) -> Exited:
        return cls(
            _int(msg, "code", lo=0, hi=255),
            _int(msg, "signal", lo=1, hi=64) if msg.get("signal") is not None else None,
            _stamps(msg),
        )

    def to_wire(self) -> dict:
        reply: dict = {"type": REPLY_EXIT, "code": self.code}
        if self.signal is not None:
            reply["signal"] = self.signal
        return _stamps_to_wire(reply, self.stamps)


class Result(Record):
    """A file op or port forward succeeded; `files` is list_files' listing (a tuple of FileInfo), else None."""

    __slots__ = ("files",)
    files: tuple[FileInfo, ...] | None
    _defaults = {"files": None}

    @classmethod
    def parse(cls, msg: dict) -> Result:
        return cls(tuple(parse_files(msg)) if "files" in msg else None)

    def to_wire(self) -> dict:
        reply: dict = {"type": REPLY_RESULT}
        if self.files is not None:
            reply["files"] = [f.to_wire() for f in self.files]
        return reply


class OpError(Record):
    """The operation failed in the guest; `errno` when an OS call said why."""

    __slots__ = ("message", "errno")
    message: str
    errno: int | None
    _defaults = {"errno": None}

    @classmethod
    def parse(cls, msg: dict) -> OpError:
        return cls(
            _text(msg, "message", MAX_ERROR_TEXT),
            _int(msg, "errno", lo=1, hi=4095) if msg.get("errno") is not None else None,
        )

    def to_wire(self) -> dict:
        reply: dict = {"type": REPLY_ERROR, "message": self.message}
        if self.errno is not None:
            reply["errno"] = self.errno
        return reply


class Ready(Record):
    """Stream 0: the guest applied the host's settings. ca_bundle: the system bundle the CA joined, or ""."""

    __slots__ = ("boot_ms", "ca_bundle", "stamps")
    boot_ms: int
    ca_bundle: str
    stamps: Stamps | None  # the guest's timeline from its wake, after a HELLO with `debug_timing` only
    _defaults = {"ca_bundle": "", "stamps": None}

    @classmethod
    def parse(cls, msg: dict) -> Ready:
        bundle = _str(msg, "ca_bundle", default="")
        if bundle and not bundle.startswith("/"):
            raise ValueError(f"'ca_bundle' must be an absolute path or empty, got {bundle[:100]!r}")
        return cls(_int(msg, "boot_ms"), bundle, _stamps(msg))

    def to_wire(self) -> dict:
        return _stamps_to_wire({"type": EVENT_READY, "boot_ms": self.boot_ms, "ca_bundle": self.ca_bundle}, self.stamps)


class Fatal(Record):
    """Stream 0: guest init failed; the text goes into the host's error."""

    __slots__ = ("message",)
    message: str

    @classmethod
    def parse(cls, msg: dict) -> Fatal:
        return cls(_text(msg, "message", MAX_FATAL_TEXT))

    def to_wire(self) -> dict:
        return {"type": EVENT_FATAL, "message": self.message}


Reply = Started | Exited | Result | OpError | Ready | Fatal
_RECORDS = {
    REPLY_STARTED: Started,
    REPLY_EXIT: Exited,
    REPLY_RESULT: Result,
    REPLY_ERROR: OpError,
    EVENT_READY: Ready,
    EVENT_FATAL: Fatal,
}
# Grammar tokens: a MESSAGE is its `type` (a str); everything else is a tuple, so no
# type a guest makes up can pass for data, an EOF or a close.
_CLOSE = ("close",)
_OUT, _ERR = ("data", STDOUT), ("data", STDERR)
_OUT_EOF, _ERR_EOF = ("EOF", STDOUT), ("EOF", STDERR)
_CHANNEL_NAMES = {STDIN: "stdin", STDOUT: "stdout", STDERR: "stderr"}
_FINAL = "final"  # the state after the last reply: only close may follow


def _describe(token) -> str:
    if isinstance(token, str):
        return repr(token[:40])
    return f"{_CHANNEL_NAMES[token[1]]} {token[0]}"


class Grammar:
    """One stream kind: `table` maps state -> {token: next state}; `where` describes each state.

    A plain class, not a Record: the guest imports this module for the records
    and should not pay for generating an `__init__` it never calls.
    """

    __slots__ = ("what", "table", "where", "missing")

    def __init__(self, what: str, table: dict[str, dict], where: dict[str, str], missing: str):
        self.what, self.table, self.where, self.missing = what, table, where, missing


def _final(table: dict) -> dict:
    return {**table, _FINAL: {_CLOSE: None}}


_ANSWER = {REPLY_RESULT: _FINAL, REPLY_ERROR: _FINAL}
EXEC = Grammar(
    "an exec stream",
    _final({
        "new": {REPLY_STARTED: "running", REPLY_ERROR: _FINAL},
        "running": {_OUT: "running", _ERR: "running", _OUT_EOF: "running", _ERR_EOF: "running",
                    REPLY_EXIT: _FINAL, REPLY_ERROR: _FINAL},
    }),
    {"new": "before 'started'", "running": "while the command runs", _FINAL: "after the exit status"},
    "an exit status",
)  # fmt: skip
READ_FILE = Grammar(
    "a file stream",
    _final({"new": {_OUT: "new", _OUT_EOF: "new", **_ANSWER}}),
    {"new": "before its reply", _FINAL: "after its reply"},
    "a reply",
)
FILE_OP = Grammar("a file stream", _final({"new": dict(_ANSWER)}), READ_FILE.where, "a reply")
PORT_FORWARD = Grammar(
    "a port-forward stream",
    _final({
        "new": {REPLY_STARTED: "open", REPLY_ERROR: _FINAL},
        "open": {_OUT: "open", _OUT_EOF: "open", **_ANSWER},
    }),
    {"new": "before 'started'", "open": "while the connection is open", _FINAL: "after its result"},
    "a result",
)  # fmt: skip
CONNECTION = Grammar(
    "the connection (stream 0)",
    {"new": {EVENT_READY: "ready", EVENT_FATAL: "failed"}, "ready": {EVENT_FATAL: "failed"}, "failed": {}},
    {"new": "before 'ready'", "ready": "after 'ready'", "failed": "after 'fatal'"},
    "'ready'",
)


class Replies:
    """Tracks one stream's replies against its grammar; pure, so it is tested without I/O.

    `feed(event)` takes each mux event of the stream and returns what the
    caller acts on: the parsed record for a MESSAGE, the DataReceived,
    ChannelEnded, StreamClosed or StreamReset event itself, or None for
    events that change nothing. `final` is the last reply (Exited, Result or
    OpError) once it has arrived; `done` is true after close or reset.
    """

    __slots__ = ("grammar", "state", "final", "done")

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self.state = "new"
        self.final: Reply | None = None
        self.done = False

    def feed(self, event):
        if self.done:
            raise RemoteProtocolError(f"the guest sent {type(event).__name__} on {self.grammar.what} after it ended")
        kind = type(event)
        if kind is StreamReset:
            self.done = True
            return event
        token: str | tuple
        if kind is MessageReceived:
            reply_type = event.message.get("type")
            token = reply_type if isinstance(reply_type, str) else repr(reply_type)
        elif kind is DataReceived:
            token = ("data", event.channel)
        elif kind is ChannelEnded:
            token = ("EOF", event.channel)
        elif kind is StreamClosed:
            token = _CLOSE
        else:
            return None
        allowed = self.grammar.table[self.state]
        if token not in allowed:
            if token == _CLOSE:
                raise RemoteProtocolError(f"the guest closed {self.grammar.what} without {self.grammar.missing}")
            raise RemoteProtocolError(
                f"the guest sent {_describe(token)} on {self.grammar.what} {self.grammar.where[self.state]}"
            )
        outcome = event
        if isinstance(token, str):  # a known reply type: every str in the tables is one
            try:
                outcome = _RECORDS[token].parse(event.message)
            except ValueError as exc:
                raise RemoteProtocolError(f"malformed {token!r} reply from the guest: {exc}") from None
        next_state = allowed[token]
        if next_state == _FINAL:
            self.final = outcome
        if next_state is None:
            self.done = True
        else:
            self.state = next_state
        return outcome


class ExecReplies(Replies):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(EXEC)


class PortForwardReplies(Replies):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(PORT_FORWARD)


class FileReplies(Replies):
    """read_file may stream data before its reply; the other ops answer with one reply."""

    __slots__ = ("op",)

    def __init__(self, op: str) -> None:
        super().__init__(READ_FILE if op == OP_READ_FILE else FILE_OP)
        self.op = op

    def feed(self, event):
        outcome = super().feed(event)
        if type(outcome) is Result and (outcome.files is not None) != (self.op == OP_LIST_FILES):
            raise RemoteProtocolError(
                f"the guest's result for {self.op} "
                + ("has no 'files'" if self.op == OP_LIST_FILES else "carries a file list")
            )
        return outcome


class ConnectionReplies(Replies):
    """Stream 0: one `ready` (or `fatal`) ends the handshake; `fatal` may still follow `ready`."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(CONNECTION)
