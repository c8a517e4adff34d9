"""`AsyncClient` end to end against our `matchlock rpc` and a real VM (the sync twin is test_sdk.py).

The module shares one sandbox, driven from one long-lived event loop (`loop_thread`); the last test
closes and removes it. Its binary is `matchlock` behind a switch that can make one `rpc` server fail to
start (`_switchable`), so a fork can fail midway with real VMs.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
from pathlib import Path

import pytest
from sdk_support import IMAGE, MATCHLOCK

from matchlock import AsyncClient, Config, MatchlockError, PortForwardBinding, RPCError, Sandbox
from support.ports import echo_round_trip, free_port

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]

FORWARD_PORT = free_port()


@pytest.fixture(scope="module")
def run(loop_thread):
    return loop_thread.run


@pytest.fixture(scope="module")
def switch(tmp_path_factory) -> Path:
    """While `switch / "fail-one"` exists, the first `rpc` server started exits at once (claimed by mkdir)."""
    return tmp_path_factory.mktemp("switch")


def _switchable(switch: Path) -> str:
    wrapper = switch / "matchlock"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = rpc ] && [ -e "{switch}/fail-one" ] && mkdir "{switch}/failed" 2>/dev/null; then exit 3; fi\n'
        f'exec "{MATCHLOCK}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture(scope="module")
def client(module_state_dir, run, switch):
    box = Sandbox(IMAGE).allow_host("allowed.example.com").with_port_forward(FORWARD_PORT, 8080).with_memory(256)
    client = AsyncClient(Config(binary_path=_switchable(switch)))

    async def start() -> None:
        await client.start()
        await client.create(box.options())

    try:
        run(start())
    except BaseException:
        run(client.close())
        raise
    yield client
    run(client.close())


def test_concurrent_execs_and_streams(client, run):
    async def scenario():
        results = await asyncio.gather(*(client.exec(f"echo {n}; exit {n}") for n in range(4)))
        out, err = io.StringIO(), io.StringIO()
        streamed = await client.exec_stream("echo a; echo b >&2", stdout=out, stderr=err, working_dir="/tmp")
        return results, streamed.exit_code, out.getvalue(), err.getvalue()

    results, code, out, err = run(scenario())
    assert [(r.exit_code, r.stdout) for r in results] == [(n, f"{n}\n") for n in range(4)]
    assert (code, out, err) == (0, "a\n", "b\n")


def test_exec_pipe_with_a_stream_reader_and_a_file(client, run):
    async def scenario():
        reader = asyncio.StreamReader()
        reader.feed_data(b"from a stream\n")
        reader.feed_eof()
        first = io.StringIO()
        await client.exec_pipe("cat", stdin=reader, stdout=first)
        second = io.StringIO()
        await client.exec_pipe("tr a-z A-Z", stdin=io.BytesIO(b"from a file\n"), stdout=second, user="65534")
        return first.getvalue(), second.getvalue()

    assert run(scenario()) == ("from a stream\n", "FROM A FILE\n")


def test_exec_interactive_with_an_async_resize_iterable(client, run):
    async def scenario():
        resized = asyncio.Event()

        async def sizes():
            yield (50, 150)
            resized.set()  # runs once the pump asks for the next size: the first one went out

        class GatedInput:
            """Sends its line only after the resize, so `stty size` runs after it."""

            def __init__(self) -> None:
                self.lines = [b"go\n"]

            async def read(self, size: int) -> bytes:
                await resized.wait()
                return self.lines.pop() if self.lines else b""

        first, second = io.StringIO(), io.StringIO()
        await client.exec_interactive("stty size", stdout=first, rows=20, cols=70)
        result = await client.exec_interactive("read x; stty size", stdin=GatedInput(), stdout=second, resize=sizes())
        return result.exit_code, first.getvalue().splitlines()[0], second.getvalue().splitlines()[-1]

    assert run(scenario()) == (0, "20 70", "50 150")


def test_files_and_log(client, run):
    blob = os.urandom(300_000)

    async def scenario():
        await client.write_file("/tmp/async/blob", blob, mode=0o640)
        data = await client.read_file("/tmp/async/blob")
        listing = await client.list_files("/tmp/async")
        log = await client.log()
        return data, listing, log

    data, listing, log = run(scenario())
    assert data == blob
    assert [(f.name, f.size, f.mode & 0o777) for f in listing] == [("blob", 300_000, 0o640)]
    assert isinstance(log, str)
    with pytest.raises(RPCError, match="absent"):
        run(client.read_file("/tmp/async/absent"))


def test_cancelling_the_task_cancels_the_request(client, run):
    async def scenario():
        out = io.StringIO()
        async with asyncio.TaskGroup() as group:
            follow = group.create_task(client.log_stream(stdout=out))
            sleeper = group.create_task(client.exec("sleep 600"))
            await asyncio.sleep(0.5)
            follow.cancel()
            sleeper.cancel()
        with pytest.raises(TimeoutError):
            await client.exec("sleep 600", timeout=1)
        return follow.cancelled(), sleeper.cancelled(), (await client.exec("echo alive")).stdout

    assert run(scenario()) == (True, True, "alive\n")


def _listed() -> list[str]:
    return subprocess.run([MATCHLOCK, "list", "-q"], check=True, capture_output=True, text=True).stdout.split()


def test_fork_gives_clones_whose_writes_are_isolated(client, run):
    async def scenario():
        clones = await client.fork(2)
        try:
            first, second = clones
            await first.write_file("/root/fork-file", "first\n")
            seen = await asyncio.gather(
                *(box.exec("cat /root/fork-file 2>/dev/null || echo absent") for box in (first, second, client))
            )
            return [clone.vm_id for clone in clones], [result.stdout for result in seen]
        finally:
            for clone in clones:
                await clone.close()
                await clone.remove()

    ids, seen = run(scenario())
    assert len({client.vm_id, *ids}) == 3
    assert seen == ["first\n", "absent\n", "absent\n"]
    assert _listed() == [client.vm_id]  # the clones are removed; the parent runs on


def test_a_fork_that_fails_midway_leaves_no_clone(client, run, switch):
    """One clone's server cannot start while the other boots a real VM: that VM is closed and removed."""
    (switch / "fail-one").touch()
    try:
        with pytest.raises(MatchlockError, match="not running|closed unexpectedly"):
            run(client.fork(2))
    finally:
        (switch / "fail-one").unlink()
    assert (switch / "failed").is_dir()  # the switch was used: exactly one server exited
    assert _listed() == [client.vm_id]
    assert run(client.snapshot_list()) == []  # the fork's temporary snapshot is gone too
    assert run(client.exec("echo alive")).stdout == "alive\n"


