"""`matchlock fork`'s launcher (cli/launcher.py) without a VM: owners forked from this process, their
readiness and errors, the secret file read once, and `fork`'s refusals and output."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from matchlock.api.errors import UsageError
from matchlock.cli import launcher
from matchlock.cli import main as cli_main
from matchlock.cli import snapshot as snapshot_cli
from matchlock.cli.owner import READY_FD_ENV


def _fake_owner(monkeypatch, behaviour) -> None:
    """Make a forked owner run `behaviour(argv)` instead of the real `run` (the child inherits the patch)."""

    def main() -> None:
        behaviour(list(__import__("sys").argv[1:]))

    monkeypatch.setattr(cli_main, "main", main)


def _ready(vm_id: str) -> None:
    fd = int(os.environ.pop(READY_FD_ENV))
    os.write(fd, f"{vm_id}\n".encode())
    os.close(fd)


def test_each_owner_reports_its_id_and_gets_the_arguments_in_memory(monkeypatch):
    def behaviour(argv: list[str]) -> None:
        assert argv == ["run", "--from-snapshot", "s", "-d", "--secret", "K=v@h"]
        assert os.getsid(0) == os.getpid()  # a session of its own: Ctrl-C at `fork` is not for the clones
        _ready(f"vm-{os.getpid():08x}")

    _fake_owner(monkeypatch, behaviour)
    owners = launcher.wait(launcher.start(["run", "--from-snapshot", "s", "-d", "--secret", "K=v@h"], 3))
    assert [owner.error for owner in owners] == ["", "", ""]
    assert [owner.vm_id for owner in owners] == [f"vm-{owner.pid:08x}" for owner in owners]
    for owner in owners:
        os.waitpid(owner.pid, 0)


def test_an_owner_holds_none_of_the_descriptors_its_caller_left_open(monkeypatch):
    # A `flock LOCK matchlock fork ...` caller: a long-lived owner holding the lock's descriptor kept
    # the lock for the clone's whole life.
    held_r, held_w = os.pipe()
    os.set_inheritable(held_w, True)
    try:
        caller_fds = launcher.caller_descriptors()
        assert held_w in caller_fds and held_r in caller_fds

        def behaviour(argv: list[str]) -> None:
            for fd in (held_r, held_w):
                try:
                    os.fstat(fd)
                except OSError:
                    continue
                raise SystemExit(f"descriptor {fd} of the caller is still open in the owner")
            _ready("vm-00000001")

        _fake_owner(monkeypatch, behaviour)
        [owner] = launcher.wait(launcher.start(["run", "x"], 1, caller_fds))
        assert (owner.error, owner.vm_id) == ("", "vm-00000001")
        os.waitpid(owner.pid, 0)
        os.close(held_w)
        assert os.read(held_r, 1) == b""  # no process holds the write end any more
    finally:
        for fd in (held_r, held_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_an_owner_that_fails_before_it_is_ready_reports_its_error_and_code(monkeypatch):
    def behaviour(argv: list[str]) -> None:
        if os.environ.get("FAIL_ALL") or argv[-1] == "fail":
            print("Error: snapshot 'x' not found", file=__import__("sys").stderr)
            raise SystemExit(3)

    _fake_owner(monkeypatch, behaviour)
    [failed] = launcher.wait(launcher.start(["run", "fail"], 1))
    assert (failed.vm_id, failed.error) == ("", "Error: snapshot 'x' not found")
    [silent] = launcher.wait(launcher.start(["run", "quiet"], 1))  # exits 0 without announcing an id
    assert silent.error == "Error: the clone's owner exited with code 0 before it was ready"


def test_an_owner_that_raises_never_returns_into_the_parent(monkeypatch):
    def behaviour(argv: list[str]) -> None:
        raise RuntimeError("boom in the owner")

    _fake_owner(monkeypatch, behaviour)
    [owner] = launcher.wait(launcher.start(["run"], 1))
    assert "RuntimeError: boom in the owner" in owner.error


def test_a_secret_file_is_read_once_and_each_owner_reads_its_own_copy(monkeypatch, tmp_path):
    read_end, write_end = os.pipe()  # a pipe can be read only once: the owners must not read the caller's
    document = json.dumps({"API_KEY": {"value": "v", "hosts": ["api.example.com"]}}).encode()
    os.write(write_end, document)
    os.close(write_end)
    copy = launcher.SecretCopy(f"/proc/self/fd/{read_end}")
    os.close(read_end)
    seen = tmp_path / "seen"

    def behaviour(argv: list[str]) -> None:
        with open(argv[-1], "rb") as f:
            data = f.read()
        with open(seen, "ab") as out:
            out.write(b"ok\n" if data == document else b"wrong\n")
        _ready("vm-00000001")

    _fake_owner(monkeypatch, behaviour)
    try:
        owners = launcher.wait(launcher.start(["run", "--secret-file", copy.path], 2))
    finally:
        copy.close()
    assert [o.vm_id for o in owners] == ["vm-00000001"] * 2
    assert seen.read_bytes() == b"ok\nok\n"
    for owner in owners:
        os.waitpid(owner.pid, 0)


def test_an_unreadable_secret_file_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(UsageError, match="--secret-file .*missing.json: cannot read it"):
        launcher.SecretCopy(str(tmp_path / "missing.json"))


def test_fork_prints_the_ids_one_per_line_or_as_json_and_removes_its_snapshot(monkeypatch, tmp_path):
    from click.testing import CliRunner

    made: list[str] = []
    removed: list[str] = []
    monkeypatch.setattr("matchlock.sandbox.relay_client.control", lambda vm, action, name, mode: made.append(name))
    monkeypatch.setattr(launcher, "preload", lambda: None)
    monkeypatch.setattr(snapshot_cli, "_remove_snapshot", removed.append)
    monkeypatch.setattr(snapshot_cli, "_has_network", lambda name: len(made) == 1)

    def start(args: list[str], count: int, caller_fds: tuple[int, ...] = ()) -> list[launcher.Owner]:
        assert args[:4] == ["run", "--from-snapshot", made[-1], "-d"]
        assert ("--no-network" in args) == (len(made) == 2)  # a full restore needs the source's devices
        return [launcher.Owner(0, -1, -1, vm_id=f"vm-0000000{i}") for i in range(count)]

    monkeypatch.setattr(launcher, "start", start)
    monkeypatch.setattr(launcher, "wait", lambda owners: owners)
    plain = CliRunner().invoke(snapshot_cli.fork, ["vm-src", "-n", "2"])
    assert (plain.exit_code, plain.output) == (0, "vm-00000000\nvm-00000001\n")
    as_json = CliRunner().invoke(snapshot_cli.fork, ["vm-src", "-n", "3", "--json"])
    assert json.loads(as_json.output) == ["vm-00000000", "vm-00000001", "vm-00000002"]
    assert removed == made and len(made) == 2 and all(name.startswith("fork-") for name in made)


def test_fork_reports_the_clones_that_failed_and_still_prints_the_others(monkeypatch):
    from click.testing import CliRunner

    monkeypatch.setattr("matchlock.sandbox.relay_client.control", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "preload", lambda: None)
    monkeypatch.setattr(snapshot_cli, "_remove_snapshot", lambda name: None)
    monkeypatch.setattr(snapshot_cli, "_has_network", lambda name: True)
    owners = [launcher.Owner(0, -1, -1, vm_id="vm-00000001"), launcher.Owner(0, -1, -1, error="Error: no room")]
    monkeypatch.setattr(launcher, "start", lambda args, count, caller_fds=(): owners)
    monkeypatch.setattr(launcher, "wait", lambda found: found)
    result = CliRunner().invoke(snapshot_cli.fork, ["vm-src", "-n", "2", "--json"])
    assert result.exit_code != 0
    assert json.loads(result.stdout) == ["vm-00000001"]
    assert "Error: no room" in result.stderr and "1 of 2 clones of vm-src failed" in str(result.exception)


def test_fork_refuses_a_count_out_of_range():
    from click.testing import CliRunner

    result = CliRunner().invoke(snapshot_cli.fork, ["vm-src", "-n", "17"])
    assert isinstance(result.exception, UsageError) and "invalid -n 17" in str(result.exception)
