"""Cold start as root and as an ordinary user, in the same run (they should be equal).

Creates a throwaway user (removed at the end), runs `matchlock setup linux` when the host needs it
(and puts the host back afterwards), and copies the built kernel and guest runtime into the user's
own cache. Both sides then run the same interpreter (`python3.11 -m matchlock`, which the user can
execute) with the same code, interleaved:

1. `matchlock run -- true` from a boot template (what a user normally gets), after one warm-up run
   each (the user's first run builds their image disk and templates);
2. the same with MATCHLOCK_NO_TEMPLATES=1: a full cold boot;
3. building one sandbox network namespace (user + net namespace, TAP, nftables, listeners) alone.

Usage (as root): .venv/bin/python benchmarks/bench_rootless.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from matchlock.api.paths import cache_dir
from matchlock.kernel import resolve

SRC = Path(__file__).resolve().parents[1] / "src"
PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
NAMESPACE_SCRIPT = (
    "import time; from matchlock.net.namespace import SandboxNamespace\n"
    "samples = []\n"
    "for _ in range(10):\n"
    "    started = time.perf_counter(); n = SandboxNamespace(1500); n.create()\n"
    "    samples.append(time.perf_counter() - started); n.close()\n"
    "print(' '.join(str(s) for s in samples))\n"
)


def _env(home: str, **extra: str) -> dict[str, str]:
    paths = [str(SRC), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    base = {k: v for k, v in os.environ.items() if not k.startswith("MATCHLOCK_")}
    return {**base, "HOME": home, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **extra}


def _make_user() -> pwd.struct_passwd:
    name = f"mlkb-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--create-home", "--user-group", name], check=True)
    user = pwd.getpwnam(name)
    cache = Path(user.pw_dir) / ".cache" / "matchlock"
    kernel = resolve(build_fallback=True).path.parent
    shutil.copytree(kernel, cache / "kernels" / kernel.name)
    runtime = cache_dir() / "runtime"
    (cache / "runtime").mkdir(parents=True)
    for source in [*runtime.glob("python-*"), runtime / "python.current"]:
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, cache / "runtime" / source.name)
    (cache / "debs").mkdir()
    for deb in (cache_dir() / "debs").glob("busybox-static_*.deb"):
        shutil.copy2(deb, cache / "debs" / deb.name)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(Path(user.pw_dir) / ".cache")], check=True)
    return user


def _remove_user(user: pwd.struct_passwd) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):  # only what this benchmark started as that user
        try:
            if os.stat(f"/proc/{pid}").st_uid == user.pw_uid:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue
    subprocess.run(["userdel", "--remove", user.pw_name], capture_output=True)


class Side:
    def __init__(self, label: str, prefix: list[str], env: dict[str, str]) -> None:
        self.label, self.prefix, self.env = label, prefix, env
        self.samples: dict[str, list[float]] = {"template": [], "cold": [], "namespace": []}

    def run(self, *args: str, **extra: str) -> float:
        started = time.perf_counter()
        proc = subprocess.run([*self.prefix, PYTHON, "-m", "matchlock", *args], capture_output=True, text=True,
                              env={**self.env, **extra}, cwd="/", timeout=600)  # fmt: skip
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{self.label}: matchlock {' '.join(args)} failed: {proc.stderr.strip()}")
        return elapsed

    def namespaces(self) -> None:
        proc = subprocess.run([*self.prefix, PYTHON, "-c", NAMESPACE_SCRIPT], capture_output=True, text=True,
                              env=self.env, cwd="/", check=True)  # fmt: skip
        self.samples["namespace"] += [float(s) for s in proc.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark creates a user")
    tun_mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    rule = Path("/etc/udev/rules.d/60-matchlock-tun.rules")
    had_rule = rule.exists()
    subprocess.run([PYTHON, "-m", "matchlock", "setup", "linux"], env=_env(str(Path.home())), check=True)
    user = _make_user()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-rootless-") as state:
            root = Side("root", [], _env(str(Path.home()), MATCHLOCK_STATE_DIR=state))
            drop = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
            ordinary = Side("user", drop, _env(user.pw_dir, USER=user.pw_name))
            for side in (root, ordinary):
                side.run("run", "--", "true")  # warm-up: image disk, runtime disk, templates
            for _ in range(args.runs):
                for side in (root, ordinary):
                    side.samples["template"].append(side.run("run", "--", "true"))
                    side.samples["cold"].append(side.run("run", "--", "true", MATCHLOCK_NO_TEMPLATES="1"))
            for side in (root, ordinary):
                side.namespaces()
    finally:
        _remove_user(user)
        os.chmod("/dev/net/tun", tun_mode)
        if not had_rule:
            rule.unlink(missing_ok=True)
    print(f"{'median of ' + str(args.runs) + ' runs':<42} {'root':>9} {'user':>9}")
    for key, what in (("template", "`run -- true` from a boot template"), ("cold", "`run -- true`, cold boot"),
                      ("namespace", "network namespace build (10 samples)")):  # fmt: skip
        medians = [statistics.median(side.samples[key]) * 1000 for side in (root, ordinary)]
        print(f"{what:<42} {medians[0]:>7.0f}ms {medians[1]:>7.0f}ms")


if __name__ == "__main__":
    main()
