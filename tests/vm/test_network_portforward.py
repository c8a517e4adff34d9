"""Port forwarding through the real CLI: `run -p` and `matchlock port-forward`, to an echo server in the guest.

Host side, everything is on 127.0.0.1 in the isolated test session. The
guest runs busybox `nc -ll -p 8080 -e /bin/cat` (a persistent echo server),
so each connection is echoed both ways and ends with a half-close: the test
shuts down its sending side and must still receive the whole echo.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from support.cli import MATCHLOCK
from support.ports import echo_round_trip, free_port

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

ECHO_SERVER = ("--", "nc", "-ll", "-p", "8080", "-e", "/bin/cat")


def test_run_publish_forwards_tcp_both_ways(net_detached):
    port = free_port()
    net_detached("-p", f"{port}:8080", *ECHO_SERVER)
    payload = os.urandom(256 * 1024)
    assert echo_round_trip(port, payload) == payload
    assert echo_round_trip(port, b"second connection\n") == b"second connection\n"


def test_port_forward_command(net_cli, net_detached, state_dir):
    vm = net_detached(*ECHO_SERVER)
    port = free_port()
    proc = subprocess.Popen([MATCHLOCK, "port-forward", vm, f"{port}:8080"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line == f"Forwarding 127.0.0.1:{port} -> sandbox:8080\n", line
        payload = os.urandom(64 * 1024)
        assert echo_round_trip(port, payload) == payload
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_port_in_use_is_a_clear_error(net_cli, net_detached):
    vm = net_detached()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = net_cli("port-forward", vm, f"{port}:8080", timeout=30)
    assert result.returncode != 0, result
    assert str(port) in result.stderr and "in use" in result.stderr.lower(), result
