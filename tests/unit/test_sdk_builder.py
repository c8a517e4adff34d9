"""Builder chains -> the exact requests `create` sends, compared with what the published SDK 0.2.17 sends.

EXPECTED was recorded by running each chain through the published SDK (`pip install matchlock==0.2.17`
in a throwaway venv, with its transport replaced by a recorder) and is pasted here, so this test needs
no network and no second SDK.
"""

from __future__ import annotations

import pytest

import matchlock.sdk.client as client_module
from matchlock import (
    Client,
    CreateOptions,
    ImageConfig,
    MatchlockError,
    MountConfig,
    NetworkBodyTransform,
    NetworkHookRule,
    NetworkInterceptionConfig,
    Sandbox,
    VFSHookRule,
    VFSInterceptionConfig,
)


def hook(*args):
    return None


CHAINS = {
    "minimal": lambda: Sandbox("alpine:latest"),
    "machine": lambda: (
        Sandbox("python:3.12-alpine")
        .with_kernel("file:///k/vmlinux")
        .with_privileged()
        .with_cpus(1.5)
        .with_memory(256)
        .with_disk_size(2048)
        .with_timeout(60)
        .with_env("A", "1")
        .with_env_map({"B": "2"})
        .with_user("1000:1000")
        .with_entrypoint("sh", "-c")
        .with_image_config(ImageConfig(working_dir="/srv", cmd=["echo", "hi"], env={"C": "3"}))
    ),
    "network": lambda: (
        Sandbox("alpine")
        .allow_host("a.example.com", "*.b.example.com")
        .add_host("db", "192.0.2.7")
        .add_secret("KEY", "s3cret", "a.example.com")
        .add_secret_with_placeholder("TOK", "v", "PH_TOK", "x.example.com")
        .with_dns_servers("192.0.2.53")
        .with_hostname("box")
        .with_network_mtu(1400)
    ),
    "no_network": lambda: (
        Sandbox("alpine")
        .with_no_network()
        .with_dns_servers("192.0.2.53")
        .with_hostname("h")
        .add_host("db", "192.0.2.7")
    ),
    "allow_private": lambda: Sandbox("alpine").allow_private_ips(),
    "block_private": lambda: Sandbox("alpine").block_private_ips(),
    "unset_private": lambda: Sandbox("alpine").allow_private_ips().unset_block_private_ips(),
    "mtu_only": lambda: Sandbox("alpine").with_network_mtu(1300),
    "intercept": lambda: Sandbox("alpine").with_network_interception(),
    "intercept_rules": lambda: (
        Sandbox("alpine")
        .allow_host("api.example.com")
        .with_network_interception(
            NetworkInterceptionConfig(
                rules=[
                    NetworkHookRule(
                        name="strip",
                        phase="before",
                        hosts=["api.example.com"],
                        methods=["GET"],
                        path="/v1/*",
                        action="mutate",
                        set_headers={"X-A": "1"},
                        delete_headers=["Cookie"],
                        set_query={"q": "1"},
                        delete_query=["t"],
                        rewrite_path="/v2/x",
                        timeout_ms=500,
                    ),
                    NetworkHookRule(name="cb", phase="after", hook=hook, timeout_ms=250),
                    NetworkHookRule(
                        phase="after",
                        set_response_headers={"X-R": "r"},
                        delete_response_headers=["Server"],
                        body_replacements=[NetworkBodyTransform("a", "b"), NetworkBodyTransform("c")],
                        action="allow",
                    ),
                    NetworkHookRule(name="cb2", hook=hook),
                    NetworkHookRule(action="block", hosts=["evil.example.com"]),
                ]
            )
        )
    ),
    "mounts": lambda: (
        Sandbox("alpine")
        .with_workspace("/workspace")
        .mount_host_dir("/workspace", "/tmp/ws")
        .mount_host_dir_readonly("/data", "/tmp/data", owner_uid=1000, owner_gid=0)
        .mount_memory("/scratch")
        .mount_overlay("/ovl", "/tmp/ovl")
        .mount("/m", MountConfig(type="host_fs", host_path="/tmp/m", owner_uid=0))
    ),
    "vfs_rules": lambda: Sandbox("alpine").with_vfs_interception(
        VFSInterceptionConfig(
            rules=[
                VFSHookRule(
                    name="deny", phase="before", ops=["write", "create"], path="/workspace/secret*", action="block"
                ),
                VFSHookRule(name="after", phase="after", ops=["write"], path="/workspace/*", hook=hook),
                VFSHookRule(name="mut", phase="before", path="/workspace/*.txt", mutate_hook=hook),
                VFSHookRule(name="act", action_hook=hook),
                VFSHookRule(name="odd", action="exec_after", timeout_ms=10),
            ]
        )
    ),
    "vfs_local_only": lambda: Sandbox("alpine").with_vfs_interception(
        VFSInterceptionConfig(rules=[VFSHookRule(name="mut", mutate_hook=hook)])
    ),
    "vfs_emit": lambda: Sandbox("alpine").with_vfs_interception(VFSInterceptionConfig(emit_events=True)),
    "vfs_dangerous": lambda: Sandbox("alpine").with_vfs_interception(
        VFSInterceptionConfig(rules=[VFSHookRule(phase="after", dangerous_hook=hook)])
    ),
    "port_forwards": lambda: (
        Sandbox("alpine")
        .with_port_forward(8080, 80)
        .with_port_forward(0, 443)
        .with_port_forward_addresses("127.0.0.1", "::1")
    ),
    "port_forward_default_addr": lambda: Sandbox("alpine").with_port_forward(9000, 9000),
}


