"""Sandboxes with mounts start from a boot template: the VFS port is hot-plugged after the restore.

The evidence is timing-free: a guest restored from a template was booted with the template flag on its
kernel command line, which a cold boot never has. Snapshots and forks of such a sandbox stay refused.
"""

from __future__ import annotations

import pytest

from matchlock.wire.boot import TEMPLATE_FLAG

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


def _vm_log(state_dir, vm_id: str) -> str:
    return (state_dir / "vms" / vm_id / "logs" / "vm.log").read_text(errors="replace")


def test_a_mount_sandbox_restores_a_template_and_hot_plugs_its_port(cli, state_dir, tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host.txt").write_text("host data\n")
    started = cli("run", "--no-network", "-d", "-v", f"{shared}:/mnt:host_fs")
    assert started.returncode == 0, started
    vm = started.stdout.strip()
    try:
        script = "cat /proc/cmdline; cat /mnt/from-host.txt; echo guest > /mnt/from-guest.txt; ls /dev"
        result = cli("exec", vm, "--", "sh", "-c", script)
        assert result.returncode == 0, result
        cmdline, from_host, *devices = result.stdout.splitlines()
        assert TEMPLATE_FLAG in cmdline.split(), cmdline
        assert from_host == "host data"
        assert (shared / "from-guest.txt").read_text() == "guest\n"
        assert not [d for d in devices if d.startswith("vport")], devices  # the hot-plugged port stays hidden
        assert "booting cold" not in _vm_log(state_dir, vm)
    finally:
        cli("kill", vm)


def test_a_failed_hot_plug_falls_back_to_a_cold_boot_with_a_note(state_dir, loop_thread, tmp_path, monkeypatch) -> None:
    from matchlock.api.config import SandboxConfig
    from matchlock.api.network import NetworkConfig
    from matchlock.api.vfs import MountConfig, VFSConfig
    from matchlock.sandbox.sandbox import ExecSpec, Sandbox
    from matchlock.vm.machine import Machine
    from matchlock.vm.qmp import QMPError

    async def refuse(self) -> None:
        raise QMPError("QMP device_add failed: Bus 'virtio-serial-bus.0' is full")

    monkeypatch.setattr(Machine, "add_vfs_port", refuse)
    (tmp_path / "in.txt").write_text("cold\n")
    mounts = {"/data": MountConfig("host_fs", str(tmp_path))}
    config = SandboxConfig(
        image="matchlock/busybox:builtin", network=NetworkConfig(no_network=True), vfs=VFSConfig(mounts=mounts)
    )
    sandbox = loop_thread.run(Sandbox.create(config))
    try:
        result = loop_thread.run(sandbox.exec(ExecSpec("cat /data/in.txt; cat /proc/cmdline")))
        assert result.exit_code == 0, result
        data, cmdline = result.stdout.decode().splitlines()
        assert data == "cold"
        assert TEMPLATE_FLAG not in cmdline.split()
        log = sandbox.console_log.read_text(errors="replace")
        assert "hot-plugging the VFS port failed" in log and "booting cold" in log, log[-2000:]
    finally:
        loop_thread.run(sandbox.aclose())
