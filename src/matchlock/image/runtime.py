"""The guest runtime disk: a self-contained Python plus the guest code, read-only.

The disk is the guest kernel's root filesystem. Its `/init` is a Python
script run by Debian's interpreter with Debian's own loader and libc from the
same disk, so the guest side never depends on anything in the user's image
(which may have musl, an old glibc or no libc at all). After boot, init
pivots into the image and keeps this disk mounted where only the agent can
see it.

Two cache levels keep `matchlock run` cheap:
- the pruned, precompiled Python tree, keyed by the exact Debian package
  versions (built once; needs apt);
- the disk itself, keyed by that tree plus the guest source code, rebuilt in
  well under a second whenever `matchlock.guest` or `matchlock.wire` change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from ..api.errors import SetupError
from ..api.paths import runtime_dir
from ..util import debian
from ..util.fs import directory_digest_input, directory_stat_input, file_lock, staging_dir

# Bump when the layout of the tree or the disk changes.
BUILDER_VERSION = "1"
PYTHON = "python3.11"
PACKAGES = [
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
]
# Libraries the runtime may contain; extension modules needing anything else are dropped.
LIBRARIES = ("libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1", "libffi.so.8")
LOADER = "lib64/ld-linux-x86-64.so.2"
LIBDIR = "lib/x86_64-linux-gnu"
PRUNED_STDLIB = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "unittest/test",
    "sqlite3",
    "curses",
    "dbm",
    "msilib",
    "venv",
    "config-3.11-x86_64-linux-gnu",
    "__phello__",
    "site-packages",
    "dist-packages",
)
GUEST_PACKAGES = ("guest", "wire")
GUEST_PACKAGE_INIT = '"""matchlock guest runtime: only `guest` and `wire` ship here."""\n'
INIT_SCRIPT = f"""#!/usr/bin/{PYTHON} -IS
import sys
sys.path.insert(0, "/opt/matchlock")
from matchlock.guest.init import main
main()
"""
MOUNTPOINTS = ("dev", "proc", "sys", "run", "tmp")
DIGEST_CACHE = "guest-code.json"  # in the runtime directory: guest_code_digest's last result and its stat key
RACY_NS = 2_000_000_000


def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def guest_code_digest() -> str:
    """The digest of what the disk ships besides the tree, cached by the guest files' stat: a start reads
    and hashes no guest source unless one changed (2.8 ms for 32 files with a warm page cache)."""
    root = _source_root()
    fixed = (BUILDER_VERSION + INIT_SCRIPT + GUEST_PACKAGE_INIT).encode()
    stats = [directory_stat_input(root / package) for package in GUEST_PACKAGES]
    key = hashlib.sha256(fixed + b"".join(described for described, _ in stats)).hexdigest()
    cache = runtime_dir() / DIGEST_CACHE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # missing or damaged: hashed again
        cached = json.loads(cache.read_text())
        if cached["stat"] == key:
            return str(cached["digest"])
    h = hashlib.sha256(fixed)
    for package in GUEST_PACKAGES:
        h.update(directory_digest_input(root / package))
    digest = h.hexdigest()
    # A file changed within the timestamps' granularity could change again with the same stat: not cached.
    if time.time_ns() - max(newest for _, newest in stats) > RACY_NS:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"stat": key, "digest": digest}))
            os.replace(tmp, cache)
        except OSError:  # a cache we cannot write only costs the hashing next time
            tmp.unlink(missing_ok=True)
    return digest


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SetupError(f"{' '.join(map(str, argv[:3]))} ... failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def _python_in(tree: Path) -> list[str]:
    """Run the tree's interpreter on the host through its own loader."""
    return [str(tree / LOADER), "--library-path", str(tree / LIBDIR), str(tree / "usr/bin" / PYTHON)]