EXPECTED = {
    "allow_private": [("create", {"image": "alpine", "network": {"allowed_hosts": [], "block_private_ips": False}})],
    "block_private": [("create", {"image": "alpine", "network": {"allowed_hosts": [], "block_private_ips": True}})],
    "intercept": [
        ("create", {"image": "alpine", "network": {"allowed_hosts": [], "block_private_ips": True, "intercept": True}})
    ],
    "intercept_rules": [
        (
            "create",
            {
                "image": "alpine",
                "network": {
                    "allowed_hosts": ["api.example.com"],
                    "block_private_ips": True,
                    "intercept": True,
                    "interception": {
                        "callback_socket": "/tmp/hook.sock",
                        "rules": [
                            {
                                "action": "mutate",
                                "delete_headers": ["Cookie"],
                                "delete_query": ["t"],
                                "hosts": ["api.example.com"],
                                "methods": ["GET"],
                                "name": "strip",
                                "path": "/v1/*",
                                "phase": "before",
                                "rewrite_path": "/v2/x",
                                "set_headers": {"X-A": "1"},
                                "set_query": {"q": "1"},
                                "timeout_ms": 500,
                            },
                            {
                                "action": "allow",
                                "callback_id": "network_hook_2",
                                "name": "cb",
                                "phase": "after",
                                "timeout_ms": 250,
                            },
                            {
                                "action": "allow",
                                "body_replacements": [{"find": "a", "replace": "b"}, {"find": "c"}],
                                "delete_response_headers": ["Server"],
                                "phase": "after",
                                "set_response_headers": {"X-R": "r"},
                            },
                            {"action": "allow", "callback_id": "network_hook_4", "name": "cb2"},
                            {"action": "block", "hosts": ["evil.example.com"]},
                        ],
                    },
                },
            },
        )
    ],
    "launch": [("create", {"image": "alpine", "image_config": {"entrypoint": ["httpd"]}, "launch_entrypoint": True})],
    "legacy_block": [("create", {"image": "alpine", "network": {"allowed_hosts": [], "block_private_ips": True}})],
    "machine": [
        (
            "create",
            {
                "env": {"A": "1", "B": "2"},
                "image": "python:3.12-alpine",
                "image_config": {
                    "cmd": ["echo", "hi"],
                    "entrypoint": ["sh", "-c"],
                    "env": {"C": "3"},
                    "user": "1000:1000",
                    "working_dir": "/srv",
                },
                "kernel": {"ref": "file:///k/vmlinux"},
                "privileged": True,
                "resources": {"cpus": 1.5, "disk_size_mb": 2048, "memory_mb": 256, "timeout_seconds": 60},
            },
        )
    ],
    "minimal": [("create", {"image": "alpine:latest"})],
    "mounts": [
        (
            "create",
            {
                "image": "alpine",
                "vfs": {
                    "mounts": {
                        "/data": {
                            "host_path": "/tmp/data",
                            "owner_gid": 0,
                            "owner_uid": 1000,
                            "readonly": True,
                            "type": "host_fs",
                        },
                        "/m": {"host_path": "/tmp/m", "owner_uid": 0, "type": "host_fs"},
                        "/ovl": {"host_path": "/tmp/ovl", "type": "overlay"},
                        "/scratch": {"type": "memory"},
                        "/workspace": {"host_path": "/tmp/ws", "type": "host_fs"},
                    },
                    "workspace": "/workspace",
                },
            },
        )
    ],
    "mtu_only": [
        ("create", {"image": "alpine", "network": {"allowed_hosts": [], "block_private_ips": True, "mtu": 1300}})
    ],
    "network": [
        (
            "create",
            {
                "image": "alpine",
                "network": {
                    "add_hosts": [{"host": "db", "ip": "192.0.2.7"}],
                    "allowed_hosts": ["a.example.com", "*.b.example.com"],
                    "block_private_ips": True,
                    "dns_servers": ["192.0.2.53"],
                    "hostname": "box",
                    "mtu": 1400,
                    "secrets": {
                        "KEY": {"hosts": ["a.example.com"], "value": "s3cret"},
                        "TOK": {"hosts": ["x.example.com"], "placeholder": "PH_TOK", "value": "v"},
                    },
                },
            },
        )
    ],
    "no_network": [
        ("create", {"image": "alpine", "network": {"dns_servers": ["192.0.2.53"], "hostname": "h", "no_network": True}})
    ],
    "port_forward_default_addr": [
        ("create", {"image": "alpine"}),
        ("port_forward", {"addresses": ["127.0.0.1"], "forwards": [{"local_port": 9000, "remote_port": 9000}]}),
    ],
    "port_forwards": [
        ("create", {"image": "alpine"}),
        (
            "port_forward",
            {
                "addresses": ["127.0.0.1", "::1"],
                "forwards": [{"local_port": 8080, "remote_port": 80}, {"local_port": 0, "remote_port": 443}],
            },
        ),
    ],
    "unset_private": [("create", {"image": "alpine"})],
    "vfs_dangerous": [("create", {"image": "alpine", "vfs": {"interception": {"emit_events": True}}})],
    "vfs_emit": [("create", {"image": "alpine", "vfs": {"interception": {"emit_events": True}}})],
    "vfs_local_only": [("create", {"image": "alpine"})],
    "vfs_rules": [
        (
            "create",
            {
                "image": "alpine",
                "vfs": {
                    "interception": {
                        "emit_events": True,
                        "rules": [
                            {
                                "action": "block",
                                "name": "deny",
                                "ops": ["write", "create"],
                                "path": "/workspace/secret*",
                                "phase": "before",
                            },
                            {"action": "exec_after", "name": "odd", "timeout_ms": 10},
                        ],
                    }
                },
            },
        )
    ],
}


