"""The exec relay: typed actions and replies (sans-IO), the blocking client, and the server's refusals."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from pathlib import Path

import pytest

from matchlock.api.errors import MatchlockError, NotFoundError, UsageError
from matchlock.api.paths import SandboxPaths
from matchlock.sandbox import relay_client
from matchlock.sandbox import relay_protocol as rp


def frame(kind: int, payload: bytes | dict) -> tuple[int, bytes]:
    return kind, payload if isinstance(payload, bytes) else json.dumps(payload).encode()


def decode_one(data: bytes, allowed: frozenset[int]) -> tuple[int, bytes]:
    (only,) = rp.Decoder(allowed).feed(data)
    return only


# --- requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "action",
    [
        rp.ExecAction("echo hi", "/tmp", "nobody", rp.EXEC),
        rp.ExecAction("cat", mode=rp.EXEC_PIPE),
        rp.ExecAction("sh", mode=rp.EXEC_INTERACTIVE, rows=50, cols=132),
        rp.AllowListAction(("a.test", "*.b.test"), add=True),
        rp.AllowListAction(("a.test",), add=False),
        rp.PortForwardAction(8080),
    ],
)
def test_actions_round_trip_through_the_framing(action):
    assert rp.parse_action(*decode_one(action.encode(), rp.REQUEST_TYPES)) == action


def test_published_payload_shapes_are_kept():
    kind, payload = decode_one(rp.ExecAction("sh", "/", "", rp.EXEC_INTERACTIVE, 30, 100).encode(), rp.REQUEST_TYPES)
    assert kind == rp.EXEC_INTERACTIVE
    assert json.loads(payload) == {"command": "sh", "working_dir": "/", "user": "", "rows": 30, "cols": 100}
    assert json.loads(rp.PortForwardAction(22).encode()[5:]) == {"remote_port": 22}
    defaults = rp.parse_action(*frame(rp.EXEC_INTERACTIVE, {"command": "sh"}))
    assert (defaults.rows, defaults.cols) == (24, 80)


@pytest.mark.parametrize(
    ("kind", "payload", "message"),
    [
        (rp.EXEC, b"{bad", "malformed exec request"),
        (rp.EXEC, b"[1]", "must be a JSON object"),
        (rp.EXEC_PIPE, {"command": ""}, "'command' is required"),
        (rp.EXEC_PIPE, {"command": "x", "user": 5}, "must be strings"),
        (rp.EXEC_PIPE, {"command": "x", "working_dir": "tmp"}, "'tmp' must be an absolute path"),
        (rp.EXEC_INTERACTIVE, {"command": "x", "rows": 70000}, "invalid terminal size 70000x80"),
        (rp.EXEC_INTERACTIVE, {"command": "x", "cols": True}, "invalid terminal size"),
        (rp.ALLOW_LIST_ADD, {"hosts": []}, "non-empty list of strings"),
        (rp.ALLOW_LIST_DELETE, {"hosts": "a.test"}, "non-empty list of strings"),
        (rp.PORT_FORWARD, {"remote_port": True}, "port number"),
        (rp.PORT_FORWARD, {"remote_port": 70000}, "port number"),
        (rp.PORT_FORWARD, b"\xff", "port number"),
        (rp.STDIN, b"", "cannot start an operation"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(kind, payload, message):
    with pytest.raises(rp.RelayProtocolError, match=message):
        rp.parse_action(*frame(kind, payload))


def test_client_frames_after_the_request():
    assert rp.parse_client_frame(*decode_one(rp.Stdin(b"data").encode(), rp.CLIENT_STREAM_TYPES)) == rp.Stdin(b"data")
    resize = rp.Resize(40, 120)
    assert rp.parse_client_frame(*decode_one(resize.encode(), rp.CLIENT_STREAM_TYPES)) == resize
    for payload, message in ((b"\x00\x01", "must carry 4 bytes"), (struct.pack(">HH", 0, 80), "invalid terminal")):
        with pytest.raises(rp.RelayProtocolError, match=message):
            rp.parse_client_frame(rp.RESIZE, payload)
    with pytest.raises(rp.RelayProtocolError, match="unexpected relay frame type 1 after the request"):
        rp.parse_client_frame(rp.EXEC, b"{}")


def test_decoder_rejects_from_the_header():
    with pytest.raises(rp.RelayProtocolError, match="exceeds"):
        rp.Decoder(rp.REQUEST_TYPES).feed(struct.pack(">BI", rp.EXEC, rp.MAX_PAYLOAD + 1))
    with pytest.raises(rp.RelayProtocolError, match="unexpected relay frame type 99"):
        rp.Decoder(rp.REQUEST_TYPES).feed(struct.pack(">BI", 99, 0))


# --- replies -----------------------------------------------------------------------


def test_reply_reader_decodes_a_byte_at_a_time():
    replies = [
        rp.Output(rp.STDOUT, b"out"),
        rp.Output(rp.STDERR, b""),
        rp.Exited(3),
        rp.ExecReply(0, b"\x00bin", b"err", "why"),
        rp.AllowListReply(("a.test",), ("a.test", "b.test"), added=True),
        rp.AllowListReply(("c.test",), (), added=False),
        rp.AllowListReply(error="refused"),
    ]
    wire = b"".join(
        rp.encode(reply.channel, reply.data) if isinstance(reply, rp.Output) else reply.encode() for reply in replies
    )
    reader, decoded = rp.ReplyReader(), []
    for index in range(len(wire)):
        decoded += reader.feed(wire[index : index + 1])
    assert decoded == replies


def test_failure_frames_parse_as_exec_replies():
    assert rp.parse_reply(*decode_one(rp.encode_failure("no such op"), rp.SERVER_TYPES)) == rp.ExecReply(
        1, error="no such op"
    )


@pytest.mark.parametrize(
    ("kind", "payload", "message"),
    [
        (rp.EXEC_RESULT, b"not json", "malformed exec result"),
        (rp.EXEC_RESULT, {"exit_code": "1"}, "integer 'exit_code'"),
        (rp.EXEC_RESULT, {"exit_code": 0, "stdout": "!!"}, "must be base64"),
        (rp.ALLOW_LIST_RESULT, b"[]", "must be a JSON object"),
        (rp.ALLOW_LIST_RESULT, {"added": "a.test"}, "'added' must be a list of strings"),
        (rp.ALLOW_LIST_RESULT, {"error": 7}, "'error'"),
        (rp.EXIT, b"\x00", "exit frame must carry 4 bytes"),
        (rp.STDIN, b"", "unexpected relay frame type 6 from the sandbox"),
    ],
)
def test_bad_replies_are_protocol_errors(kind, payload, message):
    with pytest.raises(rp.RelayProtocolError, match=message):
        rp.parse_reply(*frame(kind, payload))


# --- the blocking client -----------------------------------------------------------


@pytest.fixture
def relay_socket(tmp_path, monkeypatch):
    """A fake owner on vm-0000test's exec socket: answers one connection with canned bytes."""
    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(tmp_path))
    path = SandboxPaths.of("vm-0000test").exec_socket
    path.parent.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    received: list[bytes] = []

    def answer(reply: bytes) -> None:
        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                received.append(conn.recv(65536))
                conn.sendall(reply)

        threading.Thread(target=serve, daemon=True).start()

    yield answer, received
    listener.close()


