"""`matchlock rpc` end to end on one shared VM: every method and notification, cancel, events, fuzz.

The server is a real subprocess driven with raw JSON lines, as the SDKs drive it
(tests/support/rpcwire.py checks every line it writes). It resolves names with the
stand-in internet's DNS server, so network events, the allow-list and the network-hook
callback socket are exercised against the stand-in hosts only.
"""

from __future__ import annotations

import json
import random
import socket
import time

import pytest
from netfixtures import HOSTS

from matchlock.jsonrpc import MAX_LINE_BYTES
from matchlock.rpc.methods import EXEC_OUTPUT_LIMIT
from support.cli import run_matchlock
from support.hooks import HookServer
from support.ports import free_port
from support.rpcwire import RpcProcess, b64, joined, pid_alive, unb64

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

HOOK_HOST = "api-eu.test"
PLACEHOLDER = "SANDBOX_SECRET_" + "ab" * 16
BLOCKED_IP = HOSTS["other.test"]  # by address: a name outside the allow-list is not even resolved


@pytest.fixture(scope="module")
def hooks(tmp_path_factory):
    server = HookServer(tmp_path_factory.mktemp("hook") / "hook.sock", lambda request: {"action": "block"})
    yield server
    server.close()


@pytest.fixture(scope="module")
def rpc(inet, module_state_dir, tmp_path_factory, hooks):
    log = tmp_path_factory.mktemp("rpc") / "stderr.log"
    server = RpcProcess(env={**inet.env(), "MATCHLOCK_RPC_LOG": "INFO"}, stderr_path=log, wrap=inet.wrap)
    params = {
        "image": "matchlock/busybox:builtin",
        "env": {"FROM_CREATE": "yes"},
        "image_config": {"env": {"FROM_IMAGE_CONFIG": "ic"}},
        "network": {
            "allowed_hosts": ["api.test", HOOK_HOST],
            "block_private_ips": True,
            "add_hosts": [{"host": "db.internal", "ip": "10.1.2.3"}],
            "secrets": {"API_KEY": {"value": "real-secret-value", "hosts": ["api.test"], "placeholder": PLACEHOLDER}},
            "intercept": True,
            "interception": {
                "rules": [
                    {"action": "allow", "hosts": [HOOK_HOST], "callback_id": "network_hook_1", "timeout_ms": 5000}
                ],
                "callback_socket": hooks.path,
            },
        },
    }
    response, _ = server.call("create", params, timeout=300)
    assert "result" in response, f"{response}\n{log.read_text()[-3000:]}"
    server.vm_id = response["result"]["id"]
    yield server
    qemu = _qemu_pid(server.vm_id)
    server.call("close", {"timeout_seconds": 2})
    assert server.wait_exit(60) == 0
    assert server.bad_lines == []
    for _ in range(200):  # no process may outlive the session
        if not pid_alive(qemu):
            break
        time.sleep(0.05)
    assert not pid_alive(qemu)
    assert json.loads(run_matchlock("get", server.vm_id).stdout)["status"] == "stopped"


def _qemu_pid(vm_id: str) -> int:
    history = json.loads(run_matchlock("inspect", vm_id).stdout)["history"]
    return [r["resources"]["qemu_pid"] for r in history if "qemu_pid" in r.get("resources", {})][-1]


def test_create_result(rpc) -> None:
    assert rpc.vm_id.startswith("vm-")


def test_exec_buffered(rpc) -> None:
    result = rpc.result("exec", {"command": "echo out; echo err >&2; echo $FROM_CREATE; exit 7"})
    assert result["exit_code"] == 7 and isinstance(result["duration_ms"], int)
    assert unb64(result["stdout"]) == b"out\nyes\n" and unb64(result["stderr"]) == b"err\n"


def test_create_config_reaches_the_guest(rpc) -> None:
    result = rpc.result("exec", {"command": "echo $FROM_IMAGE_CONFIG $API_KEY; grep db.internal /etc/hosts"})
    lines = unb64(result["stdout"]).decode().splitlines()
    assert lines[0] == f"ic {PLACEHOLDER}"  # the guest sees the placeholder, never the value
    assert lines[1].split() == ["10.1.2.3", "db.internal"]


