"""Start several `run -d` owners at once from this (already imported) process, for `matchlock fork`.

`run -d` starts its owner as a new `python -m matchlock`, which spends about
0.5 s of CPU importing before it does anything; N of them at once on a small
machine queue behind each other. Here the modules an owner needs are loaded
once (`preload`, while the source sandbox saves its snapshot), and each
owner is an `os.fork` of this process that runs `run` in-process: the same
code, arguments and readiness pipe as `run -d`, minus the imports.

The owners share those modules' memory with this process as long as nobody
writes to it. What an owner imports itself, or what the collector walks, is
copied into each one: `preload` loads everything a restore touches (the
proxy too; tests/unit/test_fork_preload.py checks the list), with the
collector off so no collection leaves holes, and the preloaded objects are
frozen before the forks, so the owners' collections never visit them
(the recipe of the `gc.freeze` documentation).

A forked owner's arguments never appear on a command line (there is no
exec), and a `--secret-file` is read once here, so a pipe or a memfd of the
caller works too: each owner reads a private in-memory copy (`SecretCopy`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import NoReturn

from ..api.secrets import MAX_SECRET_FILE
from ..sandbox.network import CLONE_MODULES
from ..util.fs import memfd_holding

# What a `run --from-snapshot -d` owner imports beyond `matchlock fork` itself.
OWNER_MODULES = (
    "matchlock.cli.run",
    "matchlock.cli.owner",
    "matchlock.image.pull",
    "matchlock.image.progress",
    "matchlock.image.runtime",
    "matchlock.image.store",
    "matchlock.kernel",
    "matchlock.sandbox.exec_relay",
    "matchlock.sandbox.network",
    "matchlock.sandbox.portforward",
    "matchlock.sandbox.snapshots",
    *CLONE_MODULES,  # a clone with a network: its proxy, DNS forwarder and TLS interception
    "cryptography.hazmat.backends.openssl",  # the clone's new CA
    "ctypes",  # the owner's malloc_trim once it is up (cli/owner.py)
)


def preload(modules: tuple[str, ...] = OWNER_MODULES) -> None:
    """Import what the owners need; the collector stays off until `start` has forked them."""
    gc.disable()
    for module in modules:
        importlib.import_module(module)


class SecretCopy:
    """The bytes of a `--secret-file`, read once, held in a memfd (never on disk) for the owners to read."""

    def __init__(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SECRET_FILE + 1)  # the owner's parser reports a file that is too big
        except OSError as exc:
            from ..api.errors import UsageError

            raise UsageError(f"--secret-file {path}: cannot read it: {exc.strerror or exc}") from None
        self.fd = memfd_holding("matchlock-fork-secrets", data)

    @property
    def path(self) -> str:
        # For a forked owner, which inherits the descriptor: opening it again gives it its own offset.
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Owner:
    """One forked owner: its pid, and the read ends of its readiness and error pipes."""

    pid: int
    ready: int
    errors: int
    vm_id: str = ""
    error: str = ""
    _stderr: list[bytes] = field(default_factory=list)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def caller_descriptors() -> tuple[int, ...]:
    """The descriptors above stderr open now: call it first thing, when they can only be the caller's."""
    listed = [int(name) for name in os.listdir("/proc/self/fd") if int(name) > 2]
    open_now = []
    for fd in listed:  # the listing's own descriptor is in `listed` but closed by now
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_now.append(fd)
    return tuple(open_now)


def _owner_process(args: list[str], ready_w: int, errors_w: int, inherited: list[int]) -> NoReturn:
    """The child: a session of its own, no terminal, errors to the parent until ready; then `run`."""
    code = 1
    try:
        gc.enable()  # the inherited objects are frozen: its passes see only the owner's own
        os.setsid()  # Ctrl-C at the `fork` command is not for the clones
        for fd in inherited:
            # The other owners' pipes (their parent alone must hold them) and whatever the caller of
            # `fork` left open: a long-lived owner holding, say, a lock or a pipe's write end would
            # keep it from the caller for the clone's whole life.
            with contextlib.suppress(OSError):
                os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(errors_w, 2)
        os.close(null)
        os.close(errors_w)
        # Python's streams on those descriptors (the parent's may be wrapped): the owner later points fd 2 at vm.log.
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, for its lifetime
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        from .main import main
        from .owner import READY_FD_ENV

        os.environ[READY_FD_ENV] = str(ready_w)
        sys.argv = ["matchlock", *args]
        main()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def start(args: list[str], count: int, caller_fds: tuple[int, ...] = ()) -> list[Owner]:
    """Fork `count` owners of `matchlock <args>` (a `run -d`); call with no other thread running.

    `caller_fds` (from `caller_descriptors`) are closed in each owner."""
    sys.stdout.flush()
    sys.stderr.flush()
    owners: list[Owner] = []
    gc.freeze()  # out of the owners' collections, so their passes never write to the shared pages
    try:
        for _ in range(count):
            ready_r, ready_w = os.pipe()
            errors_r, errors_w = os.pipe()
            inherited = [fd for owner in owners for fd in (owner.ready, owner.errors)] + [ready_r, errors_r]
            inherited += caller_fds
            pid = os.fork()
            if pid == 0:
                _owner_process(args, ready_w, errors_w, inherited)
            os.close(ready_w)
            os.close(errors_w)
            owners.append(Owner(pid, ready_r, errors_r))
    finally:
        gc.unfreeze()
        gc.enable()
    return owners


def _wait_ready(owner: Owner) -> None:
    """The VM id the owner reports once up; else its error output and exit code."""
    drain = threading.Thread(target=lambda: owner._stderr.append(_read_all(owner.errors)), daemon=True)
    drain.start()  # a chatty owner must never block on a full pipe
    with os.fdopen(owner.ready, "rb") as ready:
        owner.vm_id = ready.readline().decode(errors="replace").strip()
    if owner.vm_id:
        return
    _, status = os.waitpid(owner.pid, 0)
    drain.join(5)
    code = os.waitstatus_to_exitcode(status)
    text = b"".join(owner._stderr).decode(errors="replace").strip()
    owner.error = text or f"Error: the clone's owner exited with code {code} before it was ready"


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


def wait(owners: list[Owner]) -> list[Owner]:
    """Wait until every owner is up or has failed; each then has `vm_id` or `error`."""
    waiters = [threading.Thread(target=_wait_ready, args=(owner,)) for owner in owners]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    return owners