def test_allow_list_change_round_trip(relay_socket):
    answer, received = relay_socket
    answer(rp.AllowListReply(("a.test",), ("a.test", "old.test")).encode())
    reply = relay_client.change_allow_list("vm-0000test", ["a.test"], add=True)
    assert (reply.changed, reply.allowed_hosts) == (("a.test",), ("a.test", "old.test"))
    assert rp.parse_action(*decode_one(received[0], rp.REQUEST_TYPES)) == rp.AllowListAction(("a.test",), add=True)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (rp.AllowListReply(error="allow-list updates unavailable").encode(), "^allow-list updates unavailable$"),
        (rp.encode_failure("'hosts' must be a non-empty list"), "^'hosts' must be a non-empty list$"),
        (rp.encode(rp.ALLOW_LIST_RESULT, b"{not json"), "broke the relay protocol: malformed allow-list result"),
        (b"\xff" * 8, "broke the relay protocol: unexpected relay frame type 255"),
        (rp.Exited(0).encode(), "broke the relay protocol: an allow-list change was answered with Exited"),
        (b"", "sandbox vm-0000test closed the connection"),
    ],
)
def test_allow_list_failures_are_matchlock_errors(relay_socket, reply, message):
    answer, _ = relay_socket
    answer(reply)
    with pytest.raises(MatchlockError, match=message):
        relay_client.change_allow_list("vm-0000test", ["a.test"], add=True)


