"""Boot the fallback kernel (Debian cloud kernel + matchlock initramfs) for real.

QEMU `-M microvm` under TCG with ACPI on, the devices the VM layer attaches
(runtime, lower, upper disks by serial, the agent virtio-serial port,
virtio-rng) and a decoy disk in front, so the initramfs must find the runtime
disk by its serial. The test runtime disk is an erofs image holding
busybox-static and an /init shell script that reports what it sees and
reboots (`-no-reboot` turns that into a QEMU exit).

The tuned kernel is booted the same way when it has been built
(`matchlock kernel build`, which scripts/setup.sh runs); like every VM test,
it fails with the fix rather than skipping when that is missing.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from matchlock.kernel import fallback
from matchlock.kernel.resolve import TUNED_CMDLINE, find_tuned
from matchlock.vm.accel import host_tsc_khz

pytestmark = pytest.mark.vm


@pytest.fixture(autouse=True, scope="module")
def host_tools() -> None:
    """Fail (not skip) with the fix, like the other VM tests."""
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("mkfs.erofs", "erofs-utils")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run scripts/setup.sh (apt-get install {package})")


MARKER = "MATCHLOCK-KERNEL-TEST"

GUEST_INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
root=$(awk '$2 == "/" {print $3}' /proc/mounts)
dev=$(awk '$2 == "/dev" {print $3}' /proc/mounts)
agent=none
for d in /sys/class/virtio-ports/*; do
    [ "$(cat $d/name 2>/dev/null)" = matchlock.agent ] && agent=${d##*/}
done
fs=$(grep -ow -e erofs -e overlay -e fuse -e ext4 /proc/filesystems | sort -u | tr '\n' ,)
disks=$(for f in /sys/block/vd*/serial; do echo "$(cat $f)"; done | sort | tr '\n' ,)
rng=$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c)
echo "MATCHLOCK-KERNEL-TEST pid=$$ root=$root dev=$dev which=$(cat /which) agent=$agent hwrng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null) rngbytes=$rng year=$(date +%Y) fs=$fs disks=$disks uptime=$(cut -d' ' -f1 /proc/uptime)"
mkdir -p /tmp/lower
mount -t erofs -o ro /dev/$(grep -l lower /sys/block/vd*/serial | cut -d/ -f4) /tmp/lower && \
    mkdir -p /tmp/up /tmp/work /tmp/merged && \
    mount -t overlay overlay -o lowerdir=/tmp/lower,upperdir=/tmp/up,workdir=/tmp/work /tmp/merged && \
    echo "MATCHLOCK-OVERLAY $(cat /tmp/merged/which)"
reboot -f
"""


def tsc_khz() -> int:
    """microvm under TCG hangs at random in TSC calibration without `tsc_early_khz=`."""
    khz = host_tsc_khz()
    if not khz:
        pytest.fail(
            "cannot find the host TSC frequency in the kernel log or /proc/cpuinfo; "
            "run the tests as root so `dmesg` is readable"
        )
    return khz


def make_erofs(tmp_path: Path, name: str, busybox: Path | None, init: str | None) -> Path:
    root = tmp_path / f"{name}-root"
    for directory in ("bin", "dev", "proc", "sys", "tmp"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "which").write_text(name + "\n")
    if busybox is not None:
        shutil.copy2(busybox, root / "bin" / "busybox")
        for applet in (
            "sh",
            "mount",
            "awk",
            "cat",
            "echo",
            "grep",
            "sort",
            "cut",
            "tr",
            "mkdir",
            "reboot",
            "ls",
            "dd",
            "wc",
            "date",
        ):
            (root / "bin" / applet).symlink_to("busybox")
    if init is not None:
        (root / "init").write_text(init)
        (root / "init").chmod(0o755)
    image = tmp_path / f"{name}.erofs"
    subprocess.run(["mkfs.erofs", "--all-root", "--quiet", str(image), str(root)], check=True, capture_output=True)
    return image


@pytest.fixture()
def disks(tmp_path, busybox_path) -> dict[str, Path]:
    upper = tmp_path / "upper.img"
    with open(upper, "wb") as f:
        f.truncate(16 << 20)
    return {
        "decoy": make_erofs(tmp_path, "decoy", busybox_path, "#!/bin/sh\necho WRONG-DISK-BOOTED\nreboot -f\n"),
        "runtime": make_erofs(tmp_path, "runtime", busybox_path, GUEST_INIT),
        "lower": make_erofs(tmp_path, "lower", None, None),
        "upper": upper,
    }


