"""Build the tuned guest kernel from Debian's `linux-source-6.1`.

The kernel is `make tinyconfig` plus the fragment `x86_64.config`, everything
built in, booted by QEMU as the uncompressed PVH `vmlinux`. A build takes a
few minutes; the result is published to
`kernels_dir()/<linux-source version>-<confighash12>/` and every later run
reuses it, so the cache makes later runs free. `matchlock setup` runs it in
the background (`background.py`), which also installs the build packages:
the first sandbox needs none of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..api.errors import KernelError, SetupError
from ..api.paths import kernels_dir
from ..util.fs import file_lock, staging_dir
from . import background
from .resolve import CONFIG_FRAGMENT, find_tuned, tuned_config_hash, tuned_dir_name

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_TOPDIR = "linux-source-6.1"  # the directory inside the tarball
# libc6-dev: gcc only recommends it, and the kernel's host tools need its headers
BUILD_PACKAGES = (SOURCE_PACKAGE, "bc", "bison", "flex", "libelf-dev", "libssl-dev", "libc6-dev")
# programs the kernel build runs that the packages above do not bring
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "ld": "binutils", "xz": "xz-utils", "perl": "perl", "readelf": "binutils"}

PVH_NOTE_TYPE = 0x12  # XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point QEMU looks for

Log = Callable[[str], None]

_CONFIG_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_NOT_SET_LINE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_COMPILE_LINE = re.compile(r"^\s+(CC|AS|LD|AR)\s")


# --------------------------------------------------------------------------- config checks


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_ name -> value of a .config or fragment; `# CONFIG_X is not set` is "n"."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _CONFIG_LINE.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _NOT_SET_LINE.match(line):
            values[m.group(1)] = "n"
    return values


def options_not_applied(fragment: str, dotconfig: str) -> list[str]:
    """Fragment options whose value is not the one in the final .config.

    Each entry reads `CONFIG_X: wanted y, got n` (an option absent from the
    .config counts as "n": Kconfig dropped it, usually for an unmet dependency).
    """
    have = parse_config(dotconfig)
    missing = []
    for name, wanted in parse_config(fragment).items():
        got = have.get(name, "n")
        if got != wanted:
            missing.append(f"{name}: wanted {wanted}, got {got if name in have else 'n (dropped)'}")
    return missing


def has_pvh_note(readelf_notes: str) -> bool:
    """Whether `readelf -n` output shows a Xen note of type 0x12 (the PVH entry)."""
    for line in readelf_notes.splitlines():
        fields = line.split()
        if not fields or fields[0] != "Xen":
            continue
        if f"0x{PVH_NOTE_TYPE:08x}" in line or "PHYS32_ENTRY" in line.upper():
            return True
    return False


def _pvh_note_present(vmlinux: Path) -> bool:
    proc = subprocess.run(["readelf", "-n", str(vmlinux)], capture_output=True, text=True)
    return proc.returncode == 0 and has_pvh_note(proc.stdout)


# --------------------------------------------------------------------------- prerequisites


def _dpkg_installed(packages: tuple[str, ...]) -> set[str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
    )
    installed = set()
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].startswith("ii"):
            installed.add(fields[0].split(":")[0])
    return installed


def missing_prerequisites() -> list[str]:
    """The Debian packages the build needs that are not installed (or whose files are gone)."""
    if shutil.which("dpkg-query") is None:
        raise SetupError("building the kernel needs a Debian host (dpkg-query not found)")
    installed = _dpkg_installed(BUILD_PACKAGES)
    missing = [p for p in BUILD_PACKAGES if p not in installed]
    if SOURCE_PACKAGE in installed and not SOURCE_TARBALL.is_file():
        missing.append(SOURCE_PACKAGE)  # installed but the tarball was deleted: reinstall
    for tool, package in BUILD_TOOLS.items():
        if shutil.which(tool) is None and package not in missing:
            missing.append(package)
    return missing


def check_prerequisites() -> None:
    """Raise SetupError naming the exact apt-get command when something is missing."""
    missing = missing_prerequisites()
    if missing:
        raise SetupError(
            f"building the kernel needs {', '.join(missing)}\n  fix: apt-get install -y {' '.join(missing)}"
        )


def install_prerequisites(log: Log) -> None:
    """apt-get install what the build lacks (root only); the package lists are refreshed once if stale."""
    missing = missing_prerequisites()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SetupError(
            f"building the kernel needs {', '.join(missing)}, and only root can install them\n"
            f"  fix: sudo apt-get install -y {' '.join(missing)}"
        )
    log(f"installing the kernel build packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Wait for another apt (the user's, or setup.sh --test) rather than fail at once.
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", *missing]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # usually package lists older than the mirror: refresh them once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join("  | " + line for line in (proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise SetupError(f"{' '.join(argv)} failed (exit {proc.returncode})\n{tail}\n  fix: run it by hand and retry")
    check_prerequisites()


def source_version() -> str:
    """Debian version of the installed linux-source package, e.g. `6.1.192-3`."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", SOURCE_PACKAGE], capture_output=True, text=True)
    except FileNotFoundError:
        raise SetupError("building the kernel needs a Debian host (dpkg-query not found)") from None
    version = proc.stdout.strip()
    if proc.returncode != 0 or not version:
        raise SetupError(f"{SOURCE_PACKAGE} is not installed\n  fix: apt-get install -y {' '.join(BUILD_PACKAGES)}")
    return version


