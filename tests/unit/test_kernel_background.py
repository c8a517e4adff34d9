"""The tuned kernel built in the background: state, one build at a time, joining, failures, setup, diagnose."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading

import pytest
from click.testing import CliRunner

from matchlock.api.errors import KernelError, SetupError
from matchlock.cli import info
from matchlock.cli import setup as setup_cli
from matchlock.cli.kernel import kernel as kernel_cli
from matchlock.kernel import KernelImage, background, build
from matchlock.util.fs import file_lock
from support.kernels import fake_tuned


@pytest.fixture(autouse=True)
def own_cache(cache_dir, monkeypatch):
    monkeypatch.delenv("MATCHLOCK_KERNEL", raising=False)
    return cache_dir


REAL_POPEN = subprocess.Popen  # tests below replace subprocess.Popen


def dead_pid() -> int:
    proc = REAL_POPEN(["true"])
    proc.wait()
    return proc.pid


class FakePopen:
    """Stands in for the detached build: records its argv and where its output goes."""

    calls: list[list[str]] = []

    def __init__(self, argv, **kwargs):
        FakePopen.calls.append(argv)
        assert kwargs["start_new_session"] is True and kwargs["stdin"] == subprocess.DEVNULL
        self.pid = os.getppid()  # a process that stays alive while the test runs


@pytest.fixture
def fake_popen(monkeypatch):
    FakePopen.calls = []
    monkeypatch.setattr(background.subprocess, "Popen", FakePopen)
    return FakePopen


# --------------------------------------------------------------------------- status


def test_an_empty_cache_has_no_build():
    status = background.status()
    assert status.state == "not-started"
    assert status.describe() == "not built, and no build is running"


def test_a_published_kernel_is_built(own_cache):
    vmlinux = fake_tuned(own_cache)
    status = background.status()
    assert (status.state, status.kernel) == ("built", vmlinux)
    assert status.as_json() == {"state": "built", "kernel": str(vmlinux)}


def test_the_held_lock_means_running():
    background.record("running", log="/tmp/x.log")
    with file_lock(background.lock_path()):
        status = background.status()
    assert status.state == "running" and status.pid == os.getpid()
    assert f"(pid {os.getpid()}); log: /tmp/x.log" in status.describe()


def test_the_spawned_build_does_not_wait_for_itself():
    """`start()` records the child's pid before the child takes the lock; the child must not see itself running."""
    background.record("running", pid=os.getpid(), log="/tmp/x.log")
    assert background.status().state == "interrupted"
    background.record("running", pid=os.getppid(), log="/tmp/x.log")
    assert background.status().state == "running"


def test_a_dead_builder_without_the_lock_is_interrupted():
    background.record("running", pid=dead_pid(), log="/tmp/x.log")
    status = background.status()
    assert status.state == "interrupted"
    assert "stopped before it finished" in status.describe() and "/tmp/x.log" in status.describe()


def test_a_garbled_record_reads_as_no_build():
    background.status_path().parent.mkdir(parents=True)
    background.status_path().write_text('["not", "a", "record"]')
    assert background.status().state == "not-started"
    background.status_path().write_text('{"state": "running", "pid": "1"}')  # a pid that is not a number
    assert background.status().state == "interrupted"


# --------------------------------------------------------------------------- start: one build, joined


def test_start_spawns_one_low_priority_detached_build(fake_popen, own_cache):
    first = background.start(jobs=2)
    assert first.state == "running" and first.log == background.log_path()
    [argv] = fake_popen.calls
    assert argv[argv.index("-m") + 1 :] == ["matchlock", "kernel", "build", "--install-deps", "--jobs", "2"]
    assert argv[:6] == ["nice", "-n", "19", "ionice", "-c", "3"]
    assert "background tuned kernel build" in background.log_path().read_text()

    second = background.start()  # a second setup joins the running build
    assert second.state == "running" and second.pid == first.pid
    assert len(fake_popen.calls) == 1


def test_start_does_nothing_once_built(fake_popen, own_cache):
    fake_tuned(own_cache)
    assert background.start().state == "built"
    assert fake_popen.calls == []


def test_start_retries_after_a_failure(fake_popen):
    background.record("failed", pid=dead_pid(), error="make vmlinux failed (exit 2)")
    assert background.start().state == "running"
    assert len(fake_popen.calls) == 1


# --------------------------------------------------------------------------- build_tuned records its outcome


def test_a_failed_build_is_recorded_with_its_log(monkeypatch):
    background.record("running", log=str(background.log_path()))  # as the detached build's parent writes it

    def fails(nproc, log, install_deps):
        raise KernelError("make vmlinux failed (exit 2)\n  | error: x\n  full log: /c/build.log")

    monkeypatch.setattr(build, "cached_tuned", lambda: None)
    monkeypatch.setattr(build, "_build_locked", fails)
    with pytest.raises(KernelError):
        build.build_tuned(log=lambda _: None)
    status = background.status()
    assert status.state == "failed" and status.log == background.log_path()
    assert status.describe() == f"the last build failed: make vmlinux failed (exit 2); log: {status.log}"
    assert "full log: /c/build.log" in (status.error or "")


