"""The sync `Client` against a scripted `matchlock rpc` stand-in (sdk_fake_server.py, on the jsonrpc core)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading

import pytest
from sdk_fake_server import FakeBinary

from matchlock import (
    Client,
    Config,
    CreateOptions,
    FileInfo,
    MatchlockError,
    NetworkHookRequest,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    PortForwardBinding,
    RPCError,
    Sandbox,
    VFSHookRule,
    VFSInterceptionConfig,
)

WAIT = 30  # seconds a test waits for something that should happen at once; only hit when broken


class Collector(io.StringIO):
    """A text writer that can be waited on until it holds some text."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def write(self, text: str) -> int:
        with self.changed:
            count = super().write(text)
            self.changed.notify_all()
        return count

    def wait_for(self, text: str) -> str:
        with self.changed:
            self.changed.wait_for(lambda: text in self.getvalue(), timeout=WAIT)
        return self.getvalue()


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeBinary:
    return FakeBinary(tmp_path, monkeypatch)


@pytest.fixture
def client(fake):
    with Client(Config(binary_path=str(fake.path))) as client:
        client.create(Sandbox("alpine:latest").options())
        yield client


def test_methods_send_the_published_params_and_parse_results(fake, client):
    assert client.vm_id == "vm-fake0001"
    result = client.exec("echo hi", working_dir="/tmp")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "hi\n", "")
    client.write_file("/workspace/a.txt", "héllo")
    assert client.read_file("/workspace/a.txt") == "héllo".encode()
    assert client.list_files("/workspace") == [FileInfo(name="a.txt", size=6, mode=420, is_dir=False)]
    assert client.log() == "boot log\n"
    assert client.port_forward("8080:80", "9000") == [
        PortForwardBinding("127.0.0.1", 8080, 80),
        PortForwardBinding("127.0.0.1", 9000, 9000),
    ]
    client.close()
    sent = {entry["method"]: entry for entry in fake.entries() if "method" in entry}
    assert sent["exec"]["params"] == {"command": "echo hi", "working_dir": "/tmp"}
    assert sent["write_file"]["params"] == {"path": "/workspace/a.txt", "content": "aMOpbGxv", "mode": 420}
    assert "params" not in sent["log"]
    assert sent["port_forward"]["params"]["addresses"] == ["127.0.0.1"]
    assert sent["close"]["params"] == {"timeout_seconds": 2.0}
    ids = [entry["id"] for entry in fake.entries() if "id" in entry]
    assert ids == list(range(1, len(ids) + 1))


def test_errors_become_rpc_errors(client):
    with pytest.raises(RPCError) as caught:
        client.read_file("/missing")
    assert caught.value.code == RPCError.FILE_FAILED and caught.value.is_file_error()
    assert "no such file" in caught.value.message


def test_the_reader_survives_lines_that_killed_the_published_reader(client):
    result = client.exec("noise")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "ok", "\ufffd")
    assert client.exec("echo still alive").stdout == "still alive\n"


def test_an_error_without_message_fails_that_call_instead_of_hanging(client):
    with pytest.raises(MatchlockError, match="invalid response from matchlock rpc"):
        client.exec("bad-error", timeout=WAIT)
    assert client.exec("echo next").stdout == "next\n"


def test_stream_output_arrives_before_the_call_returns(client):
    out, err = io.StringIO(), io.StringIO()
    result = client.exec_stream("normal", stdout=out, stderr=err)
    assert (result.exit_code, out.getvalue(), err.getvalue()) == (0, "out1 out2", "err1")


def test_output_notifications_after_the_response_are_not_lost(client):
    out, err = Collector(), Collector()
    assert client.exec_stream("late", stdout=out, stderr=err).exit_code == 0
    assert out.wait_for("out1 out2") == "out1 out2"
    assert err.wait_for("err1") == "err1"


def test_a_failing_writer_fails_its_call_not_the_client(client):
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):
        client.exec_stream("normal", stdout=Broken())
    assert client.exec("echo fine").stdout == "fine\n"


