"""`AsyncClient` against the scripted `matchlock rpc` stand-in (sdk_fake_server.py)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from sdk_fake_server import FakeBinary

from matchlock import (
    AsyncClient,
    Config,
    CreateOptions,
    ExecResult,
    MatchlockError,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    PortForwardBinding,
    RPCError,
    Sandbox,
    VFSHookRule,
    VFSInterceptionConfig,
)

WAIT = 30


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeBinary:
    return FakeBinary(tmp_path, monkeypatch)


async def started(fake: FakeBinary, box: Sandbox | None = None) -> AsyncClient:
    client = AsyncClient(Config(binary_path=str(fake.path)))
    await client.start()
    await client.create((box or Sandbox("alpine:latest")).options())
    return client


async def test_methods_as_coroutines(fake):
    async with AsyncClient(Config(binary_path=str(fake.path))) as client:
        await client.create(Sandbox("alpine").with_port_forward(8080, 80).options())
        results = await asyncio.gather(*(client.exec(f"echo {n}") for n in range(5)))
        assert [r.stdout for r in results] == [f"{n}\n" for n in range(5)]
        await client.write_file("/workspace/f", b"\x00\x01")
        assert await client.read_file("/workspace/f") == b"\x00\x01"
        assert [f.name for f in await client.list_files("/workspace")] == ["f"]
        assert await client.log() == "boot log\n"
        assert await client.port_forward_with_addresses(["::1"], "1:2") == [PortForwardBinding("::1", 1, 2)]
        update = await client.allow_list_add("z.example.com")
        assert update.changed == ["z.example.com"]
        out, err = io.StringIO(), io.StringIO()
        assert (await client.exec_stream("normal", stdout=out, stderr=err)).exit_code == 0
        assert (out.getvalue(), err.getvalue()) == ("out1 out2", "err1")
        with pytest.raises(RPCError, match="no such file"):
            await client.read_file("/nope")
    forwards = [e["params"] for e in fake.entries("port_forward")]
    assert forwards[0] == {"forwards": [{"local_port": 8080, "remote_port": 80}], "addresses": ["127.0.0.1"]}
    assert [e["params"] for e in fake.entries("close")] == [{"timeout_seconds": 2.0}]


async def test_bad_lines_and_late_output(fake):
    client = await started(fake)
    try:
        assert await client.exec("noise") == ExecResult(3, "ok", "\ufffd", 2)
        with pytest.raises(MatchlockError, match="invalid response"):
            await client.exec("bad-error", timeout=WAIT)
        out = io.StringIO()
        await client.exec_stream("late", stdout=out)
        async with asyncio.timeout(WAIT):
            while out.getvalue() != "out1 out2":
                await asyncio.sleep(0.01)
    finally:
        await client.close()


async def test_timeout_and_task_cancellation_send_cancel(fake):
    client = await started(fake)
    with pytest.raises(TimeoutError, match="request exec"):
        await client.exec("hang", timeout=0.2)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(client.exec("hang"))
        async with asyncio.timeout(WAIT):
            while len(fake.entries("exec")) < 2:
                await asyncio.sleep(0.01)
        task.cancel()
    assert task.cancelled()
    assert (await client.exec("echo ok")).stdout == "ok\n"
    await client.close()
    hung = [e["id"] for e in fake.entries("exec") if e["params"]["command"] == "hang"]
    assert [e["params"]["id"] for e in fake.entries("cancel")] == hung


async def test_create_timeout(fake):
    async with AsyncClient(Config(binary_path=str(fake.path))) as client:
        with pytest.raises(TimeoutError, match="request create"):
            await client.create(CreateOptions(image="hang"), timeout=0.2)


async def test_exec_pipe_with_sync_and_async_stdin(fake):
    client = await started(fake)
    try:
        out = io.StringIO()
        assert (await client.exec_pipe("cat", stdin=io.BytesIO(b"abc"), stdout=out)).exit_code == 0
        assert out.getvalue() == "ABC"
        reader = asyncio.StreamReader()
        reader.feed_data(b"xyz")
        reader.feed_eof()
        out = io.StringIO()
        assert (await client.exec_pipe("cat", stdin=reader, stdout=out)).exit_code == 0
        assert out.getvalue() == "XYZ"

        async def sizes():
            yield (40, 120)

        out = io.StringIO()
        result = await client.exec_interactive("sh", stdin=None, stdout=out, resize=sizes())
        assert result.exit_code == 0
    finally:
        await client.close()
    assert [e["params"]["rows"] for e in fake.entries("exec_tty.resize")] == [40]


async def test_dead_server_and_not_started(fake):
    with pytest.raises(MatchlockError, match="not running"):
        await AsyncClient(Config(binary_path=str(fake.path))).exec("true")
    client = await started(fake)
    with pytest.raises(MatchlockError, match="closed unexpectedly"):
        await client.exec("die", timeout=WAIT)
    await client.close()
    await client.close()


async def test_coroutine_hooks(fake):
    seen = asyncio.Event()
    events = []

    async def after(client, event):
        events.append((event.op, event.path, await client.read_file(event.path)))
        seen.set()

    async def before(request):
        return NetworkHookResult(action="block")

    box = (
        Sandbox("alpine")
        .with_vfs_interception(VFSInterceptionConfig(rules=[VFSHookRule(phase="after", dangerous_hook=after)]))
        .with_network_interception(NetworkInterceptionConfig(rules=[NetworkHookRule(phase="before", hook=before)]))
    )
    client = await started(fake, box)
    try:
        await client.write_file("/workspace/x", "data")
        async with asyncio.timeout(WAIT):
            await seen.wait()
        call = {"callback_id": "network_hook_1", "phase": "before"}
        assert json.loads((await client.exec("hook " + json.dumps(call))).stdout) == {"action": "block"}
    finally:
        await client.close()
    assert events == [("write", "/workspace/x", b"data")]