def test_exec_user_and_working_dir(rpc) -> None:
    result = rpc.result("exec", {"command": "id -u; pwd", "user": "65534", "working_dir": "/tmp"})
    assert unb64(result["stdout"]) == b"65534\n/tmp\n"
    error = rpc.error("exec", {"command": "true", "working_dir": "relative"})
    assert error["code"] == -32602 and "working_dir" in error["message"]
    assert rpc.error("exec", {"command": 5})["code"] == -32602
    assert rpc.error("exec", {})["message"] == "invalid params: command is required"
    for bad, reason in (({"user": "no-such-user"}, "user 'no-such-user' not found in /etc/passwd"),
                        ({"working_dir": "/no/such/dir"}, "cannot use working directory /no/such/dir")):  # fmt: skip
        error = rpc.error("exec", {"command": "true", **bad})
        assert error["code"] == -32001 and error["message"].startswith(f"exec failed: {reason}"), error


def test_exec_stream_output_precedes_the_response(rpc) -> None:
    response, notes = rpc.call("exec_stream", {"command": "for i in 1 2 3; do echo o$i; echo e$i >&2; done"})
    assert response["result"]["exit_code"] == 0 and "stdout" not in response["result"]
    assert joined(notes, "exec_stream.stdout") == b"o1\no2\no3\n"
    assert joined(notes, "exec_stream.stderr") == b"e1\ne2\ne3\n"
    assert all(n["params"]["id"] == response["id"] for n in notes)


def test_exec_pipe_with_and_without_top_level_ids(rpc) -> None:
    msg_id = rpc.send("exec_pipe", {"command": "cat; echo done >&2", "user": "nobody"})
    ready = rpc.wait_scoped(msg_id, "exec_pipe.ready")
    assert ready == {"jsonrpc": "2.0", "method": "exec_pipe.ready", "params": {"id": msg_id}}
    rpc.send("exec_pipe.stdin", {"id": msg_id, "data": b64("first\n")}, track=False)  # SDK style: fresh id
    rpc.notify("exec_pipe.stdin", {"id": msg_id, "data": b64(b"\x00\xffsecond\n")})  # Go style: no id
    rpc.notify("exec_pipe.stdin_eof", {"id": msg_id})
    response, notes = rpc.wait(msg_id)
    assert response["result"]["exit_code"] == 0
    assert joined(notes, "exec_pipe.stdout") == b"first\n\x00\xffsecond\n"
    assert joined(notes, "exec_pipe.stderr") == b"done\n"
    assert notes[0]["method"] == "exec_pipe.ready"


def test_exec_tty(rpc) -> None:
    msg_id = rpc.send(
        "exec_tty", {"command": "stty size; read line; echo got:$line; stty size", "rows": 30, "cols": 100}
    )
    rpc.wait_scoped(msg_id, "exec_tty.ready")
    rpc.wait_scoped(msg_id, "exec_tty.stdout")  # the first size is printed before we resize
    rpc.send("exec_tty.resize", {"id": msg_id, "rows": 40, "cols": 120}, track=False)
    time.sleep(0.5)
    rpc.send("exec_tty.stdin", {"id": msg_id, "data": b64("hello\n")}, track=False)
    response, notes = rpc.wait(msg_id)
    assert response["result"]["exit_code"] == 0
    output = joined(notes, "exec_tty.stdout").replace(b"\r\n", b"\n")
    assert b"30 100\n" in output and b"got:hello\n" in output and b"40 120\n" in output
    assert not any(n["method"] == "exec_tty.stderr" for n in notes)


def test_exec_tty_resize_after_eof(rpc) -> None:
    """The SDK's order without stdin: EOF right after ready, then the resizes."""
    msg_id = rpc.send("exec_tty", {"command": "sleep 1; stty size", "rows": 24, "cols": 80})
    rpc.wait_scoped(msg_id, "exec_tty.ready")
    rpc.send("exec_tty.stdin_eof", {"id": msg_id}, track=False)
    rpc.send("exec_tty.resize", {"id": msg_id, "rows": 33, "cols": 111}, track=False)
    response, notes = rpc.wait(msg_id)
    assert response["result"]["exit_code"] == 0
    assert b"33 111" in joined(notes, "exec_tty.stdout")