def test_timeout_cancels_the_request(fake, client):
    with pytest.raises(TimeoutError, match="request exec"):
        client.exec("hang", timeout=0.3)
    assert client.exec("echo after").stdout == "after\n"
    client.close()
    hung = next(e for e in fake.entries("exec") if e["params"]["command"] == "hang")
    assert [e["params"] for e in fake.entries("cancel")] == [{"id": hung["id"]}]


def test_create_has_a_timeout(fake):
    with Client(Config(binary_path=str(fake.path))) as client:
        with pytest.raises(TimeoutError, match="request create"):
            client.create(CreateOptions(image="hang"), timeout=0.3)
        assert client.vm_id is None
    assert len(fake.entries("cancel")) == 1


def test_exec_pipe_pumps_stdin_after_ready(fake, client):
    out = io.StringIO()
    result = client.exec_pipe("cat", stdin=io.BytesIO(b"hello"), stdout=out, user="1000:1000")
    assert (result.exit_code, out.getvalue()) == (0, "HELLO")
    assert client.exec_pipe("true", stdin=None).exit_code == 0  # EOF goes out at once
    client.close()
    pipe_ids = [e["id"] for e in fake.entries("exec_pipe")]
    assert fake.entries("exec_pipe")[0]["params"] == {"command": "cat", "user": "1000:1000"}
    assert [e["params"] for e in fake.entries("exec_pipe.stdin")] == [{"id": pipe_ids[0], "data": "aGVsbG8="}]
    assert [e["params"]["id"] for e in fake.entries("exec_pipe.stdin_eof")] == pipe_ids


def test_exec_interactive_sends_size_and_resizes(fake, client):
    out = io.StringIO()
    resized = threading.Event()

    def sizes():
        yield (30, 100)
        resized.set()  # the generator resumes only after the SDK has sent that resize

    class Stdin:
        """Ends only after the resize went out; otherwise the command may finish first (a real race)."""

        def __init__(self) -> None:
            self.chunks = ["ls\n"]

        def read(self, size: int = -1) -> str:
            if self.chunks:
                return self.chunks.pop()
            resized.wait(WAIT)
            return ""

    result = client.exec_interactive("sh", stdin=Stdin(), stdout=out, rows=0, cols=0, resize=sizes())
    assert (result.exit_code, out.getvalue()) == (0, "LS\n")
    client.close()
    tty = fake.entries("exec_tty")[0]
    assert tty["params"] == {"command": "sh", "rows": 24, "cols": 80}
    assert [e["params"] for e in fake.entries("exec_tty.resize")] == [{"id": tty["id"], "rows": 30, "cols": 100}]


def test_log_stream_follows_until_its_timeout(client):
    out = Collector()
    with pytest.raises(TimeoutError):
        client.log_stream(stdout=out, timeout=0.5)
    assert out.getvalue() == "line 1\n"


def test_allow_list_calls(fake, client):
    update = client.allow_list_add("b.example.com, a.example.com", "b.example.com")
    assert (update.changed, update.allowed_hosts) == (["b.example.com"], ["a.example.com", "b.example.com"])
    update = client.allow_list_delete("a.example.com", "b.example.com")
    assert (update.changed, update.allowed_hosts) == (["a.example.com", "b.example.com"], [])
    with pytest.raises(MatchlockError, match="at least one host"):
        client.allow_list_add(" , ")
    client.close()
    assert fake.entries("allow_list_add")[0]["params"] == {"hosts": ["b.example.com", "a.example.com"]}


def test_a_dead_server_fails_pending_and_later_calls(client):
    with pytest.raises(MatchlockError, match="closed unexpectedly"):
        client.exec("die", timeout=WAIT)
    with pytest.raises(MatchlockError, match="not running|closed unexpectedly"):
        client.exec("echo x")


