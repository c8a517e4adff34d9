"""The `fork` method: detached clones of the session's sandbox, made by `matchlock fork` in a child process.

The rpc layer does not import the CLI, so the command runs as `python -m matchlock fork ID -n N`, which
prints one VM id per line once every clone is up. The clones are ordinary `run -d` owners: they outlive
this session, and `matchlock kill` / `rm` stop them.

The session's secret values reach the child (and the owners it starts) through `--secret-file` naming a
memfd of this process, `/proc/PID/fd/N`: never a command line, which every user can read in /proc, and
never a file on disk. Only processes allowed to ptrace this one can open that path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ..api.network import SecretConfig
from ..jsonrpc import VM_FAILED
from ..util.fs import memfd_holding
from .params import RpcError

if TYPE_CHECKING:
    from ..sandbox.sandbox import Sandbox

log = logging.getLogger("matchlock.rpc")

MAX_FORKS = 16  # as `matchlock fork -n`
VM_ID = re.compile(r"^vm-[0-9a-z]{1,32}$")
ERROR_TAIL = 2000  # characters of the child's error output quoted in the answer


@contextlib.contextmanager
def secret_file(secrets: Mapping[str, SecretConfig]) -> Iterator[str | None]:
    """A path that reads as `--secret-file` JSON of `secrets` while the block runs; None without secrets."""
    if not secrets:
        yield None
        return
    document = {
        name: {"value": s.value, "hosts": list(s.hosts), **({"placeholder": s.placeholder} if s.placeholder else {})}
        for name, s in secrets.items()
    }
    fd = memfd_holding("matchlock-fork-secrets", json.dumps(document).encode())
    try:
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def parse_ids(stdout: bytes) -> list[str]:
    """The VM ids `matchlock fork` printed, one per line; anything else on stdout is not an id."""
    lines = (line.strip() for line in stdout.decode("ascii", errors="replace").splitlines())
    return [line for line in lines if VM_ID.match(line)]


def fork_argv(vm_id: str, count: int, secret_path: str | None) -> list[str]:
    argv = [sys.executable, "-m", "matchlock", "fork", vm_id, "-n", str(count)]
    return argv + (["--secret-file", secret_path] if secret_path else [])


async def _run(argv: list[str]) -> tuple[int, bytes, bytes]:
    child = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await child.communicate()
    assert child.returncode is not None
    return child.returncode, out, err


async def stop_clones(ids: list[str]) -> None:
    """`matchlock rm -f` each clone (a failed or abandoned fork must not leave VMs nobody asked for)."""
    async with asyncio.TaskGroup() as group:
        for vm_id in ids:
            group.create_task(_stop(vm_id))


async def _stop(vm_id: str) -> None:
    code, _, err = await _run([sys.executable, "-m", "matchlock", "rm", "-f", vm_id])
    if code:
        log.warning("stopping clone %s failed: %s", vm_id, err.decode(errors="replace").strip())


async def _make(sandbox: Sandbox, count: int) -> list[str] | RpcError:
    """Never raises (it runs in the session's task group): a failure comes back as the error to answer."""
    try:
        with secret_file(sandbox.config.network.secrets) as path:
            code, out, err = await _run(fork_argv(sandbox.id, count, path))
        ids = parse_ids(out)
        if code == 0 and len(ids) == count:
            return ids
        await stop_clones(ids)
        reason = err.decode(errors="replace").strip()[-ERROR_TAIL:] or f"matchlock fork exited with code {code}"
        return RpcError(VM_FAILED, f"fork of {sandbox.id} failed: {reason}")
    except Exception as exc:  # noqa: BLE001 - answered; the session goes on
        log.exception("fork of %s failed", sandbox.id)
        return RpcError(VM_FAILED, f"fork of {sandbox.id} failed: {type(exc).__name__}: {exc}")


async def _stop_when_made(making: asyncio.Task[list[str] | RpcError]) -> None:
    outcome = await making
    if isinstance(outcome, list):
        with contextlib.suppress(Exception):
            await stop_clones(outcome)


async def fork_detached(sandbox: Sandbox, count: int, tasks: asyncio.TaskGroup) -> list[str]:
    """`count` detached clones of `sandbox`, which keeps running; returns their VM ids."""
    making = tasks.create_task(_make(sandbox, count))
    try:
        outcome = await asyncio.shield(making)
    except asyncio.CancelledError:
        # Killing the child would orphan the clones it started: let it finish, then stop them.
        with contextlib.suppress(RuntimeError):  # the session's group is already finished
            tasks.create_task(_stop_when_made(making))
        raise
    if isinstance(outcome, RpcError):
        raise outcome
    return outcome
