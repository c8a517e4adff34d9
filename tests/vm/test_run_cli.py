"""`matchlock run` end to end, as a user runs it: real CLI, real VMs (TCG here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("vm_prerequisites")]


def test_echo_and_separate_streams(cli):
    result = cli("run", "--", "sh", "-c", "echo to-out; echo to-err >&2")
    assert result.returncode == 0, result
    assert result.stdout == "to-out\n"
    assert result.stderr == "to-err\n"


def test_default_image_is_busybox_and_leaves_nothing(cli, state_dir):
    result = cli("run", "--", "cat", "/etc/os-release")
    assert result.returncode == 0, result
    assert "ID=busybox" in result.stdout
    assert list((state_dir / "vms").iterdir()) == []


@pytest.mark.parametrize("code", [0, 1, 7])
def test_exit_code_propagates(cli, code):
    result = cli("run", "--", "sh", "-c", f"exit {code}")
    assert result.returncode == code, result


def test_env_sources_and_precedence(cli, tmp_path):
    env_file = tmp_path / "vars.env"
    env_file.write_text("# a comment\n\nFROM_FILE=file\nOVERRIDDEN=from-file\nCOPIED\n")
    result = cli(
        "run", "--env-file", str(env_file), "-e", "INLINE=inline", "-e", "OVERRIDDEN=from-flag",
        "-e", "FROM_HOST", "--", "sh", "-c", 'echo "$FROM_FILE $INLINE $OVERRIDDEN $FROM_HOST $COPIED"',
        env={"FROM_HOST": "host value", "COPIED": "copied"},
    )  # fmt: skip
    assert result.returncode == 0, result
    assert result.stdout == "file inline from-flag host value copied\n"


def test_env_from_host_missing_fails_before_boot(cli):
    result = cli("run", "-e", "MATCHLOCK_TEST_SURELY_UNSET", "--", "true")
    assert result.returncode == 2, result
    assert "MATCHLOCK_TEST_SURELY_UNSET" in result.stderr
    assert "not set" in result.stderr


def test_working_directory(cli):
    result = cli("run", "-w", "/etc", "--", "pwd")
    assert result.stdout == "/etc\n", result
    missing = cli("run", "-w", "/does/not/exist", "--", "pwd")
    assert missing.returncode == 127, missing
    assert "/does/not/exist" in missing.stderr


def test_user_nobody(cli):
    result = cli("run", "-u", "nobody", "--", "sh", "-c", 'id -u; echo "$HOME"; touch /root/x 2>/dev/null; echo $?')
    assert result.returncode == 0, result
    uid, home, touch_status = result.stdout.split()
    assert uid == "65534"
    assert home == "/nonexistent"
    assert touch_status != "0"


def test_user_uid_gid_and_unknown(cli):
    result = cli("run", "-u", "1234:4321", "--", "id")
    assert "uid=1234" in result.stdout and "gid=4321" in result.stdout, result
    unknown = cli("run", "-u", "no-such-user", "--", "id")
    assert unknown.returncode == 127, unknown
    assert "no-such-user" in unknown.stderr


def test_entrypoint_and_cmd_composition(cli):
    # The built-in image has CMD ["sh"] and no ENTRYPOINT.
    result = cli("run", "--entrypoint", "echo", "--", "composed", "args")
    assert result.stdout == "composed args\n", result
    # An empty --entrypoint clears it; the arguments run as the command.
    cleared = cli("run", "--entrypoint", "", "--", "echo", "plain")
    assert cleared.stdout == "plain\n", cleared
    # No arguments: the image CMD (sh) runs and reads the script from stdin.
    default = cli("run", "-i", input="echo from-default-cmd\n")
    assert default.stdout == "from-default-cmd\n", default


def test_stdin_pipe_mode(cli):
    data = "".join(f"line {i}\n" for i in range(2000))
    result = cli("run", "-i", "--", "sh", "-c", "wc -l; echo done", input=data)
    assert result.returncode == 0, result
    assert result.stdout.split() == ["2000", "done"]


def test_thousand_lines_of_output(cli):
    result = cli("run", "--", "sh", "-c", "i=0; while [ $i -lt 1000 ]; do echo line-$i; i=$((i+1)); done")
    lines = result.stdout.splitlines()
    assert len(lines) == 1000, result
    assert lines[0] == "line-0" and lines[-1] == "line-999"


def test_timeout_kills_and_reports(cli):
    result = cli("run", "--timeout", "5", "--", "sleep", "600")
    assert result.returncode == 124, result
    assert "timed out" in result.stderr


def test_bad_flags_exit_2_and_name_the_value(cli):
    for args, needle in [
        (["--cpus", "abc"], "abc"),
        (["--cpus", "0"], "--cpus"),
        (["--cpus", "64"], "64"),
        (["--memory", "10"], "--memory 10"),
        (["--disk-size", "-5"], "--disk-size"),
        (["--rm=maybe"], "maybe"),
        (["--add-host", "bad"], "bad"),
    ]:
        result = cli("run", *args, "--", "true")
        assert result.returncode == 2, (args, result)
        assert needle in result.stderr, (args, result)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result)


def test_unknown_image_is_a_clear_error(cli):
    # `run` pulls on a cache miss; a registry on loopback that is not there keeps every byte on this host.
    result = cli("run", "--image", "localhost:1/no/such:image", "--", "true", env={"MATCHLOCK_PULL_RETRIES": "1"})
    assert result.returncode == 1, result
    # First the note that nothing local matched, then one error line that names the pull failure.
    note, error = result.stderr.strip().splitlines()[-2:]
    assert note.startswith("no local image matched localhost:1/no/such:image"), result
    assert error.startswith("Error: no local image matched localhost:1/no/such:image"), result
    assert "network failure talking to registry localhost:1" in error, result


def test_hostname_and_hosts(cli):
    result = cli("run", "--hostname", "box", "--add-host", "db.internal:192.0.2.7",
                 "--dns-servers", "192.0.2.53", "--", "sh", "-c",
                 "hostname; cat /etc/hostname /etc/hosts /etc/resolv.conf")  # fmt: skip
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] == "box" and lines[1] == "box"
    assert "127.0.0.1\tlocalhost localhost.localdomain box" in lines
    assert "192.0.2.7\tdb.internal" in lines
    assert "nameserver 192.0.2.53" in lines


def test_default_hostname_is_vm_id(cli):
    result = cli("run", "--", "hostname")
    assert result.stdout.startswith("vm-") and len(result.stdout.strip()) == 11, result


def test_failed_start_cleans_up_and_shows_console(cli, state_dir, tmp_path):
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"\x7fELF not really a kernel")
    result = cli("run", "--", "true", env={"MATCHLOCK_KERNEL": str(bogus), "MATCHLOCK_BOOT_TIMEOUT": "20"})
    assert result.returncode == 1, result
    assert "failed to start" in result.stderr
    # The tail of the console is shown inline, not as a path to a log that was removed with the sandbox.
    assert "last lines of the guest console" in result.stderr and str(state_dir) not in result.stderr, result
    leftovers = list((state_dir / "vms").glob("vm-*")) if (state_dir / "vms").exists() else []
    assert leftovers == []


def test_no_qemu_survives_a_killed_cli(cli, state_dir):
    matchlock = os.path.join(os.path.dirname(sys.executable), "matchlock")
    proc = subprocess.Popen(
        [matchlock, "run", "--", "sh", "-c", "echo started; sleep 600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout.readline() == b"started\n"
    qemu_pids = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "qemu-system"], capture_output=True, text=True)
    pids = [int(p) for p in qemu_pids.stdout.split()]
    assert pids, "the run process should own a QEMU child"
    proc.kill()
    proc.wait()
    for pid in pids:
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            subprocess.run(["sleep", "0.1"])
        assert not os.path.exists(f"/proc/{pid}"), f"QEMU {pid} outlived its killed owner"


def test_cpus_and_memory_are_applied(cli):
    result = cli("run", "--cpus", "0.5", "--memory", "256", "--", "sh", "-c",
                 "cat /sys/fs/cgroup/init/cpu.max; nproc; grep MemTotal /proc/meminfo")  # fmt: skip
    assert result.returncode == 0, result
    quota, nproc, memtotal = result.stdout.splitlines()
    assert quota == "50000 100000" and nproc == "1"
    assert 200_000 < int(memtotal.split()[1]) <= 256 * 1024


def test_two_vcpus_for_one_and_a_half_cpus(cli):
    result = cli("run", "--cpus", "1.5", "--", "sh", "-c", "nproc; cat /sys/fs/cgroup/init/cpu.max")
    assert result.stdout.splitlines() == ["2", "150000 100000"], result


def test_disk_size_sets_the_writable_space(cli):
    result = cli("run", "--disk-size", "300", "--", "sh", "-c", "df -m / | tail -1")
    size_mb = int(result.stdout.split()[1])
    assert 250 <= size_mb <= 300, result
