"""`create` params into the sandbox config types; every bad field is -32602 naming it."""

from __future__ import annotations

import pytest

from matchlock.api.config import DEFAULT_CPUS, DEFAULT_DISK_SIZE_MB, DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_SECONDS
from matchlock.api.network import DEFAULT_MTU
from matchlock.jsonrpc import INVALID_PARAMS
from matchlock.rpc.params import Fields, RpcError, parse_create


def test_minimal_create_uses_upstream_defaults() -> None:
    parsed = parse_create({"image": "alpine:latest"})
    config = parsed.config
    assert config.image == "alpine:latest" and not config.privileged
    assert (config.resources.cpus, config.resources.memory_mb) == (DEFAULT_CPUS, DEFAULT_MEMORY_MB)
    assert (config.resources.disk_size_mb, config.resources.timeout_seconds) == (
        DEFAULT_DISK_SIZE_MB,
        DEFAULT_TIMEOUT_SECONDS,
    )
    assert config.network.block_private_ips and config.network.mtu == DEFAULT_MTU
    assert config.image_config.entrypoint is None and config.image_config.cmd is None
    assert parsed.kernel_path == "" and not parsed.launch_entrypoint


def test_full_sdk_create() -> None:
    """Everything the Python SDK 0.2.17 can send (sdk-wire.md §3), except vfs."""
    params = {
        "image": "python:3.12-alpine",
        "kernel": {"ref": "file:///opt/kernels/vmlinux"},
        "privileged": True,
        "resources": {"cpus": 1, "memory_mb": 256, "disk_size_mb": 1024, "timeout_seconds": 60},
        "network": {
            "allowed_hosts": ["api.example.com", "*.cdn.example.com"],
            "block_private_ips": False,
            "add_hosts": [{"host": "db.internal", "ip": "10.0.0.5"}],
            "intercept": True,
            "interception": {
                "rules": [
                    {"action": "block", "name": "r1", "phase": "before", "hosts": ["evil.example.com"]},
                    {
                        "action": "allow",
                        "phase": "after",
                        "callback_id": "network_hook_2",
                        "timeout_ms": 500,
                        "body_replacements": [{"find": "a", "replace": "b"}],
                    },
                ],
                "callback_socket": "/tmp/matchlock-network-hook-x/hook.sock",
            },
            "secrets": {"API_KEY": {"value": "s3cret", "hosts": ["api.example.com"], "placeholder": "PH_1"}},
            "dns_servers": ["1.1.1.1"],
            "hostname": "box",
            "mtu": 1400,
        },
        "env": {"A": "1"},
        "image_config": {
            "user": "nobody",
            "working_dir": "/work",
            "entrypoint": ["python"],
            "cmd": ["-V"],
            "env": {"B": "2"},
        },
        "launch_entrypoint": True,
        "some_future_field": {"ignored": True},
    }
    parsed = parse_create(params)
    config, network = parsed.config, parsed.config.network
    assert parsed.kernel_path == "/opt/kernels/vmlinux" and parsed.launch_entrypoint
    assert config.privileged and config.resources.memory_mb == 256 and config.resources.timeout_seconds == 60
    assert network.allowed_hosts == ("api.example.com", "*.cdn.example.com") and not network.block_private_ips
    assert [(m.host, m.ip) for m in network.add_hosts] == [("db.internal", "10.0.0.5")]
    assert network.intercept and network.hostname == "box" and network.mtu == 1400
    assert network.dns_servers == ("1.1.1.1",)
    secret = network.secrets["API_KEY"]
    assert (secret.value, secret.hosts, secret.placeholder) == ("s3cret", ("api.example.com",), "PH_1")
    assert network.interception is not None
    assert network.interception.callback_socket == "/tmp/matchlock-network-hook-x/hook.sock"
    first, second = network.interception.rules
    assert (first.action, first.hosts) == ("block", ("evil.example.com",))
    assert (second.phase, second.callback_id, second.timeout_ms) == ("after", "network_hook_2", 500)
    assert config.env == {"A": "1"}
    image_config = config.image_config
    assert (image_config.user, image_config.working_dir) == ("nobody", "/work")
    assert (image_config.entrypoint, image_config.cmd, image_config.env) == (("python",), ("-V",), {"B": "2"})


