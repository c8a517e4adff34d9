"""A scripted stand-in for `matchlock rpc`, built on the jsonrpc core, for the SDK client unit tests.

Run as `sdk_fake_server.py rpc` (the SDK's argv). Every line it receives is appended to $FAKE_LOG as
JSON. Behaviour is chosen by the exec command or the create image, so one process serves a whole test:

exec `echo X`        -> stdout "X\\n"
exec `noise`         -> first writes lines the published SDK choked on, then answers normally
exec `bad-error`     -> an error object without `message` for this id
exec `hang`          -> no answer until `cancel`, then -32003 (which the client no longer awaits)
exec `die`           -> the process exits without answering
exec `hook`          -> calls the SDK's network-hook socket and returns its answer line as stdout
exec_stream `late`   -> the response first, then the output notifications
exec_pipe / exec_tty -> `ready`, then echo stdin as stdout until EOF (resizes are logged)
create image `hang`  -> never answers
create with from_snapshot and env FAIL_CLONE -> -32602 (a failing fork clone)
snapshot / snapshot_remove -> the record's name and mode / the names
Also `rm ID` and `volume ...` subcommands, which print what the SDK parses.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time

from matchlock.jsonrpc import ErrorResponse, LineSplitter, Request, Response, dump_line, encode, parse_line

out_lock = threading.Lock()
state: dict = {"files": {}, "allowed": ["a.example.com"], "stdin": {}, "cancelled": {}, "create": {}}


def log(entry) -> None:
    with open(os.environ["FAKE_LOG"], "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def write(data: bytes) -> None:
    with out_lock:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def notify(method: str, params: dict) -> None:
    write(encode(Request(method, params)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def reply(req: Request, result) -> None:
    write(encode(Response(req.id, result)))


def fail(req: Request, code: int, message: str) -> None:
    write(encode(ErrorResponse(req.id, code, message)))


def call_hook(command: str) -> bytes:
    sock_path = state["create"]["network"]["interception"]["callback_socket"]
    payload = command.split(" ", 1)[1]
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(sock_path)
        conn.sendall(payload.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def handle_exec(req: Request) -> None:
    command = req.params.get("command", "")
    if command.startswith("echo "):
        reply(req, {"exit_code": 0, "stdout": b64(command[5:].encode() + b"\n"), "stderr": "", "duration_ms": 1})
    elif command == "noise":
        write(b"not json at all\n")
        write(b"42\n[1, 2]\n\n")
        write(dump_line({"jsonrpc": "2.0", "result": {}, "id": 99999}))
        write(dump_line({"jsonrpc": "2.0", "error": {"code": "x"}, "id": None}))
        write(dump_line({"jsonrpc": "2.0", "method": "exec_stream.stdout", "params": {"id": 77777, "data": "AA=="}}))
        reply(req, {"exit_code": 3, "stdout": b64(b"ok"), "stderr": b64(b"\xff"), "duration_ms": 2})
    elif command == "bad-error":
        write(dump_line({"jsonrpc": "2.0", "error": {"code": -32001}, "id": req.id}))
    elif command == "hang":
        event = state["cancelled"].setdefault(req.id, threading.Event())
        event.wait()
        fail(req, -32003, "cancelled")
    elif command == "die":
        os._exit(0)
    elif command.startswith("hook "):
        reply(req, {"exit_code": 0, "stdout": b64(call_hook(command)), "stderr": "", "duration_ms": 0})
    else:
        fail(req, -32001, f"fake server cannot run {command!r}")


def handle_stream(req: Request) -> None:
    chunks = [("exec_stream.stdout", b"out1 "), ("exec_stream.stderr", b"err1"), ("exec_stream.stdout", b"out2")]
    if req.params.get("command") == "late":
        reply(req, {"exit_code": 0, "duration_ms": 5})
    for method, data in chunks:
        notify(method, {"id": req.id, "data": b64(data)})
    if req.params.get("command") != "late":
        reply(req, {"exit_code": 0, "duration_ms": 5})


def handle_input(req: Request, prefix: str) -> None:
    """exec_pipe / exec_tty: echo stdin back as stdout until EOF."""
    done = state["stdin"].setdefault(req.id, threading.Event())
    notify(f"{prefix}.ready", {"id": req.id})
    done.wait()
    reply(req, {"exit_code": 0, "duration_ms": 1})


def handle(req: Request) -> None:
    method, params = req.method, req.params
    if method == "create":
        state["create"] = params
        if params.get("image") == "hang":
            return
        if params.get("from_snapshot") and params.get("env", {}).get("FAIL_CLONE"):
            fail(req, -32602, "clone refused")
            return
        reply(req, {"id": "vm-fake0001"})
    elif method == "snapshot":
        reply(req, {"name": params.get("name", "snap"), "mode": params.get("mode", "full")})
    elif method == "snapshot_remove":
        reply(req, {"removed": params.get("names", [])})
    elif method == "exec":
        handle_exec(req)
    elif method == "exec_stream":
        handle_stream(req)
    elif method in ("exec_pipe", "exec_tty"):
        handle_input(req, method)
    elif method == "write_file":
        content = base64.b64decode(params["content"])
        state["files"][params["path"]] = content
        notify(
            "event",
            {"type": "file", "timestamp": 1, "file": {"op": "write", "path": params["path"], "size": len(content)}},
        )
        reply(req, {})
    elif method == "read_file":
        if params["path"] not in state["files"]:
            fail(req, -32002, f"read {params['path']}: no such file")
        else:
            reply(req, {"content": b64(state["files"][params["path"]])})
    elif method == "list_files":
        files = [
            {"name": p.rsplit("/", 1)[1], "size": len(c), "mode": 420, "is_dir": False}
            for p, c in state["files"].items()
        ]
        reply(req, {"files": files})
    elif method == "log":
        reply(req, {"content": b64(b"boot log\n")})
    elif method == "log_stream":
        notify("log_stream.data", {"id": req.id, "data": b64(b"line 1\n")})
        state["cancelled"].setdefault(req.id, threading.Event()).wait()
        fail(req, -32003, "cancelled")
    elif method == "port_forward":
        bindings = [
            {"address": address, "local_port": f["local_port"] or 40000, "remote_port": f["remote_port"]}
            for f in params["forwards"]
            for address in params["addresses"]
        ]
        reply(req, {"bindings": bindings})
    elif method == "allow_list_add":
        added = [h for h in params["hosts"] if h not in state["allowed"]]
        state["allowed"] += added
        reply(req, {"added": added, "allowed_hosts": state["allowed"]})
    elif method == "allow_list_delete":
        removed = [h for h in params["hosts"] if h in state["allowed"]]
        state["allowed"] = [h for h in state["allowed"] if h not in removed]
        reply(req, {"removed": removed, "allowed_hosts": state["allowed"] or None})
    elif method == "close":
        reply(req, {})
        os._exit(0)
    else:
        fail(req, -32601, "Method not found")


def inline(req: Request) -> bool:
    """Input and control messages are handled in transport order, without an answer."""
    target = req.params.get("id")
    if req.method in ("exec_pipe.stdin", "exec_tty.stdin"):
        data = base64.b64decode(req.params["data"])
        notify(f"{req.method.split('.')[0]}.stdout", {"id": target, "data": b64(data.upper())})
    elif req.method in ("exec_pipe.stdin_eof", "exec_tty.stdin_eof"):
        state["stdin"].setdefault(target, threading.Event()).set()
    elif req.method == "exec_tty.resize":
        pass
    elif req.method == "cancel":
        state["cancelled"].setdefault(target, threading.Event()).set()
    else:
        return False
    return True


def serve() -> None:
    splitter = LineSplitter()
    fd = sys.stdin.buffer.fileno()
    while chunk := os.read(fd, 1 << 16):
        for line in splitter.feed(chunk):
            log(json.loads(line))
            message = parse_line(line)
            if isinstance(message, Request) and not inline(message):
                threading.Thread(target=handle, args=(message,), daemon=True).start()
    time.sleep(0.05)


class FakeBinary:
    """A `matchlock` stand-in in `directory` (for `Config(binary_path=...)`) and the log of what it got."""

    def __init__(self, directory, monkeypatch) -> None:
        self.log_path = directory / "fake.log"
        self.path = directory / "matchlock"
        self.path.write_text(f'#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} "$@"\n')
        self.path.chmod(0o755)
        monkeypatch.setenv("FAKE_LOG", str(self.log_path))

    def entries(self, method: str | None = None) -> list[dict]:
        if not self.log_path.exists():
            return []
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [entry for entry in lines if method is None or entry.get("method") == method]


def cli(args: list[str]) -> None:
    log({"argv": args})
    if args[:2] == ["volume", "create"]:
        print(json.dumps({"name": args[2], "size": f"{float(args[4]):.1f} MB", "path": f"/v/{args[2]}.ext4"}))
    elif args[:2] == ["volume", "ls"]:
        print(json.dumps([{"name": "data", "size": "16.0 MB", "path": "/v/data.ext4"}]))
    elif args[0] == "rm" and args[1] != "vm-fake0001":
        sys.exit(f"no such sandbox {args[1]}")


if __name__ == "__main__":
    if sys.argv[1:] == ["rpc"]:
        serve()
    else:
        cli(sys.argv[1:])