def test_a_successful_build_clears_the_record(monkeypatch, own_cache):
    background.record("failed", error="an older failure")
    monkeypatch.setattr(build, "cached_tuned", lambda: None)
    monkeypatch.setattr(build, "_build_locked", lambda nproc, log, install_deps: fake_tuned(own_cache))
    vmlinux = build.build_tuned(log=lambda _: None)
    assert not background.status_path().exists()
    assert background.status().kernel == vmlinux


def test_a_second_build_waits_for_the_first_and_reuses_its_kernel(monkeypatch, own_cache):
    """The caller blocks on the lock while another build runs, then finds the published kernel."""
    entered, published = threading.Event(), []
    calls = []

    def cached():
        calls.append(1)
        entered.set()
        return published[0] if published else None

    def holder():
        with file_lock(background.lock_path()):
            locked.set()
            entered.wait(10)
            published.append(fake_tuned(own_cache))

    def must_not_build(*args):
        raise AssertionError("a second build started while one was running")

    locked = threading.Event()
    monkeypatch.setattr(build, "cached_tuned", cached)
    monkeypatch.setattr(build, "_build_locked", must_not_build)
    thread = threading.Thread(target=holder)
    thread.start()
    locked.wait(10)
    assert build.build_tuned(log=lambda _: None) == published[0]
    thread.join()
    assert len(calls) == 2  # before the lock, then again once it was free


def test_kernel_build_cli_waits_for_the_background_build(monkeypatch, own_cache):
    vmlinux = own_cache / "kernels" / "v" / "vmlinux"
    monkeypatch.setattr(build, "cached_tuned", lambda: None)
    monkeypatch.setattr(background, "status", lambda: background.BuildStatus("running", pid=42, log=None))
    monkeypatch.setattr(background, "wait", lambda log: background.BuildStatus("built", kernel=vmlinux))
    monkeypatch.setattr(build, "build_tuned", lambda **kw: pytest.fail("started a second build"))
    result = CliRunner().invoke(kernel_cli, ["build"])
    assert result.exit_code == 0, result.output
    assert "Waiting for the tuned kernel: a background build is running (pid 42)" in result.output
    assert result.output.splitlines()[-1] == str(vmlinux)


def test_wait_returns_once_the_running_build_ends(own_cache):
    background.record("running")
    locked, release = threading.Event(), threading.Event()

    def holder():
        with file_lock(background.lock_path()):
            locked.set()
            release.wait(10)
            fake_tuned(own_cache)

    thread = threading.Thread(target=holder)
    thread.start()
    locked.wait(10)
    messages: list[str] = []
    threading.Timer(0.2, release.set).start()
    assert background.wait(log=messages.append).state == "built"
    thread.join()
    assert messages and messages[0].startswith("waiting for the tuned kernel: a background build is running")


# --------------------------------------------------------------------------- build packages


def test_installing_the_build_packages_needs_root(monkeypatch):
    monkeypatch.setattr(build, "missing_prerequisites", lambda: ["linux-source-6.1", "bc"])
    monkeypatch.setattr(build.os, "geteuid", lambda: 1000)
    with pytest.raises(
        SetupError, match=r"only root can install them\n  fix: sudo apt-get install -y linux-source-6.1 bc"
    ):
        build.install_prerequisites(log=lambda _: None)


def test_installing_refreshes_stale_package_lists_once(monkeypatch):
    missing = [["bison", "flex"]]
    runs: list[list[str]] = []

    def run(argv, **kwargs):
        runs.append(argv)
        failed = argv[1] == "install" and len(runs) == 1
        if argv[1] == "install" and not failed:
            missing.append([])
        return subprocess.CompletedProcess(argv, 100 if failed else 0, "", "E: Unable to locate package bison")

    monkeypatch.setattr(build, "missing_prerequisites", lambda: missing[-1])
    monkeypatch.setattr(build.os, "geteuid", lambda: 0)
    monkeypatch.setattr(build.subprocess, "run", run)
    build.install_prerequisites(log=lambda _: None)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600"]
    install += ["bison", "flex"]
    assert runs == [install, ["apt-get", "update", "-q"], install]


def test_a_failed_install_names_the_command(monkeypatch):
    monkeypatch.setattr(build, "missing_prerequisites", lambda: ["bc"])
    monkeypatch.setattr(build.os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        build.subprocess,
        "run",
        lambda argv, **kw: subprocess.CompletedProcess(argv, 100, "", "E: dpkg was interrupted"),
    )
    with pytest.raises(SetupError, match=r"apt-get install .* bc failed \(exit 100\)"):
        build.install_prerequisites(log=lambda _: None)


# --------------------------------------------------------------------------- setup


FALLBACK = KernelImage(
    path=background.build_root() / "vmlinuz", kind="fallback", version="6.1.0-57-cloud-amd64", initrd=None,
    cmdline=(), acpi=True, reason="the tuned kernel is not built",
)  # fmt: skip


