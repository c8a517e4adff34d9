"""`matchlock snapshot create|ls|rm` and `matchlock fork ID [-n N]`.

`create` asks the sandbox's owner (through the exec relay) to save it;
`ls` and `rm` work on the state database directly. `fork` is a full
snapshot followed by N detached `run --from-snapshot` owners, forked side by
side from this process (cli/launcher.py: no Python start-up each); the
snapshot is removed once they are up (each clone holds its own copy of the
upper disk and its mounts' private content, and QEMU keeps the other files
open). A sandbox's directory mounts come along: host_fs ones stay the shared
host directory, memory and overlay ones are copied per clone (docs/architecture.md,
"Pause, snapshots and forks"). Secret values are never in
a snapshot: pass the source's secrets to `fork` again with
`--secret`/`--secret-file`, as to `run --from-snapshot`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import click

from ..api.errors import MatchlockError, NotFoundError, UsageError
from ..state import snapshots as records

if TYPE_CHECKING:
    from ..state.store import StateStore

MAX_FORKS = 16


def _store() -> contextlib.closing[StateStore]:
    """The state store, closed when the `with` block ends."""
    from ..state.store import StateStore

    return contextlib.closing(StateStore())


@click.group()
def snapshot() -> None:
    """Save running sandboxes and list or remove the saved snapshots."""


@snapshot.command()
@click.argument("vm_id")
@click.option("--name", default=None, help="Snapshot name (default: <VM ID>-<time>).")
@click.option("--mode", default="full", show_default=True,
              help="full: memory, disks and mounts (processes keep running on restore); filesystem: disks and mounts.")  # fmt: skip
def create(vm_id: str, name: str | None, mode: str) -> None:
    """Snapshot a running sandbox; it keeps running."""
    from ..sandbox.relay_client import control

    records.validate_mode(mode)
    if name is not None:
        records.validate_name(name)  # `--name ''` is a bad name, not the default one
        with _store() as store:
            if records.get(store, name) is not None:  # the owner checks again; this one exits 2, as a bad name
                raise records.name_taken(name)
    result = control(vm_id, "snapshot", name=name or "", mode=mode)
    click.echo(result.get("name", name))


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of the snapshots.")
def list_snapshots(as_json: bool) -> None:
    """List the snapshots that are complete (ones being made, or left half-made, are not shown)."""
    with _store() as store:
        found = records.ready(store)
    if as_json:
        click.echo(json.dumps([record.to_json() for record in found], indent=2))
        return
    rows = [("NAME", "MODE", "SOURCE", "SIZE", "CREATED")]
    rows += [(r.name, r.mode, r.source_vm, f"{r.size / 1e6:.1f} MB", r.created_at[:19]) for r in found]
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    for row in rows:
        click.echo("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@snapshot.command("rm")
@click.argument("names", nargs=-1, required=True)
def remove(names: tuple[str, ...]) -> None:
    """Remove snapshots (sandboxes restored from them keep running).

    Every name is checked first, so a typo among them removes nothing (as the RPC's snapshot_remove)."""
    unique = list(dict.fromkeys(names))
    with _store() as store:
        for name in unique:
            records.require(store, records.validate_name(name))
        for name in unique:
            records.remove(store, name)
            click.echo(name)


def _secret_args(secret: tuple[str, ...], secret_file: str | None) -> list[str]:
    args = [arg for value in secret for arg in ("--secret", value)]
    return args + (["--secret-file", secret_file] if secret_file else [])


def _has_network(name: str) -> bool:
    with _store() as store:
        return bool(records.require(store, name).meta["network"])


def _remove_snapshot(name: str) -> None:
    with _store() as store:
        records.remove(store, name)


def _check_fork_secrets(vm_id: str, secret: tuple[str, ...], secret_path: str | None) -> None:
    """Every secret of the source must be given again (the clones' restores would each refuse it, after
    the snapshot): parse the flags now, as `run` will, and compare their names with the source's."""
    import os

    from ..api.secrets import parse_secrets

    given = parse_secrets(secret, (), secret_path, os.environ)
    with _store() as store:
        try:
            vm = store.require(vm_id)
        except NotFoundError:
            return  # asking its owner says so
    missing = sorted(set(vm.config.get("network", {}).get("secrets", {})) - set(given))
    if missing:
        raise UsageError(
            f"--secret {missing[0]} is missing: {vm.id} uses secret(s) {', '.join(missing)}, which its clones "
            f"need again; fix: pass --secret {missing[0]}=VALUE@HOSTS (values are never stored in a snapshot)"
        )


@click.command()
@click.argument("vm_id")
@click.option("-n", "count", type=int, default=1, show_default=True, help=f"How many clones (1 to {MAX_FORKS}).")
@click.option("--secret", multiple=True, metavar="NAME=VALUE@HOSTS", help="The source's secrets, again (repeatable).")
@click.option("--secret-file", default=None, metavar="FILE",
              help="The source's secrets as JSON, as for `run` (read once: a pipe or /proc/PID/fd/N works).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the new VM IDs as one JSON list.")
def fork(vm_id: str, count: int, secret: tuple[str, ...], secret_file: str | None, as_json: bool) -> None:
    """Start N detached sandboxes that continue from the live state of VM_ID, which keeps running.

    Prints the new VM IDs, one per line (or a JSON list with --json), once every clone is up; when some
    fail, the ones that started are still printed and the command fails.
    """
    from ..sandbox.relay_client import control
    from . import launcher

    caller_fds = launcher.caller_descriptors()  # before this process opens anything of its own
    if not 1 <= count <= MAX_FORKS:
        raise UsageError(f"invalid -n {count}: fork makes 1 to {MAX_FORKS} clones at a time")
    copy = launcher.SecretCopy(secret_file) if secret_file else None
    try:
        _check_fork_secrets(vm_id, secret, copy.path if copy else None)  # before a snapshot is taken
        name = f"fork-{secrets.token_hex(4)}"
        # The source's owner saves the snapshot while this process loads what the clones' owners need.
        with ThreadPoolExecutor(1) as pool:
            saving = pool.submit(control, vm_id, "snapshot", name=name, mode="full")
            launcher.preload()
            saving.result()
        try:  # the pool's thread is gone: forking is safe
            args = ["run", "--from-snapshot", name, "-d", *_secret_args(secret, copy.path if copy else None)]
            if not _has_network(name):
                args.append("--no-network")  # a full restore needs the source's devices
            owners = launcher.wait(launcher.start(args, count, caller_fds))
        finally:
            _remove_snapshot(name)  # each clone has its own upper disk; QEMU keeps the other files open
    finally:
        if copy is not None:
            copy.close()
    ids = [owner.vm_id for owner in owners if owner.vm_id]
    if as_json:
        click.echo(json.dumps(ids))
    elif ids:
        click.echo("\n".join(ids))
    for owner in owners:
        if owner.error:
            click.echo(owner.error, err=True)
    if len(ids) < count:
        raise MatchlockError(f"{count - len(ids)} of {count} clones of {vm_id} failed to start")
