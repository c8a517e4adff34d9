"""`matchlock setup linux`: the one privileged step that lets ordinary users run sandboxes.

Sandboxes need no root: each one's network namespace is owned by a user
namespace of its own, QEMU runs as the user, and image disks are built under
fakeroot. What an ordinary user may lack is host configuration, and only that
is changed here: unprivileged user namespaces (when a sysctl turns them off),
/dev/net/tun's mode (0666 on most distributions; a TAP can still only be made
inside a network namespace one owns), fakeroot, and the kvm group when
/dev/kvm is usable. Each change is also persisted across reboots. The same
checks back `matchlock diagnose` (`rootless_checks`), so it says what the
current user lacks and that this command is the fix.

`cli/setup.py` defines the `setup` group and registers `linux` as its subcommand.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click

TUN = Path("/dev/net/tun")
UDEV_RULE = Path("/etc/udev/rules.d/60-matchlock-tun.rules")
SYSCTL_CONF = Path("/etc/sysctl.d/60-matchlock-userns.conf")
FIX = "sudo matchlock setup linux"
# (sysctl, the value that forbids unprivileged user namespaces, the value that allows them)
USERNS_SYSCTLS = (
    ("kernel.unprivileged_userns_clone", "0", "1"),  # Debian before 11 and some hardened kernels
    ("user.max_user_namespaces", "0", "15000"),
    ("kernel.apparmor_restrict_unprivileged_userns", "1", "0"),  # Ubuntu 23.10+
)


@dataclass(frozen=True)
class Need:
    """One thing an ordinary user lacks, and how `setup linux` provides it."""

    name: str
    problem: str
    apply: tuple[str, ...]  # what setup linux does, as a sentence per step


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def _kvm_usable() -> bool:
    """Whether /dev/kvm would accelerate sandboxes for a user allowed to open it."""
    from ..vm.accel import hardware_kvm_available

    ok, why = hardware_kvm_available()
    return ok or why.startswith("/dev/kvm is not readable")


def needs(user: str | None) -> list[Need]:
    """What `user` (None: an ordinary user in general) lacks to run sandboxes without root."""
    found = []
    for name, off, on in USERNS_SYSCTLS:
        if _sysctl(name) == off:
            found.append(Need("user-namespaces", f"{name} = {off} forbids unprivileged user namespaces",
                              (f"set {name} = {on} (now and in {SYSCTL_CONF})",)))  # fmt: skip
    try:
        mode = stat.S_IMODE(TUN.stat().st_mode)
    except OSError:
        found.append(Need("tun", f"{TUN} does not exist (no tun driver)", ("load the tun module (modprobe tun)",)))
    else:
        if mode & 0o006 != 0o006:
            found.append(Need("tun", f"{TUN} is mode {mode:04o}: only its owner can make a TAP",
                              (f"chmod 0666 {TUN} (now and by the udev rule {UDEV_RULE})",)))  # fmt: skip
    if shutil.which("fakeroot") is None:
        found.append(Need("fakeroot", "fakeroot is missing: image disks keep their owners only through it",
                          ("apt-get install fakeroot",)))  # fmt: skip
    if user is not None and _kvm_usable():
        try:
            kvm = grp.getgrgid(os.stat("/dev/kvm").st_gid)
        except (OSError, KeyError):
            kvm = None
        entry = pwd.getpwnam(user)
        if kvm is not None and kvm.gr_gid != entry.pw_gid and user not in kvm.gr_mem and kvm.gr_name != "root":
            found.append(Need("kvm", f"{user} is not in the {kvm.gr_name} group that owns /dev/kvm",
                              (f"usermod -aG {kvm.gr_name} {user} (takes effect at the next login)",)))  # fmt: skip
    return found


Row = tuple[str, Literal["pass", "fail", "warn"], str, "str | None"]


def rootless_checks() -> list[Row]:
    """(name, status, message, fix) rows for `matchlock diagnose`, about the current user."""
    if os.geteuid() == 0:
        user = os.environ.get("SUDO_USER")
        lacking = needs(user)
        if not lacking:
            return [("rootless", "pass", "ordinary users can run sandboxes (no setup needed)", None)]
        return [("rootless", "warn", f"ordinary users cannot run sandboxes yet: {n.problem}", FIX) for n in lacking]
    lacking = needs(pwd.getpwuid(os.geteuid()).pw_name)
    rows: list[Row] = [
        (f"rootless-{n.name}", "fail", n.problem, f"{FIX} (it will {'; '.join(n.apply)})") for n in lacking
    ]
    if not rows and (problem := _userns_probe()):
        rows.append(("rootless-user-namespaces", "fail", problem, f"{FIX}, or ask the administrator why"))
    return rows or [("rootless", "pass", "this user can run sandboxes without root", None)]


def _userns_probe() -> str | None:
    """What stops this user making the user + network namespace pair a sandbox needs (None: nothing)."""
    try:
        proc = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"], capture_output=True, text=True)
    except FileNotFoundError:
        return "unshare not found (apt-get install util-linux)"
    lines = proc.stderr.strip().splitlines()
    return None if proc.returncode == 0 else f"cannot make a user namespace: {lines[-1] if lines else proc.returncode}"


def _apply(need: Need, user: str | None) -> None:
    if need.name == "user-namespaces":
        lines = []
        for name, off, on in USERNS_SYSCTLS:
            if _sysctl(name) == off:
                Path("/proc/sys", *name.split(".")).write_text(on)
                lines.append(f"{name} = {on}\n")
        with open(SYSCTL_CONF, "a") as f:
            f.writelines(lines)
    elif need.name == "tun":
        if not TUN.exists():
            subprocess.run(["modprobe", "tun"], check=True)
        os.chmod(TUN, 0o666)
        UDEV_RULE.parent.mkdir(parents=True, exist_ok=True)
        UDEV_RULE.write_text(
            '# matchlock: ordinary users make TAPs in network namespaces they own\nKERNEL=="tun", MODE="0666"\n'
        )
    elif need.name == "fakeroot":
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "fakeroot"], check=True)
    elif need.name == "kvm" and user is not None:
        group = grp.getgrgid(os.stat("/dev/kvm").st_gid).gr_name
        subprocess.run(["usermod", "-aG", group, user], check=True)


@click.command()
@click.option("--user", "user", default=None, help="The user to add to the kvm group (default: $SUDO_USER).")
@click.option("--check", is_flag=True, help="Only say what would change.")
def linux(user: str | None, check: bool) -> None:
    """Let ordinary users run sandboxes (run once with sudo); changes only what is missing."""
    user = user or os.environ.get("SUDO_USER")
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise click.UsageError(f"no such user {user!r}; fix: pass --user with an existing account") from None
    lacking = needs(user)
    if not lacking:
        click.echo("Nothing to do: ordinary users can already run sandboxes.")
        return
    for need in lacking:
        click.echo(f"{need.problem}: {'; '.join(need.apply)}")
    if check:
        return
    if os.geteuid() != 0:
        raise click.ClickException(f"changing this needs root; fix: {FIX}")
    for need in lacking:
        _apply(need, user)
    click.echo("Done: ordinary users can now run sandboxes (a new group takes effect at the next login).")
