"""The published Python SDK (PyPI `matchlock==0.2.17`) drives our `matchlock rpc` unchanged.

This is how users first meet us: their program, written for that SDK, runs against this implementation.
The SDK is installed in a throwaway venv cached under ~/.cache/matchlock/sdk-compat/<version>/
(tests/support/sdk_compat.py; the install happens before the session enters its network namespace).
If it could not be installed, the test fails with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import textwrap

import pytest
from sdk_support import MATCHLOCK

from support import sdk_compat
from support.ports import free_port

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

PROGRAM = textwrap.dedent(
    """
    import io, json, os, socket, subprocess, sys, threading, time
    import matchlock
    from matchlock import Client, RPCError, Sandbox

    port, volume = int(sys.argv[1]), sys.argv[2]
    report = {"sdk": matchlock.__version__, "module": matchlock.__file__}
    sandbox = Sandbox("matchlock/busybox:builtin").with_env("GREETING", "compat").allow_host("example.com")
    with Client() as client:
        report["vm_id"] = client.create(sandbox.options())
        r = client.exec('echo "$GREETING"; echo err >&2; exit 4', working_dir="/tmp")
        report["exec"] = [r.exit_code, r.stdout, r.stderr]
        out, err = io.StringIO(), io.StringIO()
        r = client.exec_stream("echo one; echo two >&2", stdout=out, stderr=err)
        report["exec_stream"] = [r.exit_code, out.getvalue(), err.getvalue()]
        out = io.StringIO()
        r = client.exec_pipe("tr a-z A-Z", stdin=io.BytesIO(b"piped input\\n"), stdout=out)
        report["exec_pipe"] = [r.exit_code, out.getvalue()]
        out = io.StringIO()
        r = client.exec_interactive("stty size", stdout=out, rows=30, cols=90)
        report["exec_interactive"] = [r.exit_code, out.getvalue().strip()]
        client.write_file("/tmp/compat/data.bin", bytes(range(256)) * 100, mode=0o640)
        report["read_file"] = client.read_file("/tmp/compat/data.bin") == bytes(range(256)) * 100
        report["list_files"] = [[f.name, f.size, f.mode & 0o777, f.is_dir] for f in client.list_files("/tmp/compat")]
        try:
            client.read_file("/tmp/compat/missing")
        except RPCError as exc:
            report["missing"] = [exc.code, exc.is_file_error()]
        try:
            client.exec("sleep 600", timeout=1)
        except TimeoutError:
            report["timeout"] = client.exec("echo after timeout").stdout
        report["log"] = type(client.log()).__name__

        served = []
        server = threading.Thread(target=lambda: served.append(client.exec("nc -l -p 8080 -e /bin/cat").exit_code))
        server.start()
        bindings = client.port_forward(f"{port}:8080")
        report["port_forward"] = [[b.address, b.local_port, b.remote_port] for b in bindings]
        echoed, deadline = b"", time.monotonic() + 60
        while echoed != b"ping\\n" and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"ping\\n")
                    sock.shutdown(socket.SHUT_WR)
                    echoed = b"".join(iter(lambda: sock.recv(65536), b""))
            except OSError:
                time.sleep(0.3)
        server.join(120)
        report["echo"] = [echoed.decode(), served]

        info = client.volume_create(volume, size_mb=16)
        try:
            report["volume_create"] = [info.name, info.size, os.path.isfile(info.path), os.path.basename(info.path)]
            report["volume_list"] = [[v.name, v.size, v.path == info.path] for v in client.volume_list() if v.name == volume]
        finally:
            client.volume_remove(volume)
        report["volume_listed_after_remove"] = any(v.name == volume for v in client.volume_list())
        try:
            client.volume_remove(volume)
        except subprocess.CalledProcessError as exc:
            report["volume_remove_again"] = exc.returncode != 0
    client.remove()
    report["removed"] = True
    print(json.dumps(report))
    """
)


def test_a_program_for_the_published_sdk_runs_against_our_rpc(tmp_path, state_dir):
    failure = os.environ.get(sdk_compat.ERROR_ENV)
    if failure:
        pytest.fail(f"the published SDK {sdk_compat.PUBLISHED_VERSION} is not installed: {failure}")
    try:
        python = sdk_compat.ensure()
    except RuntimeError as exc:
        pytest.fail(f"the published SDK {sdk_compat.PUBLISHED_VERSION} is not installed: {exc}")
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    port = free_port()
    # Volumes live in the shared cache, so the name is unique and the volume is removed whatever happens.
    volume = f"test-sdk-compat-{secrets.token_hex(4)}"
    env = {**os.environ, "MATCHLOCK_BIN": MATCHLOCK}
    # Run from tmp_path with a clean path so `import matchlock` can only find the published package.
    env.pop("PYTHONPATH", None)
    try:
        done = subprocess.run(
            [str(python), "-I", str(program), str(port), volume],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
    finally:
        subprocess.run([MATCHLOCK, "volume", "rm", volume], capture_output=True, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report.pop("sdk") == sdk_compat.PUBLISHED_VERSION
    assert "sdk-compat" in report.pop("module")
    assert report.pop("vm_id").startswith("vm-")
    assert report == {
        "exec": [4, "compat\n", "err\n"],
        "exec_stream": [0, "one\n", "two\n"],
        "exec_pipe": [0, "PIPED INPUT\n"],
        "exec_interactive": [0, "30 90"],
        "read_file": True,
        "list_files": [["data.bin", 25600, 0o640, False]],
        "missing": [-32002, True],
        "timeout": "after timeout\n",
        "log": "str",
        "port_forward": [["127.0.0.1", port, 8080]],
        "echo": ["ping\n", [0]],
        "volume_create": [volume, "16.0 MB", True, f"{volume}.ext4"],
        "volume_list": [[volume, "16.0 MB", True]],
        "volume_listed_after_remove": False,
        "volume_remove_again": True,
        "removed": True,
    }
