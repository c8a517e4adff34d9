"""The sync SDK `Client` end to end: our `matchlock rpc`, a real VM, every method and notification.

One sandbox is shared by the module (tests leave nothing behind that another reads); the last test
closes and removes it. The async client has the same coverage in test_sdk_async.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time

import pytest
from sdk_support import IMAGE, MATCHLOCK

from matchlock import Client, Config, MatchlockError, PortForwardBinding, RPCError, Sandbox
from support.ports import echo_round_trip, free_port

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


@pytest.fixture(scope="module")
def client(module_state_dir):
    box = Sandbox(IMAGE).allow_host("allowed.example.com").with_env("GREETING", "hello").with_memory(256)
    client = Client(Config(binary_path=MATCHLOCK))
    client.start()
    try:
        client.create(box.options())
    except BaseException:
        client.close()
        raise
    yield client
    client.close()


def test_exec_returns_output_exit_code_and_honours_env_and_working_dir(client):
    result = client.exec('echo "$GREETING"; echo oops >&2; pwd; exit 3', working_dir="/tmp")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "hello\n/tmp\n", "oops\n")
    assert result.duration_ms >= 0


def test_exec_stream_delivers_both_streams_before_returning(client):
    out, err = io.StringIO(), io.StringIO()
    result = client.exec_stream("for i in 1 2 3; do echo out$i; echo err$i >&2; done", stdout=out, stderr=err)
    assert result.exit_code == 0
    assert (out.getvalue(), err.getvalue()) == ("out1\nout2\nout3\n", "err1\nerr2\nerr3\n")


def test_exec_pipe_forwards_stdin_and_runs_as_the_user(client):
    payload = "".join(f"line {n}\n" for n in range(20000))  # ~200 KB: several stdin chunks
    out, err = io.StringIO(), io.StringIO()
    result = client.exec_pipe("cat; echo done >&2", stdin=io.BytesIO(payload.encode()), stdout=out, stderr=err)
    assert (result.exit_code, out.getvalue() == payload, err.getvalue()) == (0, True, "done\n")
    out = io.StringIO()
    assert client.exec_pipe("id -u; cat", stdin=None, stdout=out, user="65534").exit_code == 0
    assert out.getvalue() == "65534\n"


def test_exec_interactive_has_a_terminal_of_the_requested_size_and_resizes(client):
    out = io.StringIO()
    result = client.exec_interactive("stty size; tty", stdout=out, rows=33, cols=99)
    assert result.exit_code == 0
    assert out.getvalue().splitlines()[0] == "33 99" and "/dev/pts/" in out.getvalue()

    resized = threading.Event()

    def sizes():
        yield (40, 120)
        resized.set()  # runs when the pump asks for the next size, i.e. after sending this one

    class GatedInput(io.RawIOBase):
        """Sends its line only once the resize went out, so the shell reads it after the resize."""

        def __init__(self) -> None:
            self.lines = [b"go\n"]

        def read(self, size: int = -1) -> bytes:
            resized.wait(60)
            return self.lines.pop() if self.lines else b""

    out = io.StringIO()
    result = client.exec_interactive("read x; stty size", stdin=GatedInput(), stdout=out, resize=sizes())
    assert result.exit_code == 0
    assert out.getvalue().splitlines()[-1] == "40 120", out.getvalue()


def test_files_round_trip(client):
    blob = os.urandom(1 << 20)
    client.write_file("/tmp/sdk/blob.bin", blob, mode=0o600)
    client.write_file("/tmp/sdk/text.txt", "héllo")
    assert client.read_file("/tmp/sdk/blob.bin") == blob
    assert client.read_file("/tmp/sdk/text.txt") == "héllo".encode()
    listing = {f.name: f for f in client.list_files("/tmp/sdk")}
    assert (listing["blob.bin"].size, listing["blob.bin"].mode & 0o777, listing["blob.bin"].is_dir) == (
        1 << 20,
        0o600,
        False,
    )
    assert client.exec("stat -c %a /tmp/sdk/blob.bin").stdout == "600\n"
    assert [f.is_dir for f in client.list_files("/tmp") if f.name == "sdk"] == [True]
    with pytest.raises(RPCError) as missing:
        client.read_file("/tmp/sdk/absent")
    assert missing.value.is_file_error()


def test_log_and_log_stream(client):
    assert isinstance(client.log(), str)
    out = io.StringIO()
    with pytest.raises(TimeoutError):
        client.log_stream(stdout=out, timeout=1)
    assert out.getvalue() == client.log()[: len(out.getvalue())]
    assert client.exec("echo after").stdout == "after\n"


def test_timeout_cancels_the_command_and_the_client_goes_on(client):
    with pytest.raises(TimeoutError, match="request exec"):
        client.exec("sleep 600", timeout=1)
    assert client.exec("echo alive").stdout == "alive\n"


def test_requests_run_concurrently(client):
    results: list = []
    waiter = threading.Thread(
        target=lambda: results.append(
            client.exec("while [ ! -e /tmp/go ]; do sleep 0.1; done; echo released", timeout=120)
        )
    )
    waiter.start()
    client.write_file("/tmp/go", b"")  # only gets through if the server runs it beside the blocked exec
    waiter.join(130)
    assert [r.stdout for r in results] == ["released\n"]


def test_port_forward_reaches_a_guest_server(client):
    port = free_port()
    served: list = []
    server = threading.Thread(target=lambda: served.append(client.exec("nc -l -p 8080 -e /bin/cat", timeout=120)))
    server.start()
    try:
        assert client.port_forward(f"{port}:8080") == [PortForwardBinding("127.0.0.1", port, 8080)]
        assert echo_round_trip(port, b"through the forward\n") == b"through the forward\n"
    finally:
        server.join(130)
    assert served and served[0].exit_code == 0
    with pytest.raises(MatchlockError, match="invalid port value"):
        client.port_forward("70000")


def test_allow_list_changes_on_the_running_sandbox(client):
    added = client.allow_list_add("new.example.com,allowed.example.com")
    assert added.changed == ["new.example.com"]
    assert set(added.allowed_hosts) == {"allowed.example.com", "new.example.com"}
    removed = client.allow_list_delete("new.example.com")
    assert (removed.changed, removed.allowed_hosts) == (["new.example.com"], ["allowed.example.com"])


def test_launch_runs_the_entrypoint_into_the_log(module_state_dir):
    """A sandbox of its own: launch() starts ENTRYPOINT/CMD, whose output `log` and `log_stream` show."""
    box = Sandbox(IMAGE).with_entrypoint("sh", "-c", "echo entrypoint-started; exec sleep 600")
    with Client(Config(binary_path=MATCHLOCK)) as launched:
        launched.launch(box)
        deadline = time.monotonic() + 60
        while "entrypoint-started" not in launched.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        followed = io.StringIO()
        with pytest.raises(TimeoutError):
            launched.log_stream(stdout=followed, timeout=2)
        assert launched.exec("echo beside it").stdout == "beside it\n"
    launched.remove()
    assert "entrypoint-started\n" in followed.getvalue()
    assert box.options().launch_entrypoint is False


def test_zz_close_keeps_the_vm_until_remove(client, module_state_dir):
    """Last in the module: it ends the shared sandbox."""
    vm_id = client.vm_id

    def listed() -> list[str]:
        """The status column of `matchlock list` for this VM."""
        out = subprocess.run([MATCHLOCK, "list"], check=True, capture_output=True, text=True).stdout
        rows = [line.split() for line in out.splitlines()[1:]]
        return [row[1] for row in rows if row and row[0] == vm_id]

    client.close()
    client.close()
    assert listed() == ["stopped"]
    client.remove()
    assert listed() == []
    with pytest.raises(MatchlockError, match="not running"):
        client.exec("true")