def _jobs(jobs: int | None) -> int:
    if jobs is not None:
        if jobs < 1:
            raise KernelError(f"--jobs must be at least 1, got {jobs}")
        return jobs
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- build


def tuned_kernel_dir(version: str) -> Path:
    return kernels_dir() / tuned_dir_name(version)


def cached_tuned() -> Path | None:
    """The tuned kernel `build_tuned()` would return without building, if any.

    That is the one for the installed linux-source version; when the source
    package is gone, any cached build of the current config will do.
    """
    try:
        version = source_version()
    except SetupError:
        return find_tuned()
    target = tuned_kernel_dir(version) / "vmlinux"
    return target if target.is_file() else None


def build_tuned(jobs: int | None = None, log: Log = print, *, install_deps: bool = False) -> Path:
    """Build (or reuse) the tuned kernel and return the path of its `vmlinux`.

    One build at a time (background.lock_path()): a second caller waits for the
    first and then reuses its kernel. `install_deps` apt-installs the build packages.
    """
    cached = cached_tuned()
    if cached is not None:
        return cached
    nproc = _jobs(jobs)
    with file_lock(background.lock_path()):
        cached = cached_tuned()  # another process built it while we waited
        if cached is not None:
            return cached
        background.record("running")
        try:
            target = _build_locked(nproc, log, install_deps)
        except Exception as exc:
            background.record("failed", error=(str(exc) or type(exc).__name__)[:4000])
            raise
        background.clear_record()
        return target


def _build_locked(nproc: int, log: Log, install_deps: bool) -> Path:
    if install_deps:
        install_prerequisites(log)
    else:
        check_prerequisites()
    version = source_version()
    final = tuned_kernel_dir(version)
    target = final / "vmlinux"
    if target.is_file():
        return target
    started = time.monotonic()
    work = background.build_root() / tuned_dir_name(version)
    log_path = work / "build.log"
    tree = _prepare_tree(work, log)
    with open(log_path, "ab") as log_file:
        _configure(tree, log_file, log_path, log)
        _make(tree, nproc, log_file, log_path, log)
    vmlinux = tree / "vmlinux"
    _strip_if_smaller(vmlinux, log)
    if not _pvh_note_present(vmlinux):
        raise KernelError(
            f"the built {vmlinux} has no PVH entry note, so QEMU cannot boot it\n"
            f"  fix: make sure the config fragment keeps CONFIG_PVH=y; build log: {log_path}"
        )
    seconds = round(time.monotonic() - started, 1)
    build = {"source_version": version, "config_sha256": tuned_config_hash(), "build_seconds": seconds, "jobs": nproc}
    _publish(tree, final, build)
    shutil.rmtree(work, ignore_errors=True)
    log(f"kernel built in {seconds:.0f} s: {target}")
    return target


def _publish(tree: Path, final: Path, build: dict) -> None:
    """Copy the kernel and its config into the cache, with `build.json` describing the build."""
    vmlinux = tree / "vmlinux"
    with staging_dir(final) as stage:
        shutil.copy2(vmlinux, stage / "vmlinux")
        shutil.copy2(tree / ".config", stage / "config")
        record = {
            "version": tuned_dir_name(build["source_version"]),
            "source_package": SOURCE_PACKAGE,
            **build,
            "kernel_release": (tree / "include/config/kernel.release").read_text().strip(),
            "vmlinux_bytes": vmlinux.stat().st_size,
        }
        (stage / "build.json").write_text(json.dumps(record, indent=2) + "\n")