def test_kernel_ref_is_a_file_or_an_oci_reference() -> None:
    oci = parse_create({"image": "a", "kernel": {"ref": "ghcr.io/jingkaihe/matchlock/kernel:6.1.137"}})
    assert (oci.kernel_path, oci.kernel_image) == ("", "ghcr.io/jingkaihe/matchlock/kernel:6.1.137")
    local = parse_create({"image": "a", "kernel": {"ref": "localhost:5000/matchlock/kernel:test"}})
    assert local.kernel_image == "localhost:5000/matchlock/kernel:test"
    assert parse_create({"image": "a", "kernel": {"ref": ""}}).kernel_image == ""


def test_no_network_shape() -> None:
    network = parse_create({"image": "a", "network": {"no_network": True, "dns_servers": ["8.8.8.8"]}}).config.network
    assert network.no_network and network.dns_servers == ("8.8.8.8",)


def test_zero_resources_keep_defaults() -> None:
    resources = parse_create({"image": "a", "resources": {"cpus": 0, "memory_mb": 0}}).config.resources
    assert (resources.cpus, resources.memory_mb) == (DEFAULT_CPUS, DEFAULT_MEMORY_MB)


def test_integral_float_is_an_integer() -> None:
    assert parse_create({"image": "a", "resources": {"memory_mb": 256.0}}).config.resources.memory_mb == 256


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({}, "image is required"),
        ({"image": ""}, "image is required"),
        ({"image": 5}, "image must be a string"),
        ({"image": "a", "id": "vm-1"}, "id is internal-only"),
        ({"image": "a", "vfs": {"workspace": "/w"}}, "vfs workspace /w has no mounts"),
        ({"image": "a", "vfs": {"mounts": {"/w": {"type": "nfs"}}}}, "type 'nfs' is not one of"),
        (
            {"image": "a", "vfs": {"mounts": {"/w": {"type": "memory", "owner_uid": 5}}}},
            "owner_uid/owner_gid are only supported for host_fs mounts",
        ),
        (
            {"image": "a", "vfs": {"mounts": {"/w": {"type": "host_fs", "host_path": "/nonexistent-x"}}}},
            "/nonexistent-x does not exist",
        ),
        ({"image": "a", "vfs": {"mounts": {"/proc/x": {"type": "memory"}}}}, "/proc is the guest's"),
        ({"image": "a", "vfs": {"mounts": {"/w": {"type": "overlay", "upper": {}}}}}, "vfs.mounts./w.upper"),
        ({"image": "a", "vfs": {"interception": {"emit_events": True}}}, "vfs interception needs at least one mount"),
        ({"image": "a", "extra_disks": {}}, "extra_disks must be an array of objects"),
        ({"image": "a", "extra_disks": [{"guest_mount": "/d"}]}, "extra_disks[0].host_path is required"),
        ({"image": "a", "extra_disks": [{"host_path": "@v", "guest_mount": "/proc/x"}]}, "/proc is the guest's"),
        ({"image": "a", "privileged": "yes"}, "privileged must be true or false"),
        ({"image": "a", "launch_entrypoint": 1}, "launch_entrypoint must be true or false"),
        ({"image": "a", "kernel": "x"}, "kernel must be an object"),
        ({"image": "a", "kernel": {"ref": 3}}, "kernel.ref must be a string"),
        ({"image": "a", "kernel": {"ref": "file://relative/vmlinux"}}, "kernel.ref"),
        ({"image": "a", "kernel": {"ref": "ghcr.io/X/Kernel:1"}}, "kernel.ref is neither file:///absolute/path"),
        ({"image": "a", "resources": []}, "resources must be an object"),
        ({"image": "a", "resources": {"cpus": "2"}}, "resources.cpus must be a number"),
        ({"image": "a", "resources": {"memory_mb": 1.5}}, "resources.memory_mb must be an integer"),
        ({"image": "a", "resources": {"memory_mb": -5}}, "resources.memory_mb must not be negative"),
        ({"image": "a", "resources": {"disk_size_mb": True}}, "resources.disk_size_mb must be an integer"),
        ({"image": "a", "resources": {"memory_mb": 1}}, "resources"),
        ({"image": "a", "env": {"A": 1}}, "env.A must be a string"),
        ({"image": "a", "env": {"1BAD": "x"}}, "1BAD"),
        ({"image": "a", "env": []}, "env must be an object"),
        ({"image": "a", "image_config": {"user": 0}}, "image_config.user must be a string"),
        ({"image": "a", "image_config": {"cmd": "ls"}}, "image_config.cmd must be an array"),
        ({"image": "a", "image_config": {"entrypoint": [1]}}, "image_config.entrypoint[0] must be a string"),
        ({"image": "a", "network": True}, "network must be an object"),
        ({"image": "a", "network": {"allowed_hosts": "x"}}, "network.allowed_hosts must be an array"),
        ({"image": "a", "network": {"allowed_hosts": ["a b"]}}, "network.allowed_hosts"),
        ({"image": "a", "network": {"block_private_ips": "no"}}, "network.block_private_ips must be true"),
        ({"image": "a", "network": {"add_hosts": [{"host": "h"}]}}, "network.add_hosts[0].ip is required"),
        ({"image": "a", "network": {"add_hosts": [{"host": "h", "ip": "x"}]}}, "network.add_hosts[0]"),
        ({"image": "a", "network": {"add_hosts": ["h:1.2.3.4"]}}, "network.add_hosts[0] must be an object"),
        ({"image": "a", "network": {"secrets": {"K": "v"}}}, "network.secrets.K must be an object"),
        ({"image": "a", "network": {"secrets": {"K": {"hosts": []}}}}, "network.secrets.K.value is required"),
        ({"image": "a", "network": {"secrets": {"K": {"value": "v", "hosts": [1]}}}}, "network.secrets.K.hosts[0]"),
        ({"image": "a", "network": {"mtu": "1500"}}, "network.mtu must be an integer"),
        ({"image": "a", "network": {"mtu": 100}}, "mtu"),
        ({"image": "a", "network": {"dns_servers": ["nope"]}}, "nope"),
        ({"image": "a", "network": {"hostname": 7}}, "network.hostname must be a string"),
        ({"image": "a", "network": {"no_network": True, "allowed_hosts": ["x.com"]}}, "no-network"),
        ({"image": "a", "network": {"interception": {"rules": {}}}}, "network.interception.rules must be an array"),
        (
            {"image": "a", "network": {"interception": {"rules": [{"action": "explode"}]}}},
            "network.interception.rules[0]",
        ),
        (
            {"image": "a", "network": {"interception": {"rules": [{"callback_id": "network_hook_1"}]}}},
            "network.interception.rules[0].callback_id",
        ),
        (
            {"image": "a", "network": {"interception": {"callback_socket": "rel/hook.sock"}}},
            "network.interception.callback_socket must be an absolute path",
        ),
    ],
)
def test_bad_fields_are_named(params: dict, fragment: str) -> None:
    with pytest.raises(RpcError) as caught:
        parse_create(params)
    assert caught.value.code == INVALID_PARAMS
    assert fragment in caught.value.message


def test_fields_helpers() -> None:
    fields = Fields({"n": 3, "s": "x", "l": ["a"], "m": {"k": "v"}, "o": [{"a": 1}]}, "p.")
    assert fields.integer("n", lo=1, hi=5) == 3 and fields.integer("missing", default=9) == 9
    assert fields.string("s") == "x" and fields.strings("l") == ("a",) and fields.string_map("m") == {"k": "v"}
    assert fields.objects("o")[0].name("a") == "p.o[0].a"
    with pytest.raises(RpcError, match=r"p\.n must be between 4 and 5, got 3"):
        fields.integer("n", lo=4, hi=5)
    with pytest.raises(RpcError, match=r"p\.missing is required"):
        fields.integer("missing", required=True)
    with pytest.raises(RpcError, match=r"p\.s is longer than 0"):
        fields.string("s", max_len=0)