def test_files(rpc) -> None:
    assert (
        rpc.result("write_file", {"path": "/tmp/rpc/dir/a.bin", "content": b64(b"\x00\x01hello"), "mode": 0o750}) == {}
    )
    assert unb64(rpc.result("read_file", {"path": "/tmp/rpc/dir/a.bin"})["content"]) == b"\x00\x01hello"
    rpc.result("exec", {"command": "mkdir -p /tmp/rpc/dir/sub /tmp/rpc/empty && ln -sf a.bin /tmp/rpc/dir/link"})
    files = {f["name"]: f for f in rpc.result("list_files", {"path": "/tmp/rpc/dir"})["files"]}
    assert files["a.bin"] == {
        "name": "a.bin",
        "size": 7,
        "mode": 0o750,
        "mod_time": "0001-01-01T00:00:00Z",
        "is_dir": False,
    }
    assert files["sub"]["is_dir"] and files["sub"]["mode"] & (1 << 31) and files["sub"]["mode"] & 0o777 == 0o755
    assert files["link"]["mode"] & (1 << 27)
    assert rpc.result("list_files", {"path": "/tmp/rpc/empty"}) == {"files": []}
    assert unb64(rpc.result("exec", {"command": "stat -c %a /tmp/rpc/dir/a.bin"})["stdout"]) == b"750\n"
    # mode 0 means 0644, as upstream
    rpc.result("write_file", {"path": "/tmp/rpc/m0", "content": b64("x"), "mode": 0})
    assert unb64(rpc.result("exec", {"command": "stat -c %a /tmp/rpc/m0"})["stdout"]) == b"644\n"


def test_file_errors(rpc) -> None:
    assert rpc.error("read_file", {"path": "/nonexistent"})["code"] == -32002
    assert rpc.error("list_files", {"path": "/nonexistent"})["code"] == -32002
    assert rpc.error("write_file", {"path": "/tmp/x", "content": "%%%"}) == {
        "code": -32602,
        "message": "invalid base64 content",
    }
    assert rpc.error("write_file", {"path": "relative", "content": ""})["code"] == -32602
    assert rpc.error("read_file", {"path": 7})["message"] == "invalid params: path must be a string, got a number"


def test_large_file_roundtrip(rpc) -> None:
    data = random.Random(1).randbytes(3 * 1024 * 1024)
    rpc.result("write_file", {"path": "/tmp/big.bin", "content": b64(data), "mode": 420}, timeout=300)
    assert unb64(rpc.result("read_file", {"path": "/tmp/big.bin"}, timeout=300)["content"]) == data


def test_log_and_log_stream(rpc) -> None:
    marker = f"log-marker-{time.time_ns()}"
    rpc.result("exec", {"command": f"wget -q -O- http://{BLOCKED_IP}/{marker} || true"})  # blocked: logged
    content = unb64(rpc.result("log")["content"])
    assert marker.encode() in content
    msg_id = rpc.send("log_stream")
    note = rpc.wait_scoped(msg_id, "log_stream.data")
    assert set(note["params"]) == {"id", "data"}
    streamed = rpc.wait_scoped_data(msg_id, "log_stream.data", marker.encode())
    assert marker.encode() in streamed
    assert rpc.result("cancel", {"id": msg_id}) == {"cancelled": True}
    response, _ = rpc.wait(msg_id)
    assert response["error"]["code"] == -32003


def test_network_events(rpc) -> None:
    marker = f"event-{time.time_ns()}"
    rpc.result("exec", {"command": f"wget -q -O- http://{BLOCKED_IP}/{marker} || true"})
    event = rpc.wait_unscoped(lambda m: m.get("method") == "event" and marker in json.dumps(m))
    assert "id" not in event
    params = event["params"]
    assert params["type"] == "network" and isinstance(params["timestamp"], int)
    assert params["network"]["blocked"] is True and params["network"]["host"] == BLOCKED_IP