def _needed_libraries(elf: Path) -> list[str]:
    out = _run(["readelf", "-d", str(elf)]).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def _build_python_tree(target: Path, debs: dict[str, Path]) -> None:
    unpacked = target / "unpacked"
    for deb in debs.values():
        debian.extract(deb, unpacked)
    tree = target / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "lib64").mkdir()
    (tree / LIBDIR).mkdir(parents=True)
    shutil.copy2(unpacked / "usr/bin" / PYTHON, tree / "usr/bin" / PYTHON)
    shutil.copy2((unpacked / LOADER).resolve(), tree / LOADER)
    for lib in LIBRARIES:
        candidates = [unpacked / LIBDIR / lib, unpacked / "usr" / LIBDIR / lib]
        source = next((c for c in candidates if c.exists()), None)
        if source is None:
            raise SetupError(f"{lib} is missing from the downloaded Debian packages")
        shutil.copy2(source.resolve(), tree / LIBDIR / lib)

    stdlib = tree / "usr/lib" / PYTHON
    shutil.copytree(unpacked / "usr/lib" / PYTHON, stdlib, symlinks=True)
    for name in PRUNED_STDLIB:
        shutil.rmtree(stdlib / name, ignore_errors=True)
    for cache in list(stdlib.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    (stdlib / "EXTERNALLY-MANAGED").unlink(missing_ok=True)
    for module in (stdlib / "lib-dynload").glob("*.so"):
        if module.name.startswith(("_test", "xx", "_xx", "_ctypes_test")) or not set(_needed_libraries(module)) <= set(
            LIBRARIES
        ):
            module.unlink()
    missing = set(_needed_libraries(tree / "usr/bin" / PYTHON)) - set(LIBRARIES)
    if missing:
        raise SetupError(f"{PYTHON} needs libraries the runtime does not ship: {sorted(missing)}")
    _run([*_python_in(tree), "-I", "-c", "import ctypes, termios, fcntl, select, json, struct, socket"])
    _compile(tree, stdlib)
    shutil.rmtree(unpacked)


def _compile(tree: Path, directory: Path, strip_prefix: Path | None = None) -> None:
    # unchecked-hash pycs are never re-validated against the source, so the
    # guest skips a stat per import on a read-only disk that cannot change.
    argv = [*_python_in(tree), "-I", "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash"]
    if strip_prefix is not None:
        argv += ["-s", str(strip_prefix), "-p", "/"]
    _run([*argv, str(directory)])


def python_tree() -> Path:
    """The pruned interpreter tree, building it once per set of package versions."""
    base = runtime_dir()
    pointer = base / "python.current"
    if pointer.exists():
        tree = base / pointer.read_text().strip() / "tree"
        if tree.is_dir():
            return tree
    with file_lock(base / ".python.lock"):
        versions = debian.versions(PACKAGES)
        key = hashlib.sha256(json.dumps([BUILDER_VERSION, versions], sort_keys=True).encode()).hexdigest()[:16]
        name = f"python-{key}"
        if not (base / name / "tree").is_dir():
            debs = debian.download(PACKAGES)
            with staging_dir(base / name) as work:
                _build_python_tree(work, debs)
                (work / "versions.json").write_text(json.dumps(versions, indent=1))
        pointer.write_text(name + "\n")
        return base / name / "tree"


def runtime_disk_path() -> Path:
    """Where the disk for the current code lives (it may not be built yet)."""
    tree = python_tree()
    key = hashlib.sha256(f"{tree.parent.name}\n{guest_code_digest()}".encode()).hexdigest()[:16]
    return runtime_dir() / f"runtime-{key}.erofs"


KEPT_DISKS = 4  # checkouts of different guest code share the cache; each keeps its disk this long


def ensure_runtime_disk() -> Path:
    disk = runtime_disk_path()
    if not disk.exists():
        with file_lock(runtime_dir() / ".disk.lock"):
            if not disk.exists():
                build_disk(disk)
                _drop_least_recently_used(keep=disk)
    _mark_used(disk)
    return disk


def _used_stamp(disk: Path) -> Path:
    # Not the disk's own mtime: boot templates are keyed by their input files' size and mtime.
    return disk.with_name(disk.name + ".used")


def _mark_used(disk: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still boots; only the eviction order suffers
        _used_stamp(disk).touch()


def _last_used(disk: Path) -> float:
    for path in (_used_stamp(disk), disk):
        with contextlib.suppress(OSError):
            return path.stat().st_mtime
    return 0.0


def _drop_least_recently_used(keep: Path) -> None:
    """All but the `KEPT_DISKS` most recently used disks (`keep` among them), so the cache stays bounded."""
    others = sorted((d for d in runtime_dir().glob("runtime-*.erofs") if d != keep), key=_last_used, reverse=True)
    for stale in others[KEPT_DISKS - 1 :]:
        stale.unlink(missing_ok=True)
        _used_stamp(stale).unlink(missing_ok=True)


def build_disk(disk: Path, init_script: str = INIT_SCRIPT) -> None:
    """Assemble the runtime root and write it as a read-only erofs image.

    Tests pass their own `init_script` to boot a deliberately hostile guest
    on the real interpreter and kernel.
    """
    tree = python_tree()
    with staging_dir(disk.with_name(disk.name + ".root")) as root:
        _assemble_root(tree, root, init_script)
        tmp = disk.with_name(disk.name + ".tmp")
        _run(["mkfs.erofs", "--quiet", "-T0", "--all-root", str(tmp), str(root)])
        os.rename(tmp, disk)
    shutil.rmtree(disk.with_name(disk.name + ".root"), ignore_errors=True)


def _assemble_root(tree: Path, root: Path, init_script: str) -> None:
    # Hard links: the tree is never modified, and linking is much faster than copying.
    shutil.copytree(tree, root, symlinks=True, copy_function=os.link, dirs_exist_ok=True)
    package_root = root / "opt/matchlock/matchlock"
    package_root.mkdir(parents=True)
    source = _source_root()
    # Not the host's `matchlock/__init__.py`: that one re-exports the SDK and its imports would cost
    # every guest boot; the guest needs only the package to exist.
    (package_root / "__init__.py").write_text(GUEST_PACKAGE_INIT)
    for package in GUEST_PACKAGES:
        shutil.copytree(source / package, package_root / package, ignore=shutil.ignore_patterns("__pycache__"))
    _compile(tree, root / "opt/matchlock", strip_prefix=root)
    init = root / "init"
    init.write_text(init_script)
    init.chmod(0o755)
    for name in MOUNTPOINTS:
        (root / name).mkdir(exist_ok=True)