def test_calls_before_start_fail():
    with pytest.raises(MatchlockError, match="not running"):
        Client(Config(binary_path="/nonexistent")).exec("true")


def test_close_is_idempotent_and_remove_runs_rm(fake, client):
    client.close(timeout=5)
    client.close()
    client.remove()
    assert [e["params"] for e in fake.entries("close")] == [{"timeout_seconds": 5}]
    assert {"argv": ["rm", "vm-fake0001"]} in fake.entries()
    with pytest.raises(MatchlockError, match="not running"):
        client.exec("echo x")


def test_remove_failure_raises_called_process_error(fake):
    client = Client(Config(binary_path=str(fake.path)))
    client._last_vm_id = "vm-other"
    with pytest.raises(subprocess.CalledProcessError):
        client.remove()


def test_volumes(fake):
    client = Client(Config(binary_path=str(fake.path)))
    assert client.volume_create(" cache ", size_mb=16).path == "/v/cache.ext4"
    assert [v.name for v in client.volume_list()] == ["data"]
    client.volume_remove("cache")
    assert {"argv": ["volume", "create", "cache", "--size", "16", "--json"]} in fake.entries()
    with pytest.raises(MatchlockError, match="volume size must be > 0"):
        client.volume_create("x", size_mb=0)


def test_vfs_hooks_run_locally(fake):
    seen: list = []
    called = threading.Event()

    def after(event):
        seen.append(event)
        called.set()

    def block_secrets(request):
        return "block" if request.path.endswith(".key") else "allow"

    rules = [
        VFSHookRule(phase="after", ops=["write"], path="/workspace/*", hook=after),
        VFSHookRule(phase="before", path="/workspace/*.txt", mutate_hook=lambda request: b"mutated"),
        VFSHookRule(ops=["write"], action_hook=block_secrets),
    ]
    box = Sandbox("alpine").with_vfs_interception(VFSInterceptionConfig(rules=rules))
    with Client(Config(binary_path=str(fake.path))) as client:
        client.create(box.options())
        client.write_file("/workspace/a.txt", b"original")
        assert called.wait(WAIT)
        assert client.read_file("/workspace/a.txt") == b"mutated"
        with pytest.raises(MatchlockError, match="blocked operation: op=write path=/workspace/id.key"):
            client.write_file("/workspace/id.key", b"secret")
    assert (seen[0].op, seen[0].path, seen[0].size) == ("write", "/workspace/a.txt", 7)
    assert fake.entries("create")[0]["params"]["vfs"] == {"interception": {"emit_events": True}}
    assert [e["params"]["path"] for e in fake.entries("write_file")] == ["/workspace/a.txt"]


def test_network_hooks_answer_on_the_callback_socket(fake):
    requests: list[NetworkHookRequest] = []

    def before(request: NetworkHookRequest) -> NetworkHookResult:
        requests.append(request)
        return NetworkHookResult(action="block")

    rules = NetworkInterceptionConfig(rules=[NetworkHookRule(name="b", phase="before", hook=before)])
    with Client(Config(binary_path=str(fake.path))) as client:
        client.create(Sandbox("alpine").with_network_interception(rules).options())
        call = {"callback_id": "network_hook_1", "phase": "before", "host": "x.example.com", "status_code": "7"}
        assert json.loads(client.exec("hook " + json.dumps(call)).stdout) == {"action": "block"}
        wrong_phase = dict(call, phase="after")
        assert json.loads(client.exec("hook " + json.dumps(wrong_phase)).stdout) == {
            "error": "network hook phase mismatch"
        }
        unknown = dict(call, callback_id="network_hook_9")
        assert json.loads(client.exec("hook " + json.dumps(unknown)).stdout) == {
            "error": "network hook callback not found"
        }
        socket_path = fake.entries("create")[0]["params"]["network"]["interception"]["callback_socket"]
    assert (requests[0].host, requests[0].status_code, requests[0].query) == ("x.example.com", 7, None)
    assert not os.path.exists(socket_path)  # removed on close
