"""Snapshots without a VM: records, the paused mark, the wake record, the relay's control frames,
restore preparation and the guest's CA swap (the VM side is tests/vm/test_snapshots.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from matchlock.api.config import SandboxConfig
from matchlock.api.errors import NotFoundError, UsageError
from matchlock.api.network import NetworkConfig, SecretConfig
from matchlock.api.paths import SandboxPaths
from matchlock.guest import checkpoint as guest_checkpoint
from matchlock.sandbox import relay_protocol as rp
from matchlock.sandbox.snapshots import Restore
from matchlock.state import snapshots as records
from matchlock.state.store import StateStore
from matchlock.wire.boot import WAKE_SIZE
from matchlock.wire.checkpoint import WAKE_RECORD_SIZE, decode_wake, encode_wake


@pytest.fixture
def store(tmp_path):
    store = StateStore(tmp_path / "state")
    yield store
    store.close()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- records -----------------------------------------------------------------------------


def test_a_snapshot_is_listed_only_once_complete(store):
    store.register("vm-00000001", image="img", config={})
    directory = records.begin(store, "s1", "vm-00000001", "full")
    (directory / "upper.img").write_bytes(b"x" * 8192)
    assert records.ready(store) == []
    with pytest.raises(NotFoundError, match="'s1' not found"):
        records.require(store, "s1")  # being made: not usable yet
    record = records.complete(store, "s1", {"image": "img", "secrets": {"API_KEY": "PH"}})
    assert [r.name for r in records.ready(store)] == ["s1"]
    assert record.size >= 8192 and record.to_json()["secrets"] == ["API_KEY"]


def test_a_name_clash_and_bad_names_and_modes_are_refused(store):
    records.begin(store, "dup", "vm-00000001", "filesystem")
    with pytest.raises(UsageError, match="'dup' already exists"):
        records.begin(store, "dup", "vm-00000002", "full")
    with pytest.raises(UsageError, match="invalid snapshot name '../x'"):
        records.begin(store, "../x", "vm-00000001", "full")
    with pytest.raises(UsageError, match="invalid snapshot mode 'memory'"):
        records.begin(store, "ok", "vm-00000001", "memory")


def test_remove_deletes_files_and_unknown_names_are_not_found(store):
    directory = records.begin(store, "gone", "vm-00000001", "full")
    records.complete(store, "gone", {})
    records.remove(store, "gone")
    assert not directory.exists() and records.get(store, "gone") is None
    with pytest.raises(NotFoundError, match="'gone' not found"):
        records.remove(store, "gone")


def test_gc_removes_snapshots_whose_maker_died_and_keeps_ones_in_progress(store):
    store.register("vm-dead0001", image="img", config={}, pid=_dead_pid())
    store.register("vm-live0001", image="img", config={})
    abandoned = records.begin(store, "abandoned", "vm-dead0001", "full")
    records.begin(store, "in-progress", "vm-live0001", "full")
    stray = records.snapshots_dir(store) / "stray"
    stray.mkdir()
    assert sorted(records.remove_abandoned(store)) == ["abandoned", "stray"]
    assert not abandoned.exists() and not stray.exists()
    assert [r.name for r in records.partial(store)] == ["in-progress"]


def test_paused_is_shown_only_while_the_owner_runs(store):
    store.register("vm-00000001", image="img", config={})
    records.set_paused(store, "vm-00000001", True)
    vm = store.require("vm-00000001")
    assert vm.shown_status == "paused" and vm.to_json()["paused"] is True
    store.set_status("vm-00000001", "stopped", pid=0)
    assert store.require("vm-00000001").shown_status == "stopped"


# --- the wake record and the parked guest's read --------------------------------------------


def test_wake_record_round_trip_and_rejects():
    seed = os.urandom(WAKE_SIZE)
    assert decode_wake(encode_wake(new_host=True, time_ns=123, seed=seed)) == (True, 123, seed)
    assert decode_wake(encode_wake(new_host=False, time_ns=5, seed=seed))[0] is False
    with pytest.raises(ValueError, match="not a wake record"):
        decode_wake(b"X" * WAKE_RECORD_SIZE)
    with pytest.raises(ValueError, match="bytes"):
        decode_wake(b"short")


def test_the_parked_guest_reads_frames_before_the_record_and_nothing_after():
    record = encode_wake(new_host=False, time_ns=1, seed=bytes(WAKE_SIZE))
    late_frame, after = b"\x00\x00\x00\x00\x07\x00\x00\x00\x01", b"next frames"
    read_end, write_end = os.pipe()
    os.write(write_end, late_frame + record + after)
    try:
        before, got = guest_checkpoint.read_wake(read_end)
        assert (before, got) == (late_frame, record)
        assert os.read(read_end, 100) == after  # left for the channel
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_host_that_leaves_while_the_guest_is_parked_is_an_error():
    read_end, write_end = os.pipe()
    os.close(write_end)
    with pytest.raises(ConnectionError):
        guest_checkpoint.read_wake(read_end)
    os.close(read_end)


def test_replace_ca_swaps_the_pem_in_the_bundle(tmp_path):
    from matchlock.guest.etcfiles import EtcFiles

    ca = tmp_path / "matchlock-ca.crt"
    bundle = tmp_path / "bundle.crt"
    ca.write_text("OLD-CA\n")
    bundle.write_text("SYSTEM-ROOTS\n\nOLD-CA\n")
    etc = EtcFiles((), ca_paths=(str(ca), str(tmp_path / "fallback.crt")))
    assert guest_checkpoint.replace_ca("NEW-CA\n", etc, (str(bundle),)) == str(bundle)
    assert ca.read_text() == "NEW-CA\n"
    assert bundle.read_text() == "SYSTEM-ROOTS\n\nNEW-CA\n"


# --- relay control frames -----------------------------------------------------------------


def test_control_frames_round_trip_and_bad_ones_are_refused():
    frames = rp.Decoder(rp.REQUEST_TYPES).feed(rp.ControlAction("snapshot", "s1", "full").encode())
    assert rp.parse_action(*frames[0]) == rp.ControlAction("snapshot", "s1", "full")
    with pytest.raises(rp.RelayProtocolError, match="unknown control action 'reboot'"):
        rp.ControlAction.parse(b'{"action": "reboot"}')
    with pytest.raises(rp.RelayProtocolError, match="short strings"):
        rp.ControlAction.parse(b'{"action": "snapshot", "name": 5}')
    reply = rp.ReplyReader().feed(rp.ControlReply({"name": "s1"}).encode())
    assert reply == [rp.ControlReply({"name": "s1"}, "")]
    assert rp.ReplyReader().feed(rp.ControlReply(error="no").encode()) == [rp.ControlReply(None, "no")]


# --- restore preparation -------------------------------------------------------------------


def _restore(tmp_path, **meta) -> Restore:
    base = {"mode": "full", "image": "snap/image:1", "cpus": 2.0, "memory_mb": 384, "disk_size_mb": 256,
            "network": True, "secrets": {"API_KEY": "PLACEHOLDER_1"}}  # fmt: skip
    return Restore("s1", tmp_path, {**base, **meta})


def _config(**secrets: SecretConfig) -> SandboxConfig:
    return SandboxConfig(image="ignored", network=NetworkConfig(secrets=secrets))


def test_a_restore_without_the_snapshots_secret_fails_naming_it(tmp_path):
    with pytest.raises(UsageError, match=r"uses secret\(s\) API_KEY.*--secret API_KEY=VALUE@HOSTS"):
        _restore(tmp_path).prepare(_config())


def test_a_restore_takes_the_snapshots_shape_and_placeholders(tmp_path):
    config = _config(API_KEY=SecretConfig(value="v", hosts=("example.com",)))
    prepared = _restore(tmp_path).prepare(config)
    assert prepared.image == "snap/image:1"
    assert (prepared.resources.cpus, prepared.resources.memory_mb, prepared.resources.disk_size_mb) == (2.0, 384, 256)
    assert prepared.network.secrets["API_KEY"].placeholder == "PLACEHOLDER_1"  # running processes hold it
    assert prepared.network.secrets["API_KEY"].value == "v"


def test_a_full_restore_needs_the_same_network_device(tmp_path):
    config = SandboxConfig(image="x", network=NetworkConfig(no_network=True))
    with pytest.raises(UsageError, match="with a network interface"):
        _restore(tmp_path, secrets={}).prepare(config)


def test_a_restore_keeps_the_sources_live_allow_list_and_adds_its_own(tmp_path):
    source = {"network": {"allowed_hosts": ["api.example.com"], "intercept": False, "block_private_ips": True,
                          "add_hosts": [{"host": "db.internal", "ip": "192.0.2.7"}], "dns_servers": ["192.0.2.53"]}}  # fmt: skip
    restore = _restore(tmp_path, secrets={}, config=source, allowed_hosts=["api.example.com", "added.example.com"])
    prepared = restore.prepare(SandboxConfig(image="x", network=NetworkConfig(allowed_hosts=("mine.example.com",))))
    # An empty allow-list with interception on would let every host through: the clone must not widen it.
    assert prepared.network.allowed_hosts == ("api.example.com", "added.example.com", "mine.example.com")
    assert [(m.host, m.ip) for m in prepared.network.add_hosts] == [("db.internal", "192.0.2.7")]
    assert prepared.network.dns_servers == ("192.0.2.53",)
    bare = restore.prepare(SandboxConfig(image="x"))
    assert bare.network.allowed_hosts == ("api.example.com", "added.example.com") and bare.network.intercepting


def test_a_restore_of_a_sandbox_with_interception_rules_needs_them_again(tmp_path):
    from matchlock.api.network import InterceptionConfig

    restore = _restore(tmp_path, secrets={}, config={"network": {"interception_rules": 2}})
    with pytest.raises(UsageError, match=r"2 network interception rule\(s\).*same `network.interception`"):
        restore.prepare(SandboxConfig(image="x"))
    given = SandboxConfig(image="x", network=NetworkConfig(interception=InterceptionConfig()))
    assert restore.prepare(given).network.interception == InterceptionConfig()


def test_a_filesystem_restore_without_a_network_drops_the_policy(tmp_path):
    source = {"network": {"allowed_hosts": ["api.example.com"], "intercept": True}}
    restore = _restore(tmp_path, mode="filesystem", secrets={}, config=source, allowed_hosts=["api.example.com"])
    prepared = restore.prepare(SandboxConfig(image="x", network=NetworkConfig(no_network=True)))
    assert prepared.network.allowed_hosts == () and not prepared.network.intercepting


# --- CLI validation before any sandbox is asked -----------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["snapshot", "create", "vm-00000000", "--mode", "bogus"], "invalid snapshot mode 'bogus'"),
        (["snapshot", "create", "vm-00000000", "--name", "a/b"], "invalid snapshot name 'a/b'"),
        (["fork", "vm-00000000", "-n", "0"], "invalid -n 0"),
        (["run", "--from-snapshot", "nope", "--", "true"], "snapshot 'nope' not found"),
        (["snapshot", "rm", "nope"], "snapshot 'nope' not found"),
        (["pause", "vm-00000000"], "vm-00000000 not found"),
    ],
)
def test_bad_snapshot_input_fails_in_one_line(args, needle, state_dir):
    result = subprocess.run([sys.executable, "-m", "matchlock", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr and needle in result.stderr, result


def test_sandboxes_share_their_ram_and_clones_map_the_snapshots_copy_on_write(tmp_path):
    from pathlib import Path

    from matchlock.vm.accel import AccelChoice
    from matchlock.vm.machine import Disk, MachineSpec, build_argv
    from matchlock.wire import boot

    spec = MachineSpec(
        name="vm-1", kernel=Path("/k"), kernel_args=(), console_log=tmp_path / "log",
        accel=AccelChoice("tcg", "test"), memory_mb=384,
        disks=(Disk(Path("/r"), boot.RUNTIME_DISK_SERIAL), Disk(Path("/l"), boot.LOWER_DISK_SERIAL),
               Disk(tmp_path / "upper", boot.UPPER_DISK_SERIAL)),
    )  # fmt: skip
    source = " ".join(build_argv(spec, 3, 4))
    assert "memory-backend-memfd,id=ram,size=384M,share=on" in source and "memory-backend=ram" in source
    assert "x-ignore-shared" not in source
    for name in ("kernel", "runtime.img", "lower.img", "memory", "ram"):
        (tmp_path / name).touch()
    meta = {"mode": "full", "kernel_args": [], "acpi": False, "tsc_khz": None, "cpus": 1.0, "memory_mb": 384,
            "files": {"kernel": "/k", "initrd": "", "runtime": "/r", "lower": "/l"}}  # fmt: skip
    own = SandboxPaths(tmp_path / "vm-2")
    own.root.mkdir()
    clone = " ".join(build_argv(Restore("s1", tmp_path, meta).machine_spec(spec, own), 3, 4))
    assert f"memory-backend-file,id=ram,size=384M,mem-path={tmp_path / 'ram'},share=off" in clone
    assert "-incoming defer" in clone  # the machine sets x-ignore-shared, then loads the device state
    # The clone boots its own link to the kernel, which outlives the snapshot (fork removes its own at once).
    assert f"-kernel {own.restored_boot_file('kernel')}" in clone
    assert own.restored_boot_file("kernel").samefile(tmp_path / "kernel")


def _ready_snapshot(state_dir, name: str = "s1", **meta) -> None:
    """A complete full snapshot record with the files `Restore.load` looks for (nothing can boot from it)."""
    from matchlock.sandbox.snapshots import MEMORY_FILE, UPPER_FILE

    store = StateStore(state_dir)
    try:
        store.register("vm-00000001", image="img", config={})
        directory = records.begin(store, name, "vm-00000001", "full")
        (directory / UPPER_FILE).write_bytes(b"")
        (directory / MEMORY_FILE).write_bytes(b"")
        base = {"mode": "full", "image": "snap/image:1", "cpus": 1.0, "memory_mb": 384, "disk_size_mb": 256,
                "network": False, "secrets": {}}  # fmt: skip
        records.complete(store, name, {**base, **meta})
    finally:
        store.close()


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--memory", "1024"], ["--memory is 1024", "taken with 384", "omit --memory"]),
        (["--cpus", "2"], ["--cpus is 2", "omit --cpus"]),
        (["--disk-size", "1024"], ["--disk-size is 1024", "omit --disk-size"]),
        (["--image", "alpine:3.19"], ["--image 'alpine:3.19' is not the image of snapshot 's1'", "omit --image"]),
    ],
)
def test_run_from_snapshot_refuses_machine_flags_it_would_ignore(cli, state_dir, flags, needles):
    # These used to be dropped in silence: the restore booted the snapshot's machine.
    _ready_snapshot(state_dir)
    result = cli("run", "--from-snapshot", "s1", "--no-network", *flags, "--", "true")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    for needle in needles:
        assert needle in result.stderr, result


def test_a_full_restore_runs_no_command_of_the_image(cli, state_dir):
    # The image's ENTRYPOINT/CMD run on in a full snapshot's memory: composed again they started a second
    # copy in the clone (every `fork` clone, whose `run -d` has no command, for an image with one).
    _ready_snapshot(state_dir, image="matchlock/busybox:builtin")  # CMD ["sh"]
    result = cli("run", "--from-snapshot", "s1", "--no-network")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert "command required: snapshot 's1' is a full one, whose processes run on" in result.stderr, result


def test_an_empty_from_snapshot_or_snapshot_name_is_refused(cli, state_dir):
    # `--from-snapshot ''` used to boot a fresh sandbox from the default image, `--name ''` to take the default.
    restore = cli("run", "--from-snapshot", "", "--no-network", "--", "true")
    assert restore.returncode == 2 and "invalid snapshot name ''" in restore.stderr, restore
    create = cli("snapshot", "create", "vm-00000000", "--name", "")
    assert create.returncode == 2 and "invalid snapshot name ''" in create.stderr, create


def test_snapshot_rm_checks_every_name_before_removing_any(cli, state_dir):
    _ready_snapshot(state_dir, "keep")
    typo = cli("snapshot", "rm", "keep", "kepe")
    assert typo.returncode == 1 and "snapshot 'kepe' not found" in typo.stderr and typo.stdout == "", typo
    assert "keep" in cli("snapshot", "ls").stdout  # nothing was removed
    twice = cli("snapshot", "rm", "keep", "keep")
    assert twice.returncode == 0 and twice.stdout.split() == ["keep"], twice
    again = cli("snapshot", "rm", "keep")
    assert again.returncode == 1 and "snapshot 'keep' not found" in again.stderr, again


def test_a_duplicate_snapshot_name_is_a_usage_error_before_the_sandbox_is_asked(cli, state_dir):
    _ready_snapshot(state_dir, "taken")
    clash = cli("snapshot", "create", "vm-00000000", "--name", "taken")
    assert clash.returncode == 2 and "a snapshot named 'taken' already exists" in clash.stderr, clash


def test_fork_checks_the_sources_secrets_before_taking_a_snapshot(cli, state_dir):
    # It used to snapshot the source, start every clone, and have each refuse, naming a generated snapshot.
    store = StateStore(state_dir)
    try:
        store.register(
            "vm-0000000a", image="img", config={"network": {"secrets": {"API_KEY": {"hosts": ["a.example"]}}}}
        )
    finally:
        store.close()
    lacking = cli("fork", "vm-0000000a")
    assert lacking.returncode == 2, lacking
    assert "--secret API_KEY is missing: vm-0000000a uses secret(s) API_KEY" in lacking.stderr, lacking
    assert "fork-" not in lacking.stderr, lacking
    malformed = cli("fork", "vm-0000000a", "--secret", "API_KEY")
    assert malformed.returncode == 2 and "API_KEY" in malformed.stderr and "Traceback" not in malformed.stderr, (
        malformed
    )
    secret_file = state_dir.parent / "secrets.json"
    secret_file.write_text('{"OTHER": {"value": "v", "hosts": ["a.example"]}}')
    wrong = cli("fork", "vm-0000000a", "--secret-file", str(secret_file))
    assert wrong.returncode == 2 and "--secret API_KEY is missing" in wrong.stderr, wrong
