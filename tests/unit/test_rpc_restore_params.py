"""`create` with `from_snapshot`, `snapshot_list`, `snapshot_remove` and `fork` over RPC, and the SDK's side
of them, without a VM (tests/vm/test_sdk_snapshots.py boots the real thing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sdk_fake_server import FakeBinary

from matchlock import AsyncClient, Client, Config, RPCError
from matchlock.api.network import SecretConfig
from matchlock.api.secrets import load_secret_file
from matchlock.rpc import fork as rpc_fork
from matchlock.rpc.params import RpcError, parse_create, prepare_restore
from matchlock.sandbox.snapshots import Restore
from matchlock.sdk import calls
from matchlock.sdk.builder import Sandbox
from matchlock.sdk.errors import MatchlockError
from matchlock.sdk.types import PortForward, Secret
from matchlock.state import snapshots as records
from matchlock.state.store import StateStore
from support.rpcwire import RpcProcess

META = {
    "mode": "full",
    "image": "alpine:latest",
    "secrets": {"API_KEY": "SANDBOX_SECRET_ab12"},
    "cpus": 1.0,
    "memory_mb": 512,
    "disk_size_mb": 5120,
    "network": True,
}
SECRETS = {"API_KEY": {"value": "v-123", "hosts": ["api.example.com"]}}


def _parse(params: dict):
    parsed = parse_create(params)
    assert parsed.restore is not None
    return parsed


def _prepare(params: dict, meta: dict | None = None):
    parsed = _parse(params)
    assert parsed.restore is not None
    return prepare_restore(Restore("snap1", Path("/nonexistent"), meta or META), parsed.restore, parsed.config)


def _refused(params: dict, meta: dict | None = None) -> str:
    with pytest.raises(RpcError) as caught:
        _prepare(params, meta)
    assert caught.value.code == -32602
    return caught.value.message


def test_from_snapshot_makes_the_image_optional_and_records_what_must_match() -> None:
    parsed = _parse({"from_snapshot": "snap1", "resources": {"memory_mb": 512, "timeout_seconds": 30}})
    assert parsed.restore is not None
    assert (parsed.restore.name, parsed.restore.image, parsed.restore.resources) == ("snap1", "", {"memory_mb": 512})
    assert parse_create({"image": "alpine"}).restore is None
    with pytest.raises(RpcError, match="image is required"):
        parse_create({"from_snapshot": ""})


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"from_snapshot": "../etc"}, "from_snapshot is invalid: invalid snapshot name '../etc'"),
        ({"from_snapshot": 7}, "from_snapshot must be a string"),
        ({"from_snapshot": "s", "vfs": {"workspace": "/w"}}, "vfs cannot be combined with from_snapshot"),
        (
            {"from_snapshot": "s", "extra_disks": [{"host_path": "@v", "guest_mount": "/d"}]},
            "extra_disks cannot be combined with from_snapshot",
        ),
        ({"from_snapshot": "s", "kernel": {"ref": "file:///k"}}, "kernel.ref cannot be combined with from_snapshot"),
    ],
)
def test_what_a_restore_cannot_take_is_refused_by_name(params: dict, fragment: str) -> None:
    with pytest.raises(RpcError) as caught:
        parse_create(params)
    assert caught.value.code == -32602 and fragment in caught.value.message


def test_a_missing_secret_is_named_with_the_fix() -> None:
    message = _refused({"from_snapshot": "snap1"})
    assert message.startswith("invalid params: network.secrets.API_KEY is missing: ")
    assert "snapshot 'snap1' uses secret(s) API_KEY" in message
    assert "fix: pass network.secrets.API_KEY = {value, hosts} again" in message


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"image": "busybox"}, "image 'busybox' is not the image of snapshot 'snap1', 'alpine:latest'"),
        ({"resources": {"cpus": 2}}, "resources.cpus is 2 but snapshot 'snap1' was taken with 1: "),
        ({"resources": {"memory_mb": 1024}}, "resources.memory_mb is 1024 but snapshot 'snap1' was taken with 512"),
        ({"resources": {"disk_size_mb": 100}}, "omit resources.disk_size_mb"),
    ],
)
def test_a_different_image_or_machine_is_refused(extra: dict, fragment: str) -> None:
    network = {"network": {"secrets": SECRETS}}
    assert fragment in _refused({"from_snapshot": "snap1", **network, **extra})


def test_the_network_interface_must_match_a_full_snapshot() -> None:
    message = _refused({"from_snapshot": "snap1", "network": {"no_network": True}}, {**META, "secrets": {}})
    assert "taken with a network interface" in message and "drop network.no_network" in message
    without = {**META, "secrets": {}, "network": False}
    assert "set network.no_network" in _refused({"from_snapshot": "snap1"}, without)
    _prepare({"from_snapshot": "snap1"}, {**without, "mode": "filesystem"})  # a cold boot: either way


def test_the_cli_gets_the_same_checks_in_its_own_terms(tmp_path: Path) -> None:
    """One check per setting (Restore.prepare), worded by each front end."""
    from matchlock.api.config import SandboxConfig
    from matchlock.api.network import NetworkConfig
    from matchlock.state.snapshots import RestoreMismatch

    restore = Restore("snap1", tmp_path, META)
    with pytest.raises(RestoreMismatch) as caught:
        restore.prepare(SandboxConfig(image="ignored"))
    assert (caught.value.field, caught.value.flag) == ("network.secrets.API_KEY", "--secret API_KEY")
    assert str(caught.value).startswith("--secret API_KEY is missing: snapshot 'snap1' uses secret(s) API_KEY")
    assert str(caught.value).endswith("fix: pass --secret API_KEY=VALUE@HOSTS (values are never stored in a snapshot)")
    secrets = {"API_KEY": SecretConfig(value="v", hosts=("api.example.com",))}
    with pytest.raises(RestoreMismatch, match="^--no-network is set, .*; fix: drop --no-network$"):
        restore.prepare(SandboxConfig(image="x", network=NetworkConfig(no_network=True, secrets=secrets)))
    with pytest.raises(RestoreMismatch, match="^--memory is 1024 but .*; fix: omit --memory$"):
        restore.prepare(SandboxConfig(image="x", network=NetworkConfig(secrets=secrets)), resources={"memory_mb": 1024})
    ruled = Restore("snap1", tmp_path, {**META, "secrets": {}, "config": {"network": {"interception_rules": 2}}})
    with pytest.raises(RestoreMismatch) as rules:
        ruled.prepare(SandboxConfig(image="x"))
    assert rules.value.field == "network.interception" and "taken with 2 network interception rule(s)" in str(
        rules.value
    )
    assert rules.value.explain("rpc").endswith("fix: give the same network.interception again")


def test_a_matching_restore_takes_the_snapshots_image_and_machine(tmp_path: Path) -> None:
    parsed = _parse(
        {"from_snapshot": "snap1", "image": "alpine", "resources": {"cpus": 1}, "network": {"secrets": SECRETS}}
    )
    assert parsed.restore is not None
    config = prepare_restore(
        Restore("snap1", tmp_path, META), parsed.restore, parsed.config
    )  # "alpine" is "alpine:latest"
    assert (config.image, config.resources.memory_mb) == ("alpine:latest", 512)
    assert config.network.secrets["API_KEY"].placeholder == "SANDBOX_SECRET_ab12"  # the guest's processes hold it


# --- the real server, no VM ----------------------------------------------------------------------


def _snapshot(state: Path, name: str, meta: dict, source: str) -> None:
    store = StateStore(state)
    try:
        store.register(source, image=meta["image"], config={})
        directory = records.begin(store, name, source, meta["mode"])
        for filename in ("upper.img", "memory"):
            (directory / filename).write_bytes(b"x")
        records.complete(store, name, meta)
    finally:
        store.close()


@pytest.fixture
def server(tmp_path):
    state = tmp_path / "state"
    _snapshot(state, "snap1", META, "vm-00000001")
    _snapshot(state, "snap2", {**META, "secrets": {}}, "vm-00000002")
    proc = RpcProcess(env={"MATCHLOCK_STATE_DIR": str(state)})
    yield proc
    proc.stop()
    assert proc.bad_lines == []


def test_snapshots_are_listed_and_removed_without_a_vm(server: RpcProcess) -> None:
    listed = server.result("snapshot_list")["snapshots"]
    assert [(s["name"], s["mode"], s["secrets"]) for s in listed] == [
        ("snap1", "full", ["API_KEY"]),
        ("snap2", "full", []),
    ]
    missing = server.error("snapshot_remove", {"names": ["snap2", "nope"]})
    assert missing["code"] == -32602 and "snapshot 'nope' not found" in missing["message"]
    assert [s["name"] for s in server.result("snapshot_list")["snapshots"]] == ["snap1", "snap2"]  # all or nothing
    assert server.error("snapshot_remove", {})["message"].startswith("names is required")
    assert server.result("snapshot_remove", {"names": ["snap2"]}) == {"removed": ["snap2"]}
    assert [s["name"] for s in server.result("snapshot_list")["snapshots"]] == ["snap1"]


def test_create_from_an_unknown_snapshot_or_without_its_secret_fails_before_anything_starts(
    server: RpcProcess,
) -> None:
    unknown = server.error("create", {"from_snapshot": "nope"})
    assert unknown["code"] == -32602
    assert "snapshot 'nope' not found (see `matchlock snapshot ls`)" in unknown["message"]
    assert "snapshot_list" in unknown["message"]
    lacking = server.error("create", {"from_snapshot": "snap1"})
    assert lacking["code"] == -32602 and "uses secret(s) API_KEY" in lacking["message"]
    assert server.error("fork", {"count": 2}) == {"code": -32000, "message": "VM not created"}


def test_launching_the_entrypoint_of_a_full_restore_is_refused(server: RpcProcess) -> None:
    # It runs on in the restored memory: launched again, the clone ran two copies of it.
    launched = server.error("create", {"from_snapshot": "snap2", "launch_entrypoint": True})
    assert launched["code"] == -32602, launched
    assert "launch_entrypoint: snapshot 'snap2' is a full one, whose entrypoint is still running" in launched["message"]


# --- fork's plumbing -----------------------------------------------------------------------------


def test_fork_secrets_reach_the_child_through_a_memfd_and_never_its_command_line() -> None:
    secrets = {"API_KEY": SecretConfig(value="v-123", hosts=("api.example.com",), placeholder="PH")}
    with rpc_fork.secret_file(secrets) as path:
        assert path is not None and path.startswith(f"/proc/{os.getpid()}/fd/")
        assert "memfd:" in os.readlink(path)  # in memory, not on a disk
        argv = rpc_fork.fork_argv("vm-0123abcd", 2, path)
        assert load_secret_file(path) == secrets  # what the owners `fork` starts read
    assert argv[-4:] == ["-n", "2", "--secret-file", path] and not any("v-123" in arg for arg in argv)
    assert not os.path.exists(path)  # closed with the block
    with rpc_fork.secret_file({}) as none:
        assert none is None
    assert "--secret-file" not in rpc_fork.fork_argv("vm-0123abcd", 1, None)


def test_fork_output_yields_only_vm_ids() -> None:
    assert rpc_fork.parse_ids(b"vm-0123abcd\n\nnoise: 12 ms\nvm-89ef4567\n") == ["vm-0123abcd", "vm-89ef4567"]


# --- the SDK's side ------------------------------------------------------------------------------


def test_the_sdk_sends_from_snapshot_and_no_empty_image() -> None:
    opts = Sandbox("").from_snapshot("snap1").add_secret("API_KEY", "v", "api.example.com").options()
    calls.validate_create(opts)
    params = calls.create_params(opts, None, None)
    assert "image" not in params and params["from_snapshot"] == "snap1"
    assert params["network"]["secrets"]["API_KEY"]["value"] == "v"
    with pytest.raises(MatchlockError, match="image is required"):
        calls.validate_create(Sandbox("").options())


def test_fork_plan_keeps_the_parents_policy_and_drops_what_is_its_own() -> None:
    parent = Sandbox("alpine").with_memory(256).allow_host("a.example.com").options()
    parent.secrets.append(Secret(name="K", value="v", hosts=["a.example.com"]))
    parent.port_forwards.append(PortForward(local_port=8080, remote_port=80))
    parent.launch_entrypoint = True
    name, clone = calls.fork_plan(parent, 2)
    assert name.startswith("sdk-fork-") and clone.from_snapshot == name
    assert (clone.image, clone.allowed_hosts, clone.secrets) == ("alpine", ["a.example.com"], parent.secrets)
    assert (clone.memory_mb, clone.port_forwards, clone.launch_entrypoint) == (0, [], False)
    assert parent.memory_mb == 256 and parent.port_forwards and not parent.from_snapshot  # untouched
    with pytest.raises(MatchlockError, match="call create"):
        calls.fork_plan(None, 1)
    with pytest.raises(MatchlockError, match="1 to 16 clones"):
        calls.fork_plan(parent, 17)


def test_snapshot_results_are_checked() -> None:
    assert calls.snapshot_remove_params(("a", "b")) == {"names": ["a", "b"]}
    with pytest.raises(MatchlockError, match="snapshot_remove needs snapshot names"):
        calls.snapshot_remove_params(())
    assert calls.parse_snapshot_list({"snapshots": [{"name": "a"}]}) == [{"name": "a"}]
    with pytest.raises(MatchlockError, match="invalid snapshot_list response"):
        calls.parse_snapshot_list({"snapshots": None})
    with pytest.raises(MatchlockError, match="invalid snapshot_remove response"):
        calls.parse_removed({"removed": [1]})
    with pytest.raises(MatchlockError, match="invalid snapshot response: name"):
        calls.parse_snapshot({})


# --- the SDK clients' fork, against the scripted server ------------------------------------------


def _fork_box(fail: bool = False) -> Sandbox:
    box = Sandbox("alpine").add_secret("API_KEY", "v-123", "api.example.com").with_port_forward(18080, 80)
    return box.with_env("FAIL_CLONE", "1") if fail else box


def test_sync_fork_snapshots_creates_clones_from_it_and_removes_it(tmp_path, monkeypatch) -> None:
    fake = FakeBinary(tmp_path, monkeypatch)
    with Client(Config(binary_path=str(fake.path))) as parent:
        parent.create(_fork_box().options())
        clones = parent.fork(2)
        assert len(clones) == 2 and all(clone.vm_id == "vm-fake0001" for clone in clones)
        for clone in clones:
            clone.close()
    [snapshot] = fake.entries("snapshot")
    name = snapshot["params"]["name"]
    assert snapshot["params"]["mode"] == "full" and name.startswith("sdk-fork-")
    made = [e["params"] for e in fake.entries("create") if e["params"].get("from_snapshot")]
    assert [p["from_snapshot"] for p in made] == [name, name]
    assert all(p["network"]["secrets"]["API_KEY"]["value"] == "v-123" for p in made)  # the parent's, from memory
    assert [e["params"] for e in fake.entries("port_forward")] == [
        {"forwards": [{"local_port": 18080, "remote_port": 80}], "addresses": ["127.0.0.1"]}
    ]  # the parent's only: a clone must not take its ports
    assert [e["params"] for e in fake.entries("snapshot_remove")] == [{"names": [name]}]


async def test_async_fork_failure_closes_the_clones_and_still_removes_the_snapshot(tmp_path, monkeypatch) -> None:
    fake = FakeBinary(tmp_path, monkeypatch)
    async with AsyncClient(Config(binary_path=str(fake.path))) as parent:
        await parent.create(_fork_box(fail=True).options())
        with pytest.raises(RPCError, match="clone refused"):
            await parent.fork(2)
        assert len(fake.entries("snapshot_remove")) == 1
        assert len(fake.entries("close")) == 2  # each failed clone's server was closed
        with pytest.raises(MatchlockError, match="1 to 16 clones"):
            await parent.fork(0)