def qemu_argv(
    kernel: Path, initrd: Path | None, cmdline: tuple[str, ...], acpi: bool, disks: list[tuple[str, Path]], sock: Path
) -> list[str]:
    # Keep QEMU's RTC: with rtc=off the kernel waits 1 s for the CMOS clock early in
    # boot ("Unable to read current time from RTC") and the guest starts in 1970. The
    # tuned kernel has no CMOS RTC driver, so nothing in it claims IRQ 8.
    machine = "microvm" if acpi else "microvm,acpi=off"
    append = [
        "console=ttyS0",
        "panic=-1",
        "reboot=t",
        f"tsc_early_khz={tsc_khz()}",
        "quiet",
        "mitigations=off",
        *cmdline,
    ]
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-M",
        machine,
        "-m",
        "512",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-append",
        " ".join(append),
    ]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    for serial, path in disks:
        readonly = ",readonly=on" if path.suffix == ".erofs" else ""
        argv += [
            "-drive",
            f"id={serial},file={path},format=raw,if=none{readonly}",
            "-device",
            f"virtio-blk-device,drive={serial},serial={serial}",
        ]
    argv += [
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=agent,path={sock},server=on,wait=off",
        "-device",
        "virtserialport,chardev=agent,name=matchlock.agent",
        "-device",
        "virtio-rng-device",
    ]
    return argv


def boot(argv: list[str], timeout: float = 180) -> tuple[str, float | None, float]:
    """Run QEMU to exit; returns (console output, seconds to the marker, seconds to exit)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = b""
    marker_at = None
    try:
        fd = proc.stdout.fileno()
        while True:
            remaining = started + timeout - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"QEMU did not exit within {timeout} s; console:\n{output.decode(errors='replace')}"
                )
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            output += chunk
            if marker_at is None and MARKER.encode() in output:
                marker_at = time.monotonic() - started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return output.decode(errors="replace"), marker_at, time.monotonic() - started


def report(output: str) -> dict[str, str]:
    line = next((ln for ln in output.splitlines() if ln.startswith(MARKER)), None)
    assert line is not None, f"marker missing; console:\n{output}"
    return dict(field.split("=", 1) for field in line.split()[1:] if "=" in field)


def assert_booted_runtime(seen: dict[str, str]) -> None:
    """What /init on the runtime disk saw: it is PID 1 on the runtime erofs with the VM layer's devices."""
    assert seen["pid"] == "1"
    assert seen["root"] == "erofs"
    assert seen["which"] == "runtime"
    assert seen["dev"] == "devtmpfs"
    assert seen["agent"].startswith("vport")
    assert seen["hwrng"].startswith("virtio_rng")
    assert seen["rngbytes"] == "16"
    assert int(seen["year"]) >= 2024  # the wall clock came from QEMU's RTC
    assert seen["fs"] == "erofs,ext4,fuse,overlay,"


def test_fallback_kernel_boots_runtime_disk_by_serial(tmp_path, disks):
    kernel = fallback.build_fallback()
    argv = qemu_argv(
        kernel.vmlinuz,
        kernel.initrd,
        fallback.FALLBACK_CMDLINE,
        True,
        [
            ("decoy", disks["decoy"]),
            ("runtime", disks["runtime"]),
            ("lower", disks["lower"]),
            ("upper", disks["upper"]),
        ],
        tmp_path / "agent.sock",
    )
    output, marker_at, total = boot(argv)
    assert "FATAL" not in output, output
    assert "WRONG-DISK-BOOTED" not in output, output
    seen = report(output)
    print(
        f"fallback {kernel.release}: marker after {marker_at:.2f} s, exit after {total:.2f} s, guest uptime {seen['uptime']} s"
    )
    assert_booted_runtime(seen)
    assert seen["disks"] == "decoy,lower,runtime,upper,"
    assert "MATCHLOCK-OVERLAY lower" in output


def test_tuned_kernel_boots_runtime_disk(tmp_path, disks):
    vmlinux = find_tuned()
    if vmlinux is None:
        pytest.fail("the tuned kernel is not built: run `matchlock kernel build` (or scripts/setup.sh)")
    argv = qemu_argv(
        vmlinux,
        None,
        TUNED_CMDLINE,
        False,
        [("runtime", disks["runtime"]), ("lower", disks["lower"]), ("upper", disks["upper"])],
        tmp_path / "agent.sock",
    )
    output, marker_at, total = boot(argv)
    seen = report(output)
    print(
        f"tuned {vmlinux.parent.name}: marker after {marker_at:.2f} s, exit after {total:.2f} s, guest uptime {seen['uptime']} s"
    )
    assert_booted_runtime(seen)
    assert seen["disks"] == "lower,runtime,upper,"
    assert "MATCHLOCK-OVERLAY lower" in output