@pytest.fixture
def setup_steps(monkeypatch):
    """`matchlock setup` with every artefact step replaced by a recorder."""
    import matchlock.image.runtime as runtime
    import matchlock.kernel as kernel_package
    from matchlock.kernel import fallback

    steps: list[object] = []
    monkeypatch.setattr(runtime, "ensure_runtime_disk", lambda: steps.append("runtime") or "disk")
    prepared = fallback.FallbackKernel(FALLBACK.path, FALLBACK.path, FALLBACK.version)
    monkeypatch.setattr(fallback, "cached_fallback", lambda: steps.append("fallback") or prepared)
    monkeypatch.setattr(setup_cli, "_builtin_image", lambda: steps.append("image") or "image")
    monkeypatch.setattr(setup_cli, "_warm_templates", lambda everything: steps.append(("templates", everything)))
    monkeypatch.setattr(
        background, "start", lambda jobs: steps.append("background") or background.BuildStatus("running", pid=7)
    )
    monkeypatch.setattr(kernel_package, "resolve", lambda: FALLBACK)
    return steps


def test_setup_runs_on_the_fallback_and_builds_the_tuned_kernel_in_the_background(setup_steps):
    result = CliRunner().invoke(setup_cli.setup, [])
    assert result.exit_code == 0, result.output
    assert setup_steps == ["runtime", "fallback", "image", ("templates", False), "background"]
    assert "Tuned kernel: a background build is running (pid 7)" in result.output


def test_setup_tuned_now_builds_first_and_installs_the_packages(setup_steps, monkeypatch):
    import matchlock.kernel as kernel_package

    tuned = dataclasses.replace(FALLBACK, kind="tuned")
    monkeypatch.setattr(kernel_package, "resolve", lambda: tuned)
    monkeypatch.setattr(
        build, "build_tuned", lambda **kw: setup_steps.append(("tuned", kw["install_deps"])) or "vmlinux"
    )
    result = CliRunner().invoke(setup_cli.setup, ["--tuned", "now"])
    assert result.exit_code == 0, result.output
    assert setup_steps == ["runtime", ("tuned", True), "fallback", "image", ("templates", True)]


# --------------------------------------------------------------------------- diagnose


def _diagnose_kernel(monkeypatch, status: background.BuildStatus) -> dict:
    import matchlock.kernel as kernel_package

    monkeypatch.setattr(kernel_package, "resolve", lambda build_fallback: FALLBACK)
    monkeypatch.setattr(background, "status", lambda: status)
    monkeypatch.setattr(info, "collect_checks", lambda: [info._kernel_check()])
    text = CliRunner().invoke(info.diagnose, [])
    assert text.exit_code == 0, text.output
    data = CliRunner().invoke(info.diagnose, ["--json"])
    [check] = json.loads(data.output)["checks"]
    check["text"] = text.output
    return check


def test_diagnose_says_which_kernel_why_and_what_the_tuned_one_gains(monkeypatch):
    log = background.log_path()
    check = _diagnose_kernel(monkeypatch, background.BuildStatus("running", pid=42, log=log, started=None))
    assert check["status"] == "warn" and check["message"].startswith("fallback 6.1.0-57-cloud-amd64 at ")
    assert check["details"]["kind"] == "fallback" and check["details"]["reason"] == FALLBACK.reason
    assert check["details"]["tuned_build"] == {"state": "running", "pid": 42, "log": str(log)}
    assert check["details"]["tuned_gain"] == background.TUNED_GAIN
    assert f"  tuned kernel: a background build is running (pid 42); log: {log}\n" in check["text"]
    assert f"  the tuned kernel would gain: {background.TUNED_GAIN}\n" in check["text"]
    assert check["fix"].startswith("none needed: sandboxes switch to the tuned kernel once it is built")


def test_diagnose_points_at_the_log_of_a_failed_build(monkeypatch):
    log = background.log_path()
    check = _diagnose_kernel(monkeypatch, background.BuildStatus("failed", log=log, error="bc: not found\nmore"))
    assert check["details"]["tuned_build"]["error"] == "bc: not found\nmore"
    assert f"  tuned kernel: the last build failed: bc: not found; log: {log}\n" in check["text"]
    assert check["fix"] == f"matchlock kernel build (the last attempt's log: {log})"


def test_diagnose_passes_on_the_tuned_kernel(own_cache):
    vmlinux = fake_tuned(own_cache)
    check = info._kernel_check()
    assert check.status == "pass" and check.message == f"tuned {vmlinux.parent.name} at {vmlinux}"
    assert check.notes[0].startswith("why: tuned kernel built for this config")
    assert check.details is not None and check.details["tuned_build"] == {"state": "built", "kernel": str(vmlinux)}


def test_setup_as_a_user_without_the_build_packages_says_the_fix(setup_steps, monkeypatch):
    monkeypatch.setattr(setup_cli, "_is_root", lambda: False)
    monkeypatch.setattr(build, "missing_prerequisites", lambda: ["linux-source-6.1", "bc"])
    result = CliRunner().invoke(setup_cli.setup, [])
    assert result.exit_code == 0, result.output
    assert "background" not in setup_steps
    assert "fix: sudo apt-get install -y linux-source-6.1 bc && matchlock kernel build" in result.output
