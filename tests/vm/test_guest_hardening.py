"""What unprivileged workloads see of /dev, /proc and /sys (issue 10, items 2 and 3).

The default user is root inside the guest, so every check here runs as root:
file modes protect nothing, only the workload's own /dev, read-only mounts
and dropped capabilities do. A privileged sandbox keeps the full view.
"""

from __future__ import annotations

import pytest

from matchlock.sandbox.sandbox import ExecSpec
from matchlock.wire.agent import TerminalSize

pytestmark = [pytest.mark.vm]

# Each write prints its name only if it succeeded.
KERNEL_WRITES = {
    "ip_forward": "echo 1 > /proc/sys/net/ipv4/ip_forward",
    "route_localnet": "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet",
    "hostname": "echo pwned > /proc/sys/kernel/hostname",
    "randomize_va_space": "echo 0 > /proc/sys/kernel/randomize_va_space",
    "panic_on_oops": "echo 0 > /proc/sys/kernel/panic_on_oops",
    "drop_caches": "echo 3 > /proc/sys/vm/drop_caches",
}
WRITE_ALL = "; ".join(f"({command}) 2>/dev/null && echo {name}" for name, command in KERNEL_WRITES.items())
DISKS = "for d in /dev/vda /dev/vdb /dev/vdc; do head -c 512 $d >/dev/null 2>&1 && echo $d; done"


def sh(box, loop_thread, command: str, **kwargs):
    return loop_thread.run(box.exec(ExecSpec(command, **kwargs)))


@pytest.fixture(scope="module")
def privileged(vm_prerequisites, loop_thread, module_state_dir):
    from matchlock.api.config import SandboxConfig
    from matchlock.sandbox.sandbox import Sandbox

    box = loop_thread.run(Sandbox.create(SandboxConfig(image="matchlock/busybox:builtin", privileged=True)))
    yield box
    loop_thread.run(box.aclose())


def test_workloads_get_a_dev_without_the_disks(sandbox, loop_thread):
    result = sh(sandbox, loop_thread, f"ls /dev; echo --; {DISKS}; echo --; ls /sys/block")
    listing, readable, blocks = result.stdout.decode().split("--\n")
    assert set(listing.split()) == {
        "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty",
        "urandom", "zero",
    }  # fmt: skip
    assert readable == ""
    assert {"vda", "vdb", "vdc"} <= set(blocks.split())  # the disks exist; they are just out of reach
    # Nor can a workload make its own node for a disk, nor use one the image ships.
    made = sh(sandbox, loop_thread, "mknod /vda b $(tr : ' ' < /sys/block/vda/dev) && head -c 1 /vda && echo read")
    assert made.exit_code != 0 and b"read" not in made.stdout, made
    assert "nodev" in _mount_options(sandbox, loop_thread, "/")


def _mount_options(box, loop_thread, path: str) -> list[str]:
    """The options of the mount at `path` that the workload sees (the last one mounted there)."""
    table = sh(box, loop_thread, "cat /proc/self/mounts").stdout.decode().splitlines()
    return [line.split()[3].split(",") for line in table if line.split()[1] == path][-1]


def test_the_small_dev_still_works(sandbox, loop_thread):
    script = (
        "echo x > /dev/null && head -c 3 /dev/zero | wc -c && head -c 5 /dev/urandom | wc -c"
        " && (echo x > /dev/full) 2>/dev/null || echo full-refused; echo shm > /dev/shm/f && cat /dev/shm/f"
    )
    result = sh(sandbox, loop_thread, script, user="nobody")  # the nodes are 0666
    assert result.stdout.decode().split() == ["3", "5", "full-refused", "shm"], result
    assert sh(sandbox, loop_thread, "echo via-fd > /dev/stdout").stdout == b"via-fd\n"


def test_terminals_work_in_the_small_dev(sandbox, loop_thread):
    out = bytearray()
    command = "tty; test -c $(tty) && echo is-char; echo ctty > /dev/tty"

    async def run():
        return await sandbox.start_exec(ExecSpec(command), on_stdout=out.extend, tty=TerminalSize(24, 80)).wait()

    result = loop_thread.run(run())
    lines = out.decode().split()
    assert result.exit_code == 0 and lines[0].startswith("/dev/pts/") and lines[1:] == ["is-char", "ctty"], out


