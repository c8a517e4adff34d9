"""Agent message schemas: valid input parses, every bad field is named."""

from __future__ import annotations

import math

import pytest

from matchlock.wire import agent as msgs
from matchlock.wire.agent import (
    MAX_COMMAND,
    ExecRequest,
    FileInfo,
    GuestConfig,
    PathRequest,
    PingRequest,
    ShutdownRequest,
    TerminalSize,
    WriteFileRequest,
    parse_cpus,
    parse_files,
    parse_request,
)
from matchlock.wire.replies import Exited

# --- exec -------------------------------------------------------------------


def test_exec_request_round_trip_full():
    req = ExecRequest(
        command="echo hi",
        env={"A": "1", "PATH": "/bin"},
        cwd="/tmp",
        user="nobody",
        stdin=True,
        tty=TerminalSize(24, 80),
    )
    wire = req.to_wire()
    assert wire["op"] == "exec" and wire["tty"] == {"rows": 24, "cols": 80}
    assert parse_request(wire) == req
    assert ExecRequest.parse(wire) == req


def test_exec_request_defaults():
    req = ExecRequest.parse({"command": "ls"})
    assert req == ExecRequest("ls", {}, "/", "", False, None)
    assert ExecRequest.parse({"command": "ls", "tty": None}).tty is None


def test_exec_command_at_max_length_accepted():
    assert len(ExecRequest.parse({"command": "x" * MAX_COMMAND}).command) == MAX_COMMAND


@pytest.mark.parametrize(
    "msg, match",
    [
        ({}, r"'command' must be a string"),
        ({"command": 5}, r"'command' must be a string"),
        ({"command": "x" * (MAX_COMMAND + 1)}, rf"'command' is longer than {MAX_COMMAND} characters"),
        ({"command": "a\x00b"}, r"'command' contains a NUL byte"),
        ({"command": "ls", "env": {"A=B": "1"}}, r"invalid environment entry 'A=B'"),
        ({"command": "ls", "env": {"": "1"}}, r"invalid environment entry ''"),
        ({"command": "ls", "env": {"A\x00": "1"}}, r"invalid environment entry 'A\\x00'"),
        ({"command": "ls", "env": {"A": "1\x00"}}, r"invalid environment entry 'A'"),
        ({"command": "ls", "env": {"A": 1}}, r"invalid environment entry 'A'"),
        ({"command": "ls", "env": ["A=1"]}, r"'env' must be an object"),
        ({"command": "ls", "env": {f"K{i}": "" for i in range(4097)}}, r"'env' must be an object with at most 4096"),
        ({"command": "ls", "cwd": "tmp"}, r"'cwd' must be an absolute path, got 'tmp'"),
        ({"command": "ls", "cwd": ""}, r"'cwd' must be an absolute path"),
        ({"command": "ls", "cwd": None}, r"'cwd' must be a string"),
        ({"command": "ls", "cwd": "/" + "a" * 4096}, r"'cwd' is longer than 4096"),
        ({"command": "ls", "cwd": "/a\x00"}, r"'cwd' contains a NUL byte"),
        ({"command": "ls", "user": 0}, r"'user' must be a string"),
        ({"command": "ls", "user": "u" * 257}, r"'user' is longer than 256"),
        ({"command": "ls", "stdin": 1}, r"'stdin' must be a boolean"),
        ({"command": "ls", "stdin": "yes"}, r"'stdin' must be a boolean"),
        ({"command": "ls", "tty": [24, 80]}, r"'tty' must be an object or null"),
        ({"command": "ls", "tty": {"rows": 0, "cols": 80}}, r"'rows' = 0 is outside 1..65535"),
        ({"command": "ls", "tty": {"rows": 24, "cols": 65536}}, r"'cols' = 65536 is outside 1..65535"),
        ({"command": "ls", "tty": {"rows": True, "cols": 80}}, r"'rows' must be an integer"),
        ({"command": "ls", "tty": {"rows": 24.0, "cols": 80}}, r"'rows' must be an integer"),
        ({"command": "ls", "tty": {"cols": 80}}, r"'rows' must be an integer"),
    ],
)
def test_exec_request_rejects(msg, match):
    with pytest.raises(ValueError, match=match):
        ExecRequest.parse(msg)


def test_terminal_size_bounds():
    assert TerminalSize.parse({"rows": 1, "cols": 65535}) == TerminalSize(1, 65535)
    with pytest.raises(ValueError, match=r"'cols' = 0 is outside"):
        TerminalSize.parse({"rows": 1, "cols": 0})
    with pytest.raises(ValueError, match=r"'rows' = -1 is outside"):
        TerminalSize.parse({"rows": -1, "cols": 1})