def test_allow_list(rpc, inet) -> None:
    assert rpc.error("allow_list_add", {"hosts": []}) == {"code": -32602, "message": "hosts is required"}
    assert rpc.error("allow_list_delete", {})["message"] == "hosts is required"
    assert rpc.error("allow_list_add", {"hosts": "other.test"})["code"] == -32602
    mark = inet.mark()
    result = rpc.result("allow_list_add", {"hosts": ["other.test", "api.test,other.test"]})
    assert result["added"] == ["other.test"] and "other.test" in result["allowed_hosts"]
    out = rpc.result("exec", {"command": "wget -q -O- http://other.test/allowed-now"})
    assert out["exit_code"] == 0, unb64(out["stderr"])
    assert inet.served_since(mark, path="/allowed-now")
    result = rpc.result("allow_list_delete", {"hosts": ["other.test"]})
    assert result["removed"] == ["other.test"] and "other.test" not in result["allowed_hosts"]
    assert rpc.result("allow_list_delete", {"hosts": ["never.test"]})["removed"] == []


def test_network_hook_callback_is_wired(rpc, hooks) -> None:
    before = len(hooks.requests)
    out = rpc.result("exec", {"command": f"wget -q -O- http://{HOOK_HOST}/hooked"})
    assert out["exit_code"] != 0  # the SDK-side hook answered block
    request = hooks.requests[before]
    assert request["callback_id"] == "network_hook_1" and request["host"] == HOOK_HOST


def test_port_forward_replaces_and_serves(rpc) -> None:
    rpc.result("write_file", {"path": "/tmp/www/index.html", "content": b64("served-by-guest\n")})
    server_id = rpc.send("exec_stream", {"command": "httpd -f -p 127.0.0.1:8080 -h /tmp/www"})
    first, second = free_port(), free_port()
    assert rpc.result(
        "port_forward", {"forwards": [{"local_port": first, "remote_port": 8080}], "addresses": ["127.0.0.1"]}
    ) == {"bindings": [{"address": "127.0.0.1", "local_port": first, "remote_port": 8080}]}
    result = rpc.result(
        "port_forward", {"forwards": [{"local_port": second, "remote_port": 8080}], "addresses": ["127.0.0.1"]}
    )
    assert result["bindings"][0]["local_port"] == second
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first), timeout=5).close()  # the first set was replaced
    body = _http_get(second)
    assert b"served-by-guest" in body
    assert rpc.error("port_forward", {"forwards": []})["message"] == "forwards is required"
    assert rpc.error("port_forward", {"forwards": [{"local_port": 0, "remote_port": 1}]})["code"] == -32602
    assert (
        rpc.error("port_forward", {"forwards": [{"local_port": 1, "remote_port": 2}], "addresses": ["nope"]})["code"]
        == -32602
    )
    rpc.result("cancel", {"id": server_id})
    assert rpc.wait(server_id)[0]["error"]["code"] == -32003


def _http_get(port: int) -> bytes:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                if data:
                    return data
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no answer through the port forward")
        time.sleep(0.3)


def test_cancel_kills_the_guest_process(rpc) -> None:
    # Each exec has its own PID namespace, so the command proves its own end: the TERM trap leaves a
    # mark, and the heartbeat file stops changing.
    tag = f"/tmp/cancel-{time.time_ns()}"
    script = f"trap 'echo term > {tag}.term; exit 143' TERM; while :; do date +%s%N > {tag}.beat; sleep 0.1; done"
    msg_id = rpc.send("exec", {"command": script})
    _wait_for_file(rpc, f"{tag}.beat")
    assert rpc.result("cancel", {"id": msg_id}) == {"cancelled": True}
    response, _ = rpc.wait(msg_id)
    assert response["error"]["code"] == -32003
    assert unb64(rpc.result("read_file", {"path": f"{tag}.term"})["content"]) == b"term\n"
    beat = rpc.result("read_file", {"path": f"{tag}.beat"})["content"]
    time.sleep(1)
    assert rpc.result("read_file", {"path": f"{tag}.beat"})["content"] == beat
    assert rpc.result("cancel", {"id": msg_id}) == {"cancelled": False}  # already finished