def test_workloads_cannot_change_kernel_settings(sandbox, loop_thread):
    before = sh(sandbox, loop_thread, "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/hostname").stdout
    result = sh(sandbox, loop_thread, WRITE_ALL)
    assert result.stdout == b"", result
    assert sh(sandbox, loop_thread, "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/hostname").stdout == before
    # Reading stays possible (tools read their limits there).
    assert sh(sandbox, loop_thread, "cat /proc/sys/kernel/pid_max").stdout.strip().isdigit()
    assert "ro" in _mount_options(sandbox, loop_thread, "/sys")
    assert "ro" in _mount_options(sandbox, loop_thread, "/sys/fs/cgroup")  # still mounted, for limit checks


def test_leaky_kernel_files_are_masked(sandbox, loop_thread):
    script = (
        "for f in /proc/keys /proc/timer_list /proc/sched_debug; do test -e $f && wc -c < $f; done; ls /sys/firmware"
    )
    result = sh(sandbox, loop_thread, script)
    sizes = result.stdout.split()
    assert sizes and set(sizes) == {b"0"}, result  # present files read as empty, the directory is empty


def test_privileged_sandboxes_keep_the_full_view(privileged, loop_thread):
    result = sh(privileged, loop_thread, f"{DISKS}; echo --; {WRITE_ALL}")
    readable, written = result.stdout.decode().split("--\n")
    assert readable.split() == ["/dev/vda", "/dev/vdb", "/dev/vdc"], result
    assert {"ip_forward", "hostname", "randomize_va_space", "drop_caches"} <= set(written.split()), result


# Docker's default capabilities, without CAP_MKNOD: a node made anywhere would reach the disks /dev hides.
WORKLOAD_CAPABILITIES = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6,
    "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_RAW": 13, "CAP_SYS_CHROOT": 18,
    "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31,
}  # fmt: skip
CAP_SYSLOG = 34


def _capabilities(box, loop_thread, **kwargs) -> dict[str, int]:
    status = sh(box, loop_thread, "grep ^Cap /proc/self/status", **kwargs).stdout.decode()
    return {name: int(value, 16) for name, value in (line.split(":") for line in status.splitlines())}


def test_root_workloads_keep_only_dockers_capabilities(sandbox, loop_thread):
    kept = sum(1 << bit for bit in WORKLOAD_CAPABILITIES.values())
    assert _capabilities(sandbox, loop_thread) == {
        "CapInh": 0, "CapPrm": kept, "CapEff": kept, "CapBnd": kept, "CapAmb": 0,
    }  # fmt: skip
    assert _capabilities(sandbox, loop_thread, user="nobody") == {
        "CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": kept, "CapAmb": 0,
    }  # fmt: skip
    # No kernel log (klogctl needs CAP_SYSLOG once dmesg_restrict is set), and no way to lift the restriction.
    script = "dmesg >/dev/null 2>&1 && echo log; (echo 0 > /proc/sys/kernel/dmesg_restrict) 2>/dev/null && echo lifted"
    assert sh(sandbox, loop_thread, script).stdout == b""
    # What a Docker container's root does still works: chown, switching users, a low port.
    script = (
        "touch /tmp/owned && chown nobody /tmp/owned && stat -c %U /tmp/owned; su -s /bin/sh -c 'id -u' nobody;"
        " nc -l -p 80 </dev/null & sleep 1; cat /proc/net/tcp*| grep -c ':0050 0*:0000 0A'; kill $!"
    )
    assert sh(sandbox, loop_thread, script).stdout.decode().split() == ["nobody", "65534", "1"]


def test_workloads_cannot_raise_their_own_cgroup_limits(sandbox, loop_thread):
    """The CPU cap (--cpus) lives in the cgroup the workload runs in: as root it could lift it. cgroupfs is
    read-only in its view, so neither the limits nor its own cgroup membership can change."""
    script = (
        'g=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); before=$(cat $g/cpu.max); test -n "$before" || exit 9;'
        " (echo max > $g/cpu.max) 2>/dev/null && echo wrote-cpu; (echo max > $g/memory.max) 2>/dev/null && echo"
        " wrote-memory; (echo $$ > /sys/fs/cgroup/cgroup.procs) 2>/dev/null && echo moved; mkdir"
        ' /sys/fs/cgroup/escape 2>/dev/null && echo made; test "$(cat $g/cpu.max)" = "$before" && echo kept'
    )
    result = sh(sandbox, loop_thread, script)
    assert result.stdout == b"kept\n", result


def test_privileged_sandboxes_keep_every_capability(privileged, loop_thread):
    capabilities = _capabilities(privileged, loop_thread)
    assert capabilities["CapEff"] >> CAP_SYSLOG & 1 and capabilities["CapEff"] == capabilities["CapBnd"]
