"""`matchlock rpc` without a VM: framing, errors, bad input, close and EOF, fuzzed lines.

The server runs as a real subprocess driven with raw lines (tests/support/rpcwire.py), which also
checks that every stdout line is one ASCII JSON object without a top-level id on notifications.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from matchlock.jsonrpc import MAX_LINE_BYTES
from matchlock.rpc.methods import METHODS, NO_VM_METHODS
from support.rpcwire import RpcProcess, b64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("rpc-state")
    proc = RpcProcess(env={"MATCHLOCK_STATE_DIR": str(state)})
    yield proc
    proc.stop()
    assert proc.bad_lines == []


@pytest.fixture
def fresh(tmp_path):
    proc = RpcProcess(env={"MATCHLOCK_STATE_DIR": str(tmp_path / "state")})
    yield proc
    proc.stop()
    assert proc.bad_lines == []


def _next_response(server: RpcProcess, msg_id: int) -> dict:
    response, notifications = server.wait(msg_id, timeout=30)
    assert notifications == []
    return response


@pytest.mark.parametrize("method", sorted(set(METHODS) - NO_VM_METHODS))
def test_methods_before_create_are_vm_errors(server: RpcProcess, method: str) -> None:
    assert server.error(method, {"command": "true", "path": "/x"}) == {"code": -32000, "message": "VM not created"}


def test_unknown_method(server: RpcProcess) -> None:
    assert server.error("frobnicate") == {"code": -32601, "message": "Method not found: frobnicate"}


def test_create_bad_param_names_the_field(server: RpcProcess) -> None:
    error = server.error("create", {"image": "alpine", "resources": {"memory_mb": "lots"}})
    assert error["code"] == -32602 and "resources.memory_mb" in error["message"]
    error = server.error("create", {"image": "alpine", "vfs": {"workspace": "/w"}})
    assert error["code"] == -32602 and "vfs" in error["message"]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"this is not json", -32700),
        (b'{"method": "exec", "id": 1', -32700),
        (b"\xff\xfe\xfd", -32700),
        (b"[1, 2, 3]", -32600),
        (b"42", -32600),
        (b'"a string"', -32600),
        (b"null", -32600),
        (b'{"method": "exec", "id": true}', -32600),
        (b'{"method": "exec", "id": {"a": 1}}', -32600),
        (b'{"method": "exec"}', -32600),
        (b'{"id": 5}', -32600),
    ],
)
def test_bad_lines_get_errors_with_null_id(server: RpcProcess, line: bytes, code: int) -> None:
    before = len(server.unscoped())
    server.write(line + b"\n")
    reply = server.wait_unscoped(lambda m: m.get("error", {}).get("code") == code, after=before)
    assert reply["id"] is None or reply["id"] == 5
    # ... and the server still answers.
    assert server.error("log")["code"] == -32000


def test_params_of_the_wrong_type(server: RpcProcess) -> None:
    msg_id = server.new_id()
    server.expect(msg_id)
    server.write(json.dumps({"jsonrpc": "2.0", "method": "exec", "id": msg_id, "params": [1]}).encode() + b"\n")
    error = _next_response(server, msg_id)["error"]
    assert error["code"] == -32602 and "params must be an object" in error["message"]


def test_string_ids_are_echoed(server: RpcProcess) -> None:
    server.write(b'{"jsonrpc":"2.0","method":"log","id":"abc"}\n')
    reply = server.wait_unscoped(lambda m: m.get("id") == "abc")
    assert reply["error"]["code"] == -32000


def test_input_messages_are_never_answered(server: RpcProcess) -> None:
    quiet = [
        server.send("exec_pipe.stdin", {"id": 1, "data": b64("x")}),
        server.send("exec_tty.stdin", {"id": 1, "data": "%%%not base64"}),
        server.send("exec_pipe.stdin_eof", {"id": 1}),
        server.send("exec_tty.resize", {"id": 1, "rows": "x", "cols": 80}),
    ]
    server.notify("exec_tty.stdin_eof", {"id": 1})
    # A later request is answered, the input messages before it were not.
    assert server.error("log")["code"] == -32000
    assert not any(server.answered(i) for i in quiet)


def test_cancel(server: RpcProcess) -> None:
    assert server.result("cancel", {"id": 424242}) == {"cancelled": False}
    error = server.error("cancel", {"id": [1]})
    assert error["code"] == -32602


def test_cancel_before_the_request_starts(server: RpcProcess) -> None:
    """Both lines arrive in one read, so the create is cancelled before its task first runs."""
    create, cancel = server.new_id(), server.new_id()
    server.expect(create)
    server.expect(cancel)
    lines = [
        {"jsonrpc": "2.0", "method": "create", "id": create, "params": {"image": 5}},
        {"jsonrpc": "2.0", "method": "cancel", "id": cancel, "params": {"id": create}},
    ]
    server.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert _next_response(server, cancel)["result"] == {"cancelled": True}
    assert _next_response(server, create)["error"]["code"] == -32003


def test_responses_from_the_client_are_ignored(server: RpcProcess) -> None:
    before = len(server.unscoped())
    server.write(b'{"jsonrpc":"2.0","result":{},"id":1}\n{"jsonrpc":"2.0","error":{"code":1,"message":"m"},"id":2}\n')
    assert server.error("log")["code"] == -32000
    assert server.unscoped()[before:] == []


def test_empty_lines_are_skipped(server: RpcProcess) -> None:
    server.write(b"\n\n   \n\r\n")
    assert server.error("log")["code"] == -32000


def test_overlong_line_is_drained_and_answered(server: RpcProcess) -> None:
    msg_id = server.new_id()
    server.expect(msg_id)
    head = json.dumps({"jsonrpc": "2.0", "method": "write_file", "id": msg_id}).encode()[:-1]
    server.write(head + b',"params":{"path":"/big","content":"')
    chunk = b"A" * (1 << 20)
    for _ in range(MAX_LINE_BYTES // len(chunk) + 2):
        server.write(chunk)
    server.write(b'"}}\n')
    error = _next_response(server, msg_id)["error"]
    assert error["code"] == -32600 and "limit" in error["message"]
    assert server.error("log")["code"] == -32000


def test_a_16_mib_write_file_fits_in_one_line(server: RpcProcess) -> None:
    content = b64(b"\x01" * (16 * 1024 * 1024))
    # Parsed whole (not over-long): it reaches dispatch, which refuses it only because no VM exists.
    assert server.error("write_file", {"path": "/big", "content": content, "mode": 420}) == {
        "code": -32000,
        "message": "VM not created",
    }


def test_random_lines_never_kill_the_server(server: RpcProcess) -> None:
    rng = random.Random(9)
    pieces = [b"{", b"}", b"[", b'"id":', b'"method":', b'"exec"', b'"cancel"', b'"params":', b"{}", b"1", b",", b":"]
    methods = ["exec", "cancel", "close_not", "exec_pipe.stdin", "log_stream", "port_forward", "x" * 300]
    values: list[object] = [None, 1, -1, 2**64, 1.5, "s", [], {}, True, {"id": 1}]
    for _ in range(400):
        kind = rng.random()
        if kind < 0.3:
            line = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(80))).replace(b"\n", b"")
        elif kind < 0.6:
            line = b"".join(rng.choice(pieces) for _ in range(rng.randrange(10)))
        else:
            msg = {"jsonrpc": "2.0", "method": rng.choice(methods), "id": rng.choice(values)}
            if rng.random() < 0.7:
                msg["params"] = {k: rng.choice(values) for k in rng.sample(["id", "command", "data", "image"], 2)}
            line = json.dumps(msg).encode()
        server.write(line + b"\n")
    assert server.error("log", timeout=60)["code"] == -32000
    assert server.proc.poll() is None


def test_close_answers_then_exits(fresh: RpcProcess) -> None:
    msg_id = fresh.send("close", {"timeout_seconds": 2.0})
    fresh.write(b'{"jsonrpc":"2.0","method":"log","id":77}\n')  # after close: never read
    assert _next_response(fresh, msg_id)["result"] == {}
    assert fresh.wait_exit(30) == 0
    assert not any(m.get("id") == 77 for m in fresh.unscoped())


def test_close_with_a_bad_timeout_still_closes(fresh: RpcProcess) -> None:
    error = fresh.error("close", {"timeout_seconds": "soon"})
    assert error["code"] == -32602 and "timeout_seconds" in error["message"]
    assert fresh.wait_exit(30) == 0


def test_stdin_eof_exits(fresh: RpcProcess) -> None:
    assert fresh.error("log")["code"] == -32000
    fresh.close_stdin()
    assert fresh.wait_exit(30) == 0


def test_unterminated_last_line_is_still_served(fresh: RpcProcess) -> None:
    fresh.expect(5)
    fresh.write(b'{"jsonrpc":"2.0","method":"log","id":5}')
    fresh.close_stdin()
    assert fresh.wait(5)[0]["error"]["code"] == -32000
    assert fresh.wait_exit(30) == 0


def test_sigterm_exits_cleanly(fresh: RpcProcess) -> None:
    assert fresh.error("log")["code"] == -32000
    fresh.proc.send_signal(signal.SIGTERM)
    assert fresh.wait_exit(30) == 0


NOISY_SERVER = """
import subprocess, sys
import matchlock.rpc.server as server
real_serve = server.serve
async def noisy(in_fd, out_fd):
    print("stray print from the server")
    sys.stdout.flush()
    subprocess.run(["sh", "-c", "echo child writes to fd 1; read line || true"], check=True)
    await real_serve(in_fd, out_fd)
server.serve = noisy
from matchlock.cli.main import main
sys.argv = ["matchlock", "rpc"]
main()
"""


def test_only_protocol_lines_reach_stdout(tmp_path) -> None:
    """A stray print or a child process writing to fd 1 lands on stderr, and no child reads the requests."""
    requests = b'{"jsonrpc":"2.0","method":"log","id":1}\n{"jsonrpc":"2.0","method":"close","id":2}\n'
    proc = subprocess.run(
        [sys.executable, "-c", NOISY_SERVER],
        input=requests,
        capture_output=True,
        timeout=60,
        env={**os.environ, "MATCHLOCK_STATE_DIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in replies] == [1, 2]  # the child's `read` got /dev/null, not request 1
    assert b"stray print from the server" in proc.stderr and b"child writes to fd 1" in proc.stderr