class FakeHookServer:
    socket_path = "/tmp/hook.sock"

    def __init__(self, callbacks) -> None:
        self.callbacks = callbacks

    def stop(self) -> None:
        pass


@pytest.fixture
def recorder(monkeypatch):
    """Client with its transport replaced: returns the list of (method, params) it sends."""
    sent: list[tuple[str, dict]] = []

    def fake_request(self, call, timeout=None):
        sent.append((call.method, call.params))
        if call.method == "create":
            return call.parse({"id": "vm-test"})
        bindings = [
            {"address": a, "local_port": f["local_port"] or 1, "remote_port": f["remote_port"]}
            for a in call.params["addresses"]
            for f in call.params["forwards"]
        ]
        return call.parse({"bindings": bindings})

    monkeypatch.setattr(Client, "_request", fake_request)
    monkeypatch.setattr(client_module, "NetworkHookServer", FakeHookServer)
    return sent


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_create_params_match_the_published_sdk(recorder, name):
    Client().create(CHAINS[name]().options())
    assert recorder == EXPECTED[name]


def test_launch_sets_launch_entrypoint_on_a_copy(recorder):
    box = Sandbox("alpine").with_entrypoint("httpd")
    Client().launch(box)
    assert recorder == EXPECTED["launch"]
    assert box.options().launch_entrypoint is False


def test_legacy_block_private_ips_without_the_set_flag(recorder):
    Client().create(CreateOptions(image="alpine", block_private_ips=True))
    assert recorder == EXPECTED["legacy_block"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (CreateOptions(), "image is required"),
        (CreateOptions(image="a", network_mtu=-1), "network mtu must be > 0"),
        (Sandbox("a").with_no_network().allow_host("x").options(), "no network cannot be combined"),
        (Sandbox("a").with_no_network().add_secret("K", "v", "h").options(), "no network cannot be combined"),
        (Sandbox("a").with_no_network().with_network_interception().options(), "no network cannot be combined"),
    ],
)
def test_create_validation_happens_before_anything_is_sent(recorder, options, message):
    with pytest.raises(MatchlockError, match=message):
        Client().create(options)
    assert recorder == []


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (VFSHookRule(phase="after", hook=hook, mutate_hook=hook), "more than one callback"),
        (VFSHookRule(phase="before", hook=hook), "hook must use phase=after"),
        (VFSHookRule(hook=hook), "hook must use phase=after"),
        (VFSHookRule(phase="after", action="block", hook=hook), "cannot set action='block'"),
        (VFSHookRule(phase="after", mutate_hook=hook), "mutate_hook must use phase=before"),
        (VFSHookRule(phase="after", action_hook=hook), "action_hook must use phase=before"),
        (VFSHookRule(action="mutate_write"), "mutate_write requires mutate_hook"),
    ],
)
def test_invalid_vfs_callback_rules_are_rejected(recorder, rule, message):
    box = Sandbox("a").with_vfs_interception(VFSInterceptionConfig(rules=[rule]))
    with pytest.raises(MatchlockError, match=message):
        Client().create(box.options())
    assert recorder == []


def test_a_network_callback_rule_cannot_block(recorder):
    rules = NetworkInterceptionConfig(rules=[NetworkHookRule(name="x", action="block", hook=hook)])
    with pytest.raises(MatchlockError, match="callback hooks cannot set action='block'"):
        Client().create(Sandbox("a").with_network_interception(rules).options())


@pytest.mark.parametrize("value", [-1, 2**32])
def test_mount_owner_ids_are_range_checked(value):
    with pytest.raises(ValueError, match="owner_uid must be in"):
        MountConfig(type="host_fs", host_path="/x", owner_uid=value)


def test_with_image_config_overlays_only_set_fields():
    box = Sandbox("a").with_user("nobody").with_image_config(ImageConfig(working_dir="/w"))
    assert box.options().image_config == ImageConfig(user="nobody", working_dir="/w")
