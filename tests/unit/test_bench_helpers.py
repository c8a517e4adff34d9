"""Helpers of the benchmarks that need no VM: the one start-and-stop of a vhost-user back end both file
benchmarks use (bench_virtiofs.serving), and the exec floor of bench_run_latency."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_run_latency  # noqa: E402
import bench_vhost_user_fs  # noqa: E402
import bench_virtiofs as bv  # noqa: E402


@pytest.mark.timeout(60)  # a hang detector, not a performance assertion
def test_a_back_end_is_yielded_once_its_socket_exists_and_stopped_after(tmp_path: Path) -> None:
    socket_path = tmp_path / "fs.sock"
    up = f"import pathlib, time; pathlib.Path({str(socket_path)!r}).touch(); time.sleep(60)"
    with bv.serving([sys.executable, "-c", up], socket_path, "the stand-in", 30) as process:
        assert socket_path.exists() and process.poll() is None
    assert process.poll() is not None  # terminated and reaped


@pytest.mark.timeout(60)
def test_a_back_end_that_exits_first_is_named_with_its_log(tmp_path: Path) -> None:
    fails = "import sys; print('no such share'); sys.exit(3)"
    with pytest.raises(bv.BenchError, match=r"the stand-in did not start \(exit 3\): no such share"):
        with bv.serving([sys.executable, "-c", fails], tmp_path / "fs.sock", "the stand-in", 30):
            pass


async def test_the_exec_floor_is_the_first_exec_then_back_to_back_ones(monkeypatch) -> None:
    commands: list[str] = []

    class Box:
        async def exec(self, spec) -> None:
            commands.append(spec.command)

        async def aclose(self) -> None:
            commands.append("closed")

    async def create(config) -> Box:
        return Box()

    monkeypatch.setattr(bench_run_latency.Sandbox, "create", create)
    first, busy = await bench_run_latency.exec_floor(3)
    assert isinstance(first, float) and len(busy) == 3  # no idle rounds: nothing is forked ahead when idle
    assert commands == ["true"] * 4 + ["closed"]


def test_the_prototype_starts_through_the_same_helper_as_virtiofsd(monkeypatch, tmp_path: Path) -> None:
    started: list[tuple[list[str], Path, str]] = []
    monkeypatch.setattr(
        bv, "serving", lambda argv, socket_path, what, seconds: started.append((argv, socket_path, what))
    )
    bench_vhost_user_fs.proto(tmp_path / "share", tmp_path / "p.sock")
    bv.virtiofsd(tmp_path / "share", tmp_path / "v.sock", "auto")
    (proto_argv, _, proto_what), (virtiofsd_argv, _, _) = started
    assert proto_argv[1:] == [str(bench_vhost_user_fs.PROTO), "--socket", str(tmp_path / "p.sock"), "--source",
                              str(tmp_path / "share")] and proto_what == "the prototype"  # fmt: skip
    assert virtiofsd_argv[0] == str(bv.VIRTIOFSD) and "cache=auto" in virtiofsd_argv


def test_both_file_benchmarks_run_the_same_workloads_on_the_same_mounts(tmp_path: Path) -> None:
    assert bv.workload("write", "/w", 32) == (bv.bench_vfs.BULK_WRITE_SCRIPT, "/w/big", "32")
    assert [bv.workload(step, "/w", 1)[1] for step in ("untar", "git_status")] == ["/w/untar", "/w/untar/tree"]
    target = bv.virtiofs_target("virtiofsd", "auto", tmp_path)
    assert (target.guest_dir, target.host_dir) == ("/mnt/auto/auto", tmp_path / "auto")
    assert target.mount == "mkdir -p /mnt/auto && busybox mount -t virtiofs auto /mnt/auto && "
    tree = tmp_path / "auto" / "untar" / "tree"
    tree.mkdir(parents=True)
    (tree / "one").write_text("1")
    bv.check_untar(target, 1)
    bv.check_untar(bv.Target("ext4", "/root/bench", None), 5)  # the guest's own disk: nothing to see
    with pytest.raises(bv.BenchError, match="virtiofsd: the host sees 1 files after the untar, not 2"):
        bv.check_untar(target, 2)