def _run_logged(argv: list[str], cwd: Path, log_file, log_path: Path, what: str, env=None) -> None:
    log_file.write(f"\n$ {' '.join(argv)}\n".encode())
    log_file.flush()
    proc = subprocess.run(argv, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise KernelError(f"{what} failed (exit {proc.returncode})\n{_tail(log_path)}\n  full log: {log_path}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("  | " + line for line in text[-lines:])


def _prepare_tree(work: Path, log: Log) -> Path:
    """Unpack the source once; a tree left by an interrupted build is reused."""
    tree = work / SOURCE_TOPDIR
    marker = work / ".unpacked"
    if marker.is_file() and tree.is_dir():
        log(f"reusing unpacked source in {tree}")
        return tree
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log(f"unpacking {SOURCE_TARBALL} ...")
    proc = subprocess.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(work)], capture_output=True, text=True)
    if proc.returncode != 0 or not tree.is_dir():
        raise KernelError(
            f"could not unpack {SOURCE_TARBALL}: {proc.stderr.strip()}\n  fix: apt-get install --reinstall {SOURCE_PACKAGE}"
        )
    marker.write_text("")
    return tree


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    # Keep the host's user and host name out of the guest's `uname -v`.
    env.update({"KBUILD_BUILD_USER": "matchlock", "KBUILD_BUILD_HOST": "matchlock", "LC_ALL": "C"})
    env.pop("ARCH", None)
    env.pop("CROSS_COMPILE", None)
    return env


def _configure(tree: Path, log_file, log_path: Path, log: Log) -> None:
    log("configuring (tinyconfig + matchlock fragment) ...")
    env = _build_env()
    fragment = tree / "matchlock.fragment"
    fragment.write_bytes(CONFIG_FRAGMENT.read_bytes())
    _run_logged(["make", "tinyconfig"], tree, log_file, log_path, "make tinyconfig", env)
    _run_logged(
        ["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)],
        tree,
        log_file,
        log_path,
        "merge_config.sh",
        env,
    )
    _run_logged(["make", "olddefconfig"], tree, log_file, log_path, "make olddefconfig", env)
    verify_config(CONFIG_FRAGMENT.read_text(), (tree / ".config").read_text())


def verify_config(fragment: str, dotconfig: str) -> None:
    missing = options_not_applied(fragment, dotconfig)
    if missing:
        raise KernelError(
            f"{len(missing)} option(s) of {CONFIG_FRAGMENT.name} did not stick after `make olddefconfig` "
            "(unmet dependencies or misspelt names):\n"
            + "\n".join("  " + m for m in missing)
            + f"\n  fix: add the options they depend on to {CONFIG_FRAGMENT}"
        )


def _make(tree: Path, jobs: int, log_file, log_path: Path, log: Log) -> None:
    argv = ["make", f"-j{jobs}", "vmlinux"]
    log_file.write(f"\n$ {' '.join(argv)}\n".encode())
    log_file.flush()
    started = last_report = time.monotonic()
    compiled = 0
    log(f"compiling with {jobs} job(s); log: {log_path}")
    proc = subprocess.Popen(argv, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_build_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        log_file.write(line)
        if _COMPILE_LINE.match(line.decode(errors="replace")):
            compiled += 1
        now = time.monotonic()
        if now - last_report >= 10:
            last_report = now
            log(f"compiling: {compiled} steps done, {now - started:.0f} s elapsed")
    rc = proc.wait()
    log_file.flush()
    if rc != 0:
        raise KernelError(f"make vmlinux failed (exit {rc})\n{_tail(log_path)}\n  full log: {log_path}")
    log(f"compiled {compiled} steps in {time.monotonic() - started:.0f} s")


def _strip_if_smaller(vmlinux: Path, log: Log) -> None:
    """Drop debug sections when that shrinks the file and keeps the PVH note."""
    stripped = vmlinux.with_name("vmlinux.stripped")
    proc = subprocess.run(["strip", "--strip-debug", "-o", str(stripped), str(vmlinux)], capture_output=True, text=True)
    if proc.returncode != 0 or not stripped.is_file():
        log(f"strip failed, keeping the unstripped vmlinux: {proc.stderr.strip()}")
        return
    before, after = vmlinux.stat().st_size, stripped.stat().st_size
    if after < before and _pvh_note_present(stripped):
        os.replace(stripped, vmlinux)
        log(f"stripped debug symbols: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    else:
        stripped.unlink()