# --- other requests ---------------------------------------------------------


def test_write_file_request():
    req = WriteFileRequest("/etc/x", 0o755)
    assert parse_request(req.to_wire()) == req
    assert WriteFileRequest.parse({"path": "/a"}).mode == 0o644
    assert WriteFileRequest.parse({"path": "/a", "mode": 0o7777}).mode == 0o7777
    with pytest.raises(ValueError, match=r"'mode' = 4096 is outside 0..4095"):
        WriteFileRequest.parse({"path": "/a", "mode": 0o10000})
    with pytest.raises(ValueError, match=r"'mode' must be an integer"):
        WriteFileRequest.parse({"path": "/a", "mode": "644"})
    with pytest.raises(ValueError, match=r"'path' must be an absolute path, got 'rel'"):
        WriteFileRequest.parse({"path": "rel"})
    with pytest.raises(ValueError, match=r"'path' must be a string"):
        WriteFileRequest.parse({})


@pytest.mark.parametrize("op", [msgs.OP_READ_FILE, msgs.OP_LIST_FILES])
def test_path_requests(op):
    req = PathRequest(op, "/data")
    assert parse_request(req.to_wire()) == req
    with pytest.raises(ValueError, match=r"'path' must be an absolute path"):
        parse_request({"op": op, "path": "data"})
    with pytest.raises(ValueError, match=r"'path' contains a NUL byte"):
        parse_request({"op": op, "path": "/a\x00b"})


def test_parse_request_shutdown_and_unknown_ops():
    assert parse_request({"op": "shutdown"}) == ShutdownRequest()
    assert parse_request({"op": "ping"}) == PingRequest()
    assert ShutdownRequest().to_wire() == {"op": "shutdown"} and PingRequest().to_wire() == {"op": "ping"}
    with pytest.raises(ValueError, match=r"unknown op \['exec'\]"):
        parse_request({"op": ["exec"]})  # not a string: refused, not looked up
    with pytest.raises(ValueError, match=r"unknown op 'rm'"):
        parse_request({"op": "rm"})
    with pytest.raises(ValueError, match=r"unknown op None"):
        parse_request({})


# --- replies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "msg, expected",
    [
        ({"code": 0}, (0, None)),
        ({"code": 255}, (255, None)),
        ({"code": 137, "signal": 9}, (137, 9)),
        ({"code": 1, "signal": None}, (1, None)),
        ({"code": 1, "signal": 64}, (1, 64)),
    ],
)
def test_parse_exit_valid(msg, expected):
    assert Exited.parse(msg) == Exited(*expected)


@pytest.mark.parametrize(
    "msg, match",
    [
        ({"code": 256}, r"'code' = 256 is outside 0..255"),
        ({"code": 300}, r"'code' = 300 is outside 0..255"),
        ({"code": -1}, r"'code' = -1 is outside 0..255"),
        ({}, r"'code' must be an integer"),
        ({"code": "0"}, r"'code' must be an integer"),
        ({"code": False}, r"'code' must be an integer"),
        ({"code": 1.0}, r"'code' must be an integer"),
        ({"code": 0, "signal": 0}, r"'signal' = 0 is outside 1..64"),
        ({"code": 0, "signal": 65}, r"'signal' = 65 is outside 1..64"),
        ({"code": 0, "signal": "KILL"}, r"'signal' must be an integer"),
        ({"code": 0, "signal": True}, r"'signal' must be an integer"),
    ],
)
def test_parse_exit_rejects(msg, match):
    with pytest.raises(ValueError, match=match):
        Exited.parse(msg)


def entry(**overrides):
    base = {"name": "file.txt", "size": 12, "mode": 0o100644, "is_dir": False}
    base.update(overrides)
    return base


def test_parse_files_valid():
    files = parse_files({"files": [entry(), entry(name="sub", size=0, mode=0o40755, is_dir=True)]})
    assert files == [FileInfo("file.txt", 12, 0o100644, False), FileInfo("sub", 0, 0o40755, True)]
    assert parse_files({"files": []}) == []
    assert FileInfo.parse(files[0].to_wire()) == files[0]
    assert parse_files({"files": [entry(name="...")]})[0].name == "..."
    assert parse_files({"files": [entry(name="n" * 255)]})[0].name == "n" * 255


