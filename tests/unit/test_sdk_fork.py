"""`fork` when one clone fails while another is up, in both clients: the clone made is closed and removed,
the temporary snapshot is removed, the failure is raised, and the parent keeps working.

What is faked, and why: `matchlock` is the scripted stand-in (sdk_fake_server.py), and one clone's failure
is its server exiting at once: a wrapper lets the first two `rpc` servers start (the parent's, then one
clone's) and ends every later one, as a clone whose server cannot start. The clones are identical creates
from one snapshot, made in parallel, so no input fails just one of them. The same path with real VMs is
tests/vm/test_sdk_async.py::test_a_fork_that_fails_midway_leaves_no_clone.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from sdk_fake_server import FakeBinary

from matchlock import AsyncClient, Client, Config, MatchlockError, Sandbox, VFSHookRule, VFSInterceptionConfig

LOST = "not running|closed unexpectedly"  # how a clone whose server died fails, depending on when it died


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeBinary:
    return FakeBinary(tmp_path, monkeypatch)


@pytest.fixture
def config(fake: FakeBinary, tmp_path: Path) -> Config:
    """The stand-in behind a wrapper whose third and later `rpc` servers exit at once (mkdir claims a slot)."""
    wrapper = tmp_path / "two-servers-only"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = rpc ]; then\n'
        "  n=1\n"
        f'  while ! mkdir "{tmp_path}/rpc-$n" 2>/dev/null; do n=$((n + 1)); done\n'
        '  [ "$n" -le 2 ] || exit 3\n'
        "fi\n"
        f'exec "{fake.path}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return Config(binary_path=str(wrapper))


def _cleaned_up(fake: FakeBinary) -> None:
    """The clone made was closed and removed, and so was the fork's snapshot; nothing else was."""
    made = [e for e in fake.entries("create") if e["params"].get("from_snapshot")]
    assert len(made) == 1  # the failed clone's server never read its create
    assert len(fake.entries("close")) == 1  # the clone made (the parent is still open)
    assert [e for e in fake.entries() if "argv" in e] == [{"argv": ["rm", "vm-fake0001"]}]
    [snapshot] = fake.entries("snapshot")
    assert [e["params"] for e in fake.entries("snapshot_remove")] == [{"names": [snapshot["params"]["name"]]}]
    assert made[0]["params"]["from_snapshot"] == snapshot["params"]["name"]


def test_sync_fork_discards_the_clone_made_when_another_fails(fake, config):
    with Client(config) as parent:
        parent.create(Sandbox("alpine").options())
        with pytest.raises(MatchlockError, match=LOST):
            parent.fork(2)
        _cleaned_up(fake)
        assert parent.exec("echo still here").stdout == "still here\n"


async def test_async_fork_discards_the_clone_made_when_another_fails(fake, config):
    async with AsyncClient(config) as parent:
        await parent.create(Sandbox("alpine").options())
        with pytest.raises(MatchlockError, match=LOST):
            await parent.fork(2)
        _cleaned_up(fake)
        assert (await parent.exec("echo still here")).stdout == "still here\n"


def _stamping_box() -> Sandbox:
    rule = VFSHookRule(name="stamp", phase="before", ops=["write"], path="/w/*", mutate_hook=lambda r: b"stamped")
    return Sandbox("alpine").with_vfs_interception(VFSInterceptionConfig(rules=[rule]))


def _written(fake: FakeBinary) -> list[bytes]:
    return [base64.b64decode(e["params"]["content"]) for e in fake.entries("write_file")]


def test_sync_forks_run_the_parents_sdk_vfs_hooks_and_carry_them_on(fake):
    with Client(Config(binary_path=str(fake.path))) as parent:
        parent.create(_stamping_box().options())
        (clone,) = parent.fork(1)
        clone.write_file("/w/a", b"original")
        (grandchild,) = clone.fork(1)
        grandchild.write_file("/w/b", b"original")
        for each in (clone, grandchild):
            each.close()
    assert _written(fake) == [b"stamped", b"stamped"]


async def test_async_forks_run_the_parents_sdk_vfs_hooks(fake):
    async with AsyncClient(Config(binary_path=str(fake.path))) as parent:
        await parent.create(_stamping_box().options())
        (clone,) = await parent.fork(1)
        await clone.write_file("/w/a", b"original")
        await clone.close()
    assert _written(fake) == [b"stamped"]
