"""Bad input gets one line naming the value and the fix, and exit 2: never a traceback (issue 10, items 13 and 19).

Every case here fails before a VM would boot, so these run the real console script without one.
"""

from __future__ import annotations

import pytest

from matchlock.api.errors import UsageError
from matchlock.cli.common import parse_forwards
from matchlock.cli.main import one_line
from matchlock.sandbox.portforward import ForwardSpec


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result
    for needle in needles:
        assert needle in lines[0], result


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["run", "-w", "relative/dir", "--", "true"], ["--workdir", "relative/dir", "absolute"]),
        (["run", "--disk-size", "16777216", "--", "true"], ["--disk-size 16777216", "1048576"]),
        (["run", "--cpus", "0.001", "--", "true"], ["--cpus 0.001", "at least 0.1"]),
        (["run", "--", "echo", *["a" * 100_000] * 3], ["command", "262144"]),
        (["run", *[f"-eV{i}=" + "b" * 100_000 for i in range(11)], "--", "true"], ["environment", "1048576"]),
        (["run", "--image", "\udcff\udcfe", "--", "true"], ["not valid UTF-8"]),
        (["allow-list", "add", "vm-00000000", "bad host"], ["'bad host'"]),
        (["kill", "vm-00000000", "--all"], ["not both"]),
        (["rm", "vm-00000000", "--stopped"], ["not both"]),
        (["run", "-p", "8080:80", "-p", "8080:81", "--", "true"], ["8080", "twice"]),
        (["port-forward", "vm-00000000", "8080:80", "8080:81"], ["8080", "twice"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, args, needles):
    _one_line_error(cli(*args), *needles)


def test_binary_env_file(cli, tmp_path):
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"\x00\x9a\xff\xfe" * 20)
    _one_line_error(cli("run", "--env-file", str(binary), "--", "true"), str(binary), "not UTF-8")


@pytest.mark.parametrize("variable", ["MATCHLOCK_STATE_DIR", "MATCHLOCK_CACHE_DIR"])
def test_directory_variable_naming_a_file(cli, tmp_path, variable):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for args in (["list"], ["run", "--", "true"]) if variable == "MATCHLOCK_STATE_DIR" else (["run", "--", "true"],):
        _one_line_error(cli(*args, env={variable: str(a_file)}), variable, "not a directory")


def test_bad_boot_timeout_breaks_neither_help_nor_the_message(cli):
    env = {"MATCHLOCK_BOOT_TIMEOUT": "abc"}
    help_text = cli("run", "--help", env=env)
    assert help_text.returncode == 0 and "--timeout" in help_text.stdout, help_text
    _one_line_error(cli("run", "--", "true", env=env), "MATCHLOCK_BOOT_TIMEOUT='abc'")


def test_long_values_are_cut_in_errors(cli):
    result = cli("run", "-e", "bad key " + "x" * 5000, "--", "true")
    assert result.returncode == 2 and len(result.stderr) < 600, result
    assert "x...[5002 characters] use letters" in result.stderr, result  # the quote and colon count too
    assert one_line("value " + "y" * 5000 + " fix: do this") == f"value {'y' * 80}...[5000 characters] fix: do this"


def test_docker_publish_form_is_accepted():
    assert parse_forwards(("127.0.0.1:8080:80",), ()) == ([ForwardSpec(8080, 80)], ["127.0.0.1"])
    assert parse_forwards(("[::1]:8080:80", "[::1]:90:90"), ()) == (
        [ForwardSpec(8080, 80), ForwardSpec(90, 90)],
        ["::1"],
    )
    assert parse_forwards(("8080:80",), ("0.0.0.0",)) == ([ForwardSpec(8080, 80)], ["0.0.0.0"])
    with pytest.raises(UsageError, match="same ADDRESS"):
        parse_forwards(("127.0.0.1:8080:80", "9090:90"), ())
    with pytest.raises(UsageError, match="--address says"):
        parse_forwards(("127.0.0.2:8080:80",), ("127.0.0.1",))


def test_diagnose_prints_the_kernel_fix_once(cli, tmp_path):
    result = cli("diagnose", env={"MATCHLOCK_KERNEL": str(tmp_path / "no-such-vmlinux")})
    kernel = [line for line in result.stdout.splitlines() if "MATCHLOCK_KERNEL" in line]
    assert sum("point MATCHLOCK_KERNEL at a kernel image" in line for line in kernel) == 1, result