def test_port_forward_from_create_and_later(client, run):
    served = run(_serve_once(client, FORWARD_PORT))
    assert served == (0, b"forwarded at create\n")
    port = free_port()
    assert run(client.port_forward(f"{port}:8080")) == [PortForwardBinding("127.0.0.1", port, 8080)]
    assert run(_serve_once(client, port)) == (0, b"forwarded at create\n")


async def _serve_once(client: AsyncClient, port: int) -> tuple[int, bytes]:
    async with asyncio.TaskGroup() as group:
        server = group.create_task(client.exec("nc -l -p 8080 -e /bin/cat", timeout=120))
        echoed = await asyncio.to_thread(echo_round_trip, port, b"forwarded at create\n")
    return server.result().exit_code, echoed


def test_allow_list(client, run):
    added = run(client.allow_list_add("more.example.com"))
    assert added.changed == ["more.example.com"]
    removed = run(client.allow_list_delete("more.example.com", "allowed.example.com"))
    assert sorted(removed.changed) == ["allowed.example.com", "more.example.com"] and removed.allowed_hosts == []


def test_zz_close_then_remove(client, run):
    """Last in the module: it ends the shared sandbox."""
    vm_id = client.vm_id
    run(client.close())
    run(client.remove())
    assert vm_id and vm_id not in _listed()
    with pytest.raises(MatchlockError, match="not running"):
        run(client.exec("true"))
