"""Guest-local overlays: the HELLO field, the host's choice between guest and host-side overlay, the guest's guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matchlock.api.errors import UsageError
from matchlock.api.vfs import MountConfig, VFSConfig, VFSHookRule, VFSInterceptionConfig
from matchlock.guest import fuse_overlay
from matchlock.sandbox.vfs import SandboxVFS, guest_local_overlay
from matchlock.vfs.hostfs import HostFSProvider
from matchlock.vfs.overlay import OverlayProvider
from matchlock.wire import vfs
from matchlock.wire.frames import RemoteProtocolError


def _hello(mounts: list[dict]) -> bytes:
    return json.dumps({"version": 1, "max_io": 4096, "mounts": mounts}).encode()


def _payload(result: vfs.HelloReply) -> bytes:
    (reply,) = vfs.ReplyDecoder().feed(vfs.encode_reply(7, result))
    return reply.payload


def test_guest_overlay_round_trips_and_is_sent_only_when_set() -> None:
    hello = vfs.HelloReply(1, 4096, (vfs.Mount("/w", 2, True, 0, True), vfs.Mount("/m", 3, False)))
    payload = _payload(hello)
    assert vfs.decode_result(vfs.Op.HELLO, payload) == hello
    sent = json.loads(payload)["mounts"]
    assert sent[0]["guest_overlay"] is True
    assert "guest_overlay" not in sent[1]  # what an older guest has always seen


def test_an_older_hosts_hello_means_plain_mounts() -> None:
    reply = vfs.decode_result(vfs.Op.HELLO, _hello([{"path": "/w", "root": 2, "readonly": True}]))
    assert isinstance(reply, vfs.HelloReply)
    assert reply.mounts[0].guest_overlay is False


@pytest.mark.parametrize("value", [1, "true", None, [True]])
def test_guest_overlay_must_be_a_bool(value: object) -> None:
    with pytest.raises(RemoteProtocolError, match="guest_overlay"):
        vfs.decode_result(vfs.Op.HELLO, _hello([{"path": "/w", "root": 2, "readonly": True, "guest_overlay": value}]))


def test_guest_overlay_needs_a_readonly_lower() -> None:
    with pytest.raises(RemoteProtocolError, match="only if readonly"):
        vfs.decode_result(vfs.Op.HELLO, _hello([{"path": "/w", "root": 2, "readonly": False, "guest_overlay": True}]))


def _config(tmp_path: Path, rules: tuple[VFSHookRule, ...] | None = None, emit: bool = False, **extra) -> VFSConfig:
    mounts = {"/workspace/repo": MountConfig("overlay", str(tmp_path))}
    mounts.update({guest: MountConfig(kind, str(tmp_path)) for guest, kind in extra.items()})
    icpt = None if rules is None else VFSInterceptionConfig(emit_events=emit, rules=rules)
    return VFSConfig(mounts=mounts, interception=icpt)


def _rule(path: str, action: str = "block") -> tuple[VFSHookRule, ...]:
    return (VFSHookRule(name="r", ops=("create",), path=path, action=action),)


@pytest.mark.parametrize(
    "rules, emit, local",
    [
        (None, False, True),
        ((), False, True),
        ((), True, False),  # events are wanted: the host must see every op
        (_rule(""), False, False),  # no path: every path
        (_rule("/workspace/repo/*"), False, False),
        (_rule("/workspace/repo"), False, False),
        (_rule("/workspace/*/x/*"), False, False),
        (_rule("/workspace/r?po/*", "allow"), False, False),
        (_rule("/workspace/[r]epo/*"), False, False),  # a class: assumed to match
        (_rule("/workspace/other/*"), False, True),
        (_rule("/workspace/*"), False, False),  # matches the mount point itself
        (_rule("/workspace/o*"), False, True),
        (_rule("/workspace"), False, True),
        (_rule("/etc/*"), False, True),
    ],
)
def test_the_host_keeps_the_overlay_whenever_a_rule_or_event_could_apply(tmp_path, rules, emit, local) -> None:
    assert guest_local_overlay(_config(tmp_path, rules, emit), "/workspace/repo") is local


def test_nested_mounts_keep_the_host_side_overlay(tmp_path: Path) -> None:
    inside = VFSConfig(mounts={"/w": MountConfig("overlay", str(tmp_path)), "/w/m": MountConfig("memory")})
    assert not guest_local_overlay(inside, "/w")
    assert not guest_local_overlay(inside, "/w/m")
    outer = VFSConfig(mounts={"/w": MountConfig("host_fs", str(tmp_path)), "/w/o": MountConfig("overlay", "/x")})
    assert not guest_local_overlay(outer, "/w/o")
    beside = VFSConfig(mounts={"/w": MountConfig("overlay", str(tmp_path)), "/wx": MountConfig("memory")})
    assert guest_local_overlay(beside, "/w")


def test_only_writable_overlays_go_local(tmp_path: Path) -> None:
    config = VFSConfig(mounts={"/a": MountConfig("host_fs", str(tmp_path)), "/b": MountConfig("memory")})
    assert not guest_local_overlay(config, "/a")
    assert not guest_local_overlay(config, "/b")
    # The guest's overlayfs would take writes that a read-only overlay must refuse.
    readonly = VFSConfig(mounts={"/c": MountConfig("overlay", str(tmp_path), readonly=True)})
    assert not guest_local_overlay(readonly, "/c")


def _built(config: VFSConfig, state: Path) -> tuple[SandboxVFS, dict[str, object]]:
    sandbox = SandboxVFS(config, state, lambda event: None)
    return sandbox, {m.path: m for m in sandbox.router.mounts}


def test_a_local_overlay_is_served_readonly_without_a_host_copy(tmp_path: Path) -> None:
    host, state = tmp_path / "host", tmp_path / "state"
    host.mkdir()
    config = VFSConfig(mounts={"/w": MountConfig("overlay", str(host))})
    sandbox, mounts = _built(config, state)
    try:
        mount = mounts["/w"]
        assert isinstance(mount.provider, HostFSProvider) and mount.provider.readonly  # type: ignore[attr-defined]
        assert sandbox.router.hello()[0].guest_overlay and sandbox.router.hello()[0].readonly
        assert not (state / "vfs").exists()  # no host-side copy-up directory
    finally:
        sandbox.router.executor.shutdown(wait=False)
        sandbox.router.close()


def test_an_intercepted_overlay_stays_on_the_host(tmp_path: Path) -> None:
    host, state = tmp_path / "host", tmp_path / "state"
    host.mkdir()
    config = VFSConfig(mounts={"/w": MountConfig("overlay", str(host))}, interception=VFSInterceptionConfig(
        rules=_rule("/w/*")))  # fmt: skip
    sandbox, mounts = _built(config, state)
    try:
        assert isinstance(mounts["/w"].provider, OverlayProvider)  # type: ignore[attr-defined]
        (info,) = sandbox.router.hello()
        assert not info.guest_overlay and not info.readonly
    finally:
        sandbox.router.executor.shutdown(wait=False)
        sandbox.router.close()


def test_the_guest_mounts_a_plain_mount_where_it_is_and_an_overlays_lower_hidden(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fuse_overlay, "HIDDEN", str(tmp_path / "hidden"))
    plain = vfs.Mount("/w", 2, True)
    assert fuse_overlay.hidden_lower(plain) is plain
    fuse_overlay.cover(plain, plain)  # nothing to do for a plain mount
    lower = fuse_overlay.hidden_lower(vfs.Mount("/w", 5, True, 7, True))
    assert (lower.path, lower.root, lower.readonly, lower.negative_valid_ns) == (f"{tmp_path}/hidden/5", 5, True, 7)
    assert (tmp_path / "hidden").stat().st_mode & 0o777 == 0o700


def test_no_upper_disk_is_a_clear_error_and_the_lower_is_still_detached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fuse_overlay, "UPPER_DISK", str(tmp_path))  # a directory, not a mount point
    detached = []
    monkeypatch.setattr(fuse_overlay.syscalls, "umount", lambda path, flags: detached.append((path, flags)))
    lower = tmp_path / "hidden-5"
    lower.mkdir()
    info = vfs.Mount(str(tmp_path / "w"), 5, True, 0, True)
    with pytest.raises(RuntimeError, match=f"mount {tmp_path}/w: the sandbox's upper disk is not mounted.*fix:"):
        fuse_overlay.cover(info, vfs.Mount(str(lower), 5, True, 0, True))
    assert detached == [(str(lower), fuse_overlay.syscalls.MNT_DETACH)] and not lower.exists()


@pytest.mark.parametrize("root", [-3, 1, 1 << 64])
def test_a_root_that_is_no_node_id_is_refused(root: int) -> None:
    # fuse_overlay builds its hidden and upper paths from the root.
    with pytest.raises(RemoteProtocolError, match="bad root"):
        vfs.decode_result(vfs.Op.HELLO, _hello([{"path": "/w", "root": root, "readonly": True, "guest_overlay": True}]))


def test_a_local_overlay_whose_host_dir_became_a_file_is_refused(tmp_path: Path) -> None:
    host = tmp_path / "file"
    host.write_text("x")
    config = VFSConfig(mounts={"/w": MountConfig("overlay", str(host))})  # validate() would refuse it
    with pytest.raises(UsageError, match=f"vfs mount /w: cannot open {host}: overlay lower .* not a directory"):
        SandboxVFS(config, tmp_path / "state", lambda event: None)


def test_a_local_overlays_vanished_host_dir_names_the_mount(tmp_path: Path) -> None:
    config = VFSConfig(mounts={"/w": MountConfig("overlay", str(tmp_path / "gone"))})
    with pytest.raises(UsageError, match=f"vfs mount /w: cannot open {tmp_path}/gone.*fix:"):
        SandboxVFS(config, tmp_path / "state", lambda event: None)