def _wait_for_file(rpc, path: str) -> None:
    for _ in range(100):
        if rpc.result("exec", {"command": f"test -s {path}"})["exit_code"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_concurrent_requests_and_duplicate_ids(rpc) -> None:
    slow = rpc.send("exec", {"command": "sleep 2; echo slow"})
    rpc.write(
        json.dumps({"jsonrpc": "2.0", "method": "exec", "id": slow, "params": {"command": "true"}}).encode() + b"\n"
    )
    fast = [rpc.send("exec", {"command": f"echo {i}"}) for i in range(5)]
    for i, msg_id in enumerate(fast):
        response, _ = rpc.wait(msg_id)
        assert unb64(response["result"]["stdout"]) == f"{i}\n".encode()
    refused, _ = rpc.wait(slow)  # the duplicate is answered at once, with the id it reused
    assert refused["error"]["code"] == -32600 and "in flight" in refused["error"]["message"]
    real = rpc.wait_unscoped(lambda m: m.get("id") == slow and "result" in m)
    assert unb64(real["result"]["stdout"]) == b"slow\n"


def test_cancels_racing_completions(rpc) -> None:
    rng = random.Random(5)
    for _ in range(20):
        msg_id = rpc.send("exec", {"command": f"sleep 0.0{rng.randrange(10)}"})
        time.sleep(rng.random() * 0.05)
        rpc.send("cancel", {"id": msg_id}, track=False)
        response, _ = rpc.wait(msg_id)
        assert "result" in response or response["error"]["code"] == -32003
    assert rpc.result("exec", {"command": "echo alive"})["exit_code"] == 0


def test_buffered_output_is_bounded(rpc) -> None:
    error = rpc.error("exec", {"command": f"head -c {EXEC_OUTPUT_LIMIT + 1024} /dev/zero"}, timeout=300)
    assert error["code"] == -32001 and "exec_stream" in error["message"]


def test_cli_reaches_the_rpc_sandbox(rpc) -> None:
    """The session serves the exec relay, so `matchlock exec ID` and `list` see the SDK's VM."""
    rows = [line.split() for line in run_matchlock("list").stdout.splitlines()]
    assert [rpc.vm_id, "running"] in [row[:2] for row in rows]
    result = run_matchlock("exec", rpc.vm_id, "--", "sh", "-c", "echo from-cli")
    assert result.returncode == 0 and result.stdout == "from-cli\n", result


def test_second_create_is_refused(rpc) -> None:
    error = rpc.error("create", {"image": "matchlock/busybox:builtin"})
    assert error["code"] == -32000 and rpc.vm_id in error["message"]


def test_fuzzed_lines_against_a_live_vm(rpc) -> None:
    rng = random.Random(11)
    methods = [
        "exec",
        "exec_stream",
        "exec_pipe.stdin",
        "exec_tty.resize",
        "read_file",
        "list_files",
        "cancel",
        "bogus",
    ]
    values: list[object] = [None, 0, -1, 2**63, 1.5, "", "/", "x" * 5000, [], {}, True, {"id": 1}, [1, "a"]]
    for _ in range(150):
        if rng.random() < 0.3:
            line = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(200))).replace(b"\n", b"")
        else:
            params = {k: rng.choice(values) for k in rng.sample(["command", "path", "id", "data", "rows", "user"], 3)}
            if rng.random() < 0.5:
                params["command"] = rng.choice(["true", "echo x", "cat /etc/hostname"])
            msg = {"jsonrpc": "2.0", "method": rng.choice(methods), "id": rng.choice(values + [rng.randrange(1 << 30)])}
            msg["params"] = params
            line = json.dumps(msg).encode()
        rpc.write(line + b"\n")
    huge = rpc.new_id()
    rpc.expect(huge)
    rpc.write(b'{"jsonrpc":"2.0","method":"write_file","id":%d,"params":{"path":"/tmp/h","content":"' % huge)
    for _ in range(MAX_LINE_BYTES // (1 << 20) + 1):
        rpc.write(b"QUFB" * (1 << 18))
    rpc.write(b'"}}\n')
    assert rpc.wait(huge)[0]["error"]["code"] == -32600
    assert unb64(rpc.result("exec", {"command": "echo still-here"}, timeout=300)["stdout"]) == b"still-here\n"
    assert rpc.proc.poll() is None