@pytest.mark.parametrize(
    ("reply", "error"),
    [(rp.ControlReply(error="a snapshot named 's1' already exists", usage=True), UsageError),
     (rp.ControlReply(error="sandbox vm-0000test is already paused"), MatchlockError)],
)  # fmt: skip
def test_the_owners_refusal_of_a_bad_control_request_is_a_usage_error(relay_socket, reply, error):
    # The owner finds a taken snapshot name when the CLI's own check raced another snapshot: exit 2 as
    # for the CLI's check (it used to come back as a plain error, exit 1).
    answer, _ = relay_socket
    answer(reply.encode())
    with pytest.raises(MatchlockError, match=reply.error) as raised:
        relay_client.control("vm-0000test", "snapshot", name="s1", mode="full")
    assert type(raised.value) is error and raised.value.exit_code == (2 if error is UsageError else 1)


def test_connect_explains_a_missing_sandbox(tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(tmp_path))
    with pytest.raises(NotFoundError, match="VM vm-00000404 not found"):
        relay_client.connect("vm-00000404")


# --- the server: refusals never reach the sandbox -----------------------------------


class _NoNetworkSandbox:
    network = None


async def _exchange(path: Path, data: bytes) -> list[rp.Reply]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    writer.write_eof()
    replies, decoder = [], rp.ReplyReader()
    while chunk := await reader.read(65536):
        replies += decoder.feed(chunk)
    writer.close()
    return replies


def test_server_refuses_bad_requests_and_closes_cleanly(tmp_path):
    from matchlock.sandbox.exec_relay import ExecRelay

    path = tmp_path / "exec.sock"

    async def scenario():
        async with asyncio.TaskGroup() as tasks:
            relay = ExecRelay(_NoNetworkSandbox(), path, tasks)  # type: ignore[arg-type]
            await relay.start()
            try:
                return await asyncio.gather(
                    _exchange(path, b"\xff" * 16),
                    _exchange(path, rp.encode(rp.EXEC, b"{bad}")),
                    _exchange(path, rp.encode(rp.PORT_FORWARD, b'{"remote_port": 0}')),
                    _exchange(path, rp.AllowListAction(("a.test",), add=True).encode()),
                )
            finally:
                await relay.aclose()
                await relay.aclose()  # idempotent

    garbage, bad_json, bad_port, no_network = asyncio.run(scenario())
    assert garbage == [rp.ExecReply(1, error="unexpected relay frame type 255")]
    assert len(bad_json) == 1 and bad_json[0].error.startswith("malformed exec request")
    assert bad_port == [rp.ExecReply(1, error="'remote_port' must be a port number (1-65535)")]
    assert no_network == [
        rp.AllowListReply(error="allow-list updates unavailable: sandbox was started without network interception")
    ]
    assert not path.exists()


