"""Boot templates: sandboxes restored from a snapshot of a booted guest."""

from __future__ import annotations

import pytest

from matchlock.vm.snapshot import templates_dir

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


def _console(state_dir, vm_id: str) -> str:
    return (state_dir / "vms" / vm_id / "logs" / "vm.log").read_text(errors="replace")


def test_clones_get_fresh_randomness(cli):
    outputs = set()
    for _ in range(2):
        result = cli("run", "--no-network", "--", "sh", "-c", "head -c 32 /dev/urandom | od -A n -t x1")
        assert result.returncode == 0, result
        outputs.add(result.stdout)
    assert len(outputs) == 2  # the guest reseeds its CRNG with host entropy when it is woken


def test_a_broken_template_falls_back_to_a_cold_boot(cli, state_dir):
    warm = cli("run", "--no-network", "-d")
    assert warm.returncode == 0, warm
    cli("kill", warm.stdout.strip())
    states = list(templates_dir().glob("*/state"))
    assert states, "running a sandbox should have left a boot template"
    for state in states:
        state.write_bytes(b"not a migration stream")
    result = cli("run", "--no-network", "--rm=false", "-d")
    assert result.returncode == 0, result
    vm = result.stdout.strip()
    try:
        assert cli("exec", vm, "--", "echo", "booted").stdout == "booted\n"
        assert "restoring the boot template failed" in _console(state_dir, vm)
    finally:
        cli("kill", vm)
    rebuilt = cli("run", "--no-network", "--", "true")  # the bad state was removed and is built again
    assert rebuilt.returncode == 0, rebuilt
    # Device state in `state`, the guest's RAM beside it in `ram` (ADR 0006).
    rams = [s.parent / "ram" for s in templates_dir().glob("*/state") if (s.parent / "ram").exists()]
    assert any(ram.stat().st_blocks * 512 > 1_000_000 for ram in rams)


def test_templates_can_be_disabled(cli):
    import shutil

    shutil.rmtree(templates_dir(), ignore_errors=True)
    result = cli("run", "--no-network", "--", "echo", "cold", env={"MATCHLOCK_NO_TEMPLATES": "1"})
    assert result.stdout == "cold\n", result
    assert not list(templates_dir().glob("*/state"))


def test_clones_of_a_rooted_template_each_start_from_its_clean_upper_disk(cli):
    # An image's first start takes the plain template and only notes the image; the next builds its own.
    for _ in range(2):
        first = cli(
            "run", "--no-network", "--", "sh", "-c", "echo one > /etc/clone-marker && grep ' / overlay' /proc/mounts"
        )
        assert first.returncode == 0 and "overlay" in first.stdout, first
    # The image's template, saved with its root mounted, keeps the upper disk its clones copy.
    rooted = [s for s in templates_dir().glob("*/state") if (s.parent / "upper").is_file()]
    assert rooted, "a run of a store image should have left a rooted template"
    second = cli(
        "run", "--no-network", "--", "sh", "-c", "test ! -e /etc/clone-marker && echo clean > /etc/clone-marker"
    )
    assert second.returncode == 0, second  # the first clone's write stayed on its own copy
    shown = cli("image", "templates")
    assert "root of" in shown.stdout, shown
