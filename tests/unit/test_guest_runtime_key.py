"""A change to the guest code must reach every sandbox: it renames the runtime disk, which re-keys the templates.

Boot templates save a guest that has already run `prepare()` (guest/init.py), so stale guest code
in a template would outlive the change that fixed it, in CI and for users alike.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from matchlock.image import runtime
from matchlock.vm.accel import AccelChoice
from matchlock.vm.machine import Disk, MachineSpec
from matchlock.vm.snapshot import template_key
from matchlock.wire.boot import RUNTIME_DISK_SERIAL


def _source_copy(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "src" / "matchlock"
    for package in runtime.GUEST_PACKAGES:
        shutil.copytree(Path(runtime.__file__).parent.parent / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    monkeypatch.setattr(runtime, "_source_root", lambda: root)
    tree = tmp_path / "runtime" / "python-test" / "tree"
    tree.mkdir(parents=True)
    monkeypatch.setattr(runtime, "python_tree", lambda: tree)
    monkeypatch.setattr(runtime, "runtime_dir", lambda: tmp_path / "runtime")
    return root


def _key_for(disk: Path, tmp_path: Path) -> str:
    spec = MachineSpec(
        name="vm-1", kernel=tmp_path / "vmlinux", kernel_args=(), disks=(Disk(disk, RUNTIME_DISK_SERIAL, True),),
        console_log=tmp_path / "log", accel=AccelChoice("tcg", "test"),
    )  # fmt: skip
    return template_key(spec)


def test_an_edit_to_guest_init_renames_the_runtime_disk_and_rekeys_templates(tmp_path, monkeypatch):
    root = _source_copy(tmp_path, monkeypatch)
    before = runtime.runtime_disk_path()
    init = root / "guest" / "init.py"
    init.write_text(init.read_text() + "\n# changed\n")
    after = runtime.runtime_disk_path()
    assert after != before
    for disk in (before, after):
        disk.write_bytes(b"disk")
    assert _key_for(after, tmp_path) != _key_for(before, tmp_path)


def test_a_new_guest_or_wire_module_renames_the_runtime_disk(tmp_path, monkeypatch):
    root = _source_copy(tmp_path, monkeypatch)
    names = {runtime.runtime_disk_path()}
    (root / "guest" / "extra.py").write_text("X = 1\n")
    names.add(runtime.runtime_disk_path())
    (root / "wire" / "extra.py").write_text("Y = 1\n")
    names.add(runtime.runtime_disk_path())
    assert len(names) == 3