class _FakeProcess:
    """A command that echoes stdin to stdout and exits 0 at end of input, or 143 when cancelled."""

    def __init__(self, on_stdout) -> None:
        self.on_stdout = on_stdout
        self.done = asyncio.Event()
        self.code = 0
        self.signals: list[int] = []
        self.sizes: list[tuple[int, int]] = []
        self.cancelled = False

    async def wait(self):
        from matchlock.sandbox.process import ExecResult

        await self.done.wait()
        return ExecResult(self.code, 1)

    async def write(self, data: bytes) -> None:
        await self.on_stdout(data)

    def close_stdin(self) -> None:
        self.done.set()

    def resize(self, rows: int, cols: int) -> None:
        self.sizes.append((rows, cols))

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def cancel(self) -> None:
        if not self.done.is_set():  # as in the guest: cancelling a command that has exited changes nothing
            self.cancelled, self.code = True, 143
            self.done.set()


class _EchoSandbox:
    network = None

    def __init__(self) -> None:
        self.processes: list[_FakeProcess] = []

    def start_exec(self, spec, *, on_stdout=None, on_stderr=None, stdin=False, tty=None):
        process = _FakeProcess(on_stdout or (lambda data: None))
        self.processes.append(process)
        return process


def _with_relay(tmp_path, client):
    """Run `client(path)` against a relay over an echoing sandbox; returns its result and the sandbox."""
    from matchlock.sandbox.exec_relay import ExecRelay

    path, sandbox = tmp_path / "exec.sock", _EchoSandbox()

    async def scenario():
        async with asyncio.TaskGroup() as tasks:
            relay = ExecRelay(sandbox, path, tasks)  # type: ignore[arg-type]
            await relay.start()
            try:
                return await client(path)
            finally:
                await relay.aclose()

    return asyncio.run(scenario()), sandbox


def test_piped_exec_streams_and_exits(tmp_path):
    async def client(path):
        data = rp.ExecAction("cat").encode() + rp.Stdin(b"hello").encode() + rp.Stdin(b"").encode()
        return await _exchange(path, data)

    replies, sandbox = _with_relay(tmp_path, client)
    assert replies == [rp.Output(rp.STDOUT, b"hello"), rp.Exited(0)]
    assert not sandbox.processes[0].cancelled


def test_terminal_client_hanging_up_cancels_with_sighup(tmp_path):
    import signal

    async def client(path):
        action = rp.ExecAction("sh", mode=rp.EXEC_INTERACTIVE, rows=30, cols=90)
        return await _exchange(path, action.encode() + rp.Resize(40, 100).encode())  # then EOF

    replies, sandbox = _with_relay(tmp_path, client)
    process = sandbox.processes[0]
    assert process.cancelled and process.signals == [signal.SIGHUP] and process.sizes == [(40, 100)]
    assert replies == [rp.Exited(143)]


def test_protocol_violation_during_an_exec_ends_it_with_an_error(tmp_path):
    async def client(path):
        return await _exchange(path, rp.ExecAction("cat").encode() + rp.Resize(40, 100).encode())

    replies, sandbox = _with_relay(tmp_path, client)
    assert sandbox.processes[0].cancelled
    assert replies == [rp.ExecReply(1, error="resize frames are only valid in a terminal exec")]


def test_buffered_client_disconnecting_cancels_the_command_without_a_reply(tmp_path):
    async def client(path):
        return await _exchange(path, rp.ExecAction("sleep 100", mode=rp.EXEC).encode())

    replies, sandbox = _with_relay(tmp_path, client)
    assert sandbox.processes[0].cancelled and replies == []


def test_connect_takes_a_unique_id_prefix(tmp_path, monkeypatch):
    import socket

    from matchlock.api.errors import UsageError

    monkeypatch.setenv("MATCHLOCK_STATE_DIR", str(tmp_path))
    for vm_id in ("vm-abc00001", "vm-abd00002"):
        (tmp_path / "vms" / vm_id).mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "vms" / "vm-abc00001" / "exec.sock"))
        listener.listen()
        for prefix in ("vm-abc", "abc0"):
            relay_client.connect(prefix).close()
            listener.accept()[0].close()
    with pytest.raises(UsageError, match="'vm-ab' is ambiguous: it matches vm-abc00001, vm-abd00002"):
        relay_client.connect("vm-ab")
