"""The runtime disk cache: each checkout's disk stays while it is among the most recently used."""

from __future__ import annotations

import os

from matchlock.image import runtime


def _fake_cache(tmp_path, monkeypatch, current: str):
    monkeypatch.setattr(runtime, "runtime_dir", lambda: tmp_path)
    monkeypatch.setattr(runtime, "runtime_disk_path", lambda: tmp_path / f"runtime-{current}.erofs")
    built: list[str] = []

    def build(disk, init_script=runtime.INIT_SCRIPT):
        built.append(disk.name)
        disk.write_bytes(b"disk")

    monkeypatch.setattr(runtime, "build_disk", build)
    return built


def test_disks_of_other_checkouts_survive_a_build_and_the_least_recently_used_go(tmp_path, monkeypatch):
    for age, name in enumerate(["a", "b", "c", "d"]):  # a used last, d longest ago
        disk = tmp_path / f"runtime-{name}.erofs"
        disk.write_bytes(b"old")
        (tmp_path / f"{disk.name}.used").touch()
        os.utime(tmp_path / f"{disk.name}.used", (1_000_000 - age, 1_000_000 - age))
    built = _fake_cache(tmp_path, monkeypatch, "new")

    assert runtime.ensure_runtime_disk() == tmp_path / "runtime-new.erofs"

    assert built == ["runtime-new.erofs"]
    left = sorted(p.name for p in tmp_path.glob("runtime-*.erofs"))
    assert left == ["runtime-a.erofs", "runtime-b.erofs", "runtime-c.erofs", "runtime-new.erofs"]
    assert not (tmp_path / "runtime-d.erofs.used").exists()


def test_using_a_disk_keeps_its_mtime_so_boot_templates_keyed_on_it_stay_valid(tmp_path, monkeypatch):
    built = _fake_cache(tmp_path, monkeypatch, "cur")
    disk = tmp_path / "runtime-cur.erofs"
    disk.write_bytes(b"disk")
    os.utime(disk, (1_000, 1_000))

    assert runtime.ensure_runtime_disk() == disk

    assert built == [] and disk.stat().st_mtime == 1_000
    assert (tmp_path / "runtime-cur.erofs.used").stat().st_mtime > 1_000