@pytest.mark.parametrize(
    "files, match",
    [
        (None, r"'files' must be a list"),
        ({"a": 1}, r"'files' must be a list"),
        ([entry(name="..")], r"invalid file name '\.\.'"),
        ([entry(name=".")], r"invalid file name '\.'"),
        ([entry(name="a/b")], r"invalid file name 'a/b'"),
        ([entry(name="")], r"invalid file name ''"),
        ([entry(name="n" * 256)], r"'name' is longer than 255"),
        ([entry(name="a\x00")], r"'name' contains a NUL byte"),
        ([entry(name=3)], r"'name' must be a string"),
        ([entry(), "file.txt"], r"file entries must be objects"),
        ([None], r"file entries must be objects"),
        ([["name", 1]], r"file entries must be objects"),
        ([entry(is_dir=1)], r"'is_dir' must be a boolean"),
        ([entry(is_dir=None)], r"'is_dir' must be a boolean"),
        ([entry(size=-1)], r"'size' = -1 is outside"),
        ([entry(size="1")], r"'size' must be an integer"),
        ([entry(mode=1 << 32)], r"'mode' = 4294967296 is outside 0..4294967295"),
    ],
)
def test_parse_files_rejects(files, match):
    with pytest.raises(ValueError, match=match):
        parse_files({"files": files})


# --- config -----------------------------------------------------------------


def config(**overrides):
    base = {"hostname": "box", "time_ns": 1_700_000_000_000_000_000}
    base.update(overrides)
    return base


def test_guest_config_round_trip():
    cfg = GuestConfig("box", 123, True, 2.5, ("1.1.1.1", "8.8.8.8"), (("db", "10.0.0.2"),))
    assert GuestConfig.parse(cfg.to_wire()) == cfg


def test_guest_config_defaults():
    cfg = GuestConfig.parse(config())
    assert cfg == GuestConfig("box", 1_700_000_000_000_000_000, False, 1.0, (), ())
    assert GuestConfig.parse(config(cpus=3)).cpus == 3.0


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"hostname": ""}, r"invalid hostname ''"),
        ({"hostname": "my box"}, r"invalid hostname 'my box'"),
        ({"hostname": "a\tb"}, r"invalid hostname"),
        ({"hostname": "h" * 65}, r"'hostname' is longer than 64"),
        ({"hostname": None}, r"'hostname' must be a string"),
        ({"hostname": "a\x00"}, r"'hostname' contains a NUL byte"),
        ({"time_ns": "now"}, r"'time_ns' must be an integer"),
        ({"time_ns": -1}, r"'time_ns' = -1 is outside"),
        ({"privileged": "yes"}, r"'privileged' must be a boolean"),
        ({"cpus": 0}, r"cpus must be a finite number > 0, got 0"),
        ({"cpus": True}, r"cpus must be a finite number > 0"),
        ({"cpus": "2"}, r"cpus must be a finite number > 0"),
        ({"dns_servers": "1.1.1.1"}, r"'dns_servers' must be a list of addresses"),
        ({"dns_servers": [""]}, r"'dns_servers' must be a list of addresses"),
        ({"dns_servers": [1]}, r"'dns_servers' must be a list of addresses"),
        ({"dns_servers": ["1" * 64]}, r"'dns_servers' must be a list of addresses"),
        ({"extra_hosts": {"db": "10.0.0.2"}}, r"'extra_hosts' must be a list of \[host, ip\] pairs"),
        ({"extra_hosts": [["db"]]}, r"'extra_hosts' must be a list of"),
        ({"extra_hosts": [["db", "10.0.0.2", "x"]]}, r"'extra_hosts' must be a list of"),
        ({"extra_hosts": [["db", ""]]}, r"'extra_hosts' must be a list of"),
        ({"extra_hosts": [["db", 10]]}, r"'extra_hosts' must be a list of"),
        ({"extra_hosts": ["db 10.0.0.2"]}, r"'extra_hosts' must be a list of"),
        ({"extra_hosts": [["h" * 256, "1.2.3.4"]]}, r"'extra_hosts' must be a list of"),
    ],
)
def test_guest_config_rejects(overrides, match):
    with pytest.raises(ValueError, match=match):
        GuestConfig.parse(config(**overrides))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1, 0.0, None, [1]])
def test_parse_cpus_rejects(value):
    with pytest.raises(ValueError, match="cpus must be a finite number > 0"):
        parse_cpus(value)


def test_parse_cpus_accepts():
    assert parse_cpus(0.5) == 0.5
    assert parse_cpus(4) == 4.0 and isinstance(parse_cpus(4), float)
