"""Sandbox management: list, get, inspect, kill, rm, prune, gc, log."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from ..api.errors import MatchlockError, UsageError
from ..api.paths import SandboxPaths
from ..state import reconcile as reconciler
from ..state.store import OWNER_CRASHED, OWNER_RUNNING, OWNER_STOPPED, StateStore, VMState


def _store() -> StateStore:
    return StateStore()


def _created(vm: VMState) -> str:
    try:
        return datetime.fromisoformat(vm.created_at.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return vm.created_at


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell, as `image ls` prints them."""
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]) - 1)]
    return ["   ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "   " + row[-1] for row in rows]


@click.command("list")
@click.option("--running", is_flag=True, help="Only sandboxes whose owner is alive.")
@click.option("-q", "--quiet", is_flag=True, help="Only the IDs, one a line.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of the sandboxes (as `get` shows them).")
def list_vms(running: bool, quiet: bool, as_json: bool) -> None:
    """List sandboxes (a sandbox whose owner died is shown as crashed)."""
    if quiet and as_json:
        raise UsageError("-q and --json cannot be combined: pick one output format")
    vms = [vm for vm in _store().list() if not running or vm.status == OWNER_RUNNING]
    if as_json:
        click.echo(json.dumps([vm.to_json() for vm in vms], indent=2))
    elif quiet:
        for vm in vms:
            click.echo(vm.id)
    else:
        rows: list[tuple[str, ...]] = [("ID", "STATUS", "IMAGE", "CREATED", "PID")]
        rows += [(vm.id, vm.shown_status, vm.image, _created(vm), str(vm.pid or "-")) for vm in vms]
        for line in _table(rows):
            click.echo(line)


@click.command()
@click.argument("vm_id")
def get(vm_id: str) -> None:
    """Show a sandbox's state as JSON (secrets and environment values are never stored)."""
    click.echo(json.dumps(_store().require(vm_id).to_json(), indent=2))


@click.command()
@click.argument("vm_id")
def inspect(vm_id: str) -> None:
    """Show a sandbox, its latest lifecycle record and its full history as JSON."""
    store = _store()
    vm = store.require(vm_id)
    history = store.history(vm.id)
    report = {
        "vm": vm.to_json(),
        "lifecycle": history[-1].to_json() if history else None,
        "history": [record.to_json() for record in history],
    }
    click.echo(json.dumps(report, indent=2))


def _one_or_all(command: str, vm_id: str | None, every: bool, flag: str) -> None:
    if vm_id and every:
        raise UsageError(f"{command} takes a VM ID or {flag}, not both: drop {vm_id!r} or {flag}")
    if not vm_id and not every:
        raise UsageError(f"{command} needs a VM ID (or a unique prefix of one) or {flag}")


KILL_WAIT_SECONDS = 30.0


@click.command()
@click.argument("vm_id", required=False)
@click.option("--all", "kill_all", is_flag=True, help="Kill every running sandbox.")
def kill(vm_id: str | None, kill_all: bool) -> None:
    """Stop a sandbox and wait (up to 30 s) until it has stopped: SIGTERM to its owner, which closes it cleanly."""
    _one_or_all("kill", vm_id, kill_all, "--all")
    store = _store()
    targets = [store.require(vm_id)] if vm_id else [vm for vm in store.list() if vm.status == OWNER_RUNNING]
    failures = 0
    signalled = []
    for vm in targets:
        try:
            _terminate(store, vm)
            signalled.append(vm)
        except MatchlockError as exc:
            if not kill_all:
                raise
            failures += 1
            click.echo(f"Error: {exc}", err=True)
    # Signal all first, then wait: several sandboxes close in parallel.
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    for vm in signalled:
        if reconciler.wait_gone(vm.pid, vm.owner_start, max(0.0, deadline - time.monotonic())):
            click.echo(f"Killed {vm.id}")
        else:
            failures += 1
            click.echo(f"Error: VM {vm.id} is still stopping after {KILL_WAIT_SECONDS:g} s; "
                       f"fix: matchlock gc --force-running {vm.id}", err=True)  # fmt: skip
    if failures:
        sys.exit(1)


def _terminate(store: StateStore, vm: VMState) -> None:
    if vm.status != OWNER_RUNNING or not store.owner_alive(vm):
        raise MatchlockError(f"VM {vm.id} is not running (status: {vm.status})")
    try:
        os.kill(vm.pid, signal.SIGTERM)
    except ProcessLookupError:
        raise MatchlockError(f"VM {vm.id} is not running (its owner exited)") from None


@click.command()
@click.argument("vm_id", required=False)
@click.option("--stopped", is_flag=True, help="Remove every sandbox that is not running.")
@click.option("-f", "--force", is_flag=True, help="Stop the sandbox first if it is running.")
def rm(vm_id: str | None, stopped: bool, force: bool) -> None:
    """Remove a stopped or crashed sandbox: clean up its resources, then its state and logs."""
    _one_or_all("rm", vm_id, stopped, "--stopped")
    store = _store()
    targets = [store.require(vm_id)] if vm_id else [vm for vm in store.list() if vm.status != OWNER_RUNNING]
    for vm in targets:
        if force and vm.status == OWNER_RUNNING and store.owner_alive(vm):
            try:
                reconciler.stop_owner(vm)
            except (OSError, RuntimeError) as exc:
                raise MatchlockError(f"cannot stop VM {vm.id}: {exc}") from None
            vm = store.require(vm.id)
        reconciler.remove(store, vm)
        click.echo(f"Removed {vm.id}")


@click.command()
def prune() -> None:
    """Remove every stopped or crashed sandbox."""
    store = _store()
    pruned = 0
    for vm in store.list():
        if vm.status not in (OWNER_STOPPED, OWNER_CRASHED):
            continue
        try:
            reconciler.remove(store, vm)
        except MatchlockError as exc:
            click.echo(f"Error: {exc}", err=True)
            continue
        pruned += 1
        click.echo(f"Pruned {vm.id}")
    click.echo(f"Pruned {pruned} VMs")


@click.command()
@click.argument("vm_id", required=False)
@click.option("--force-running", is_flag=True, help="Also clean sandboxes whose owner is alive (stops them first).")
def gc(vm_id: str | None, force_running: bool) -> None:
    """Remove leftover resources (QEMU processes, sockets, disks) of stopped or crashed sandboxes."""
    store = _store()
    targets = [store.require(vm_id)] if vm_id else store.list()
    failed = False
    for vm in targets:
        result = reconciler.reconcile(store, vm.id, force=force_running)
        if result.skipped:
            click.echo(f"{vm.id}: skipped ({result.skipped})")
        elif result.cleaned:
            click.echo(f"{vm.id}: cleaned {', '.join(sorted(result.cleaned))}")
        elif not result.failed:
            click.echo(f"{vm.id}: no resources to clean")
        for step, error in result.failed:
            failed = True
            click.echo(f"{vm.id}: failed {step}: {error}", err=True)
    click.echo(f"Reconciled {len(targets)} VMs")
    if vm_id is None:
        from ..state import snapshots

        for name in snapshots.remove_abandoned(store):
            click.echo(f"snapshot {name}: removed (left unfinished)")
    if failed:
        sys.exit(1)


@click.command()
@click.argument("vm_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended (Ctrl-C to stop).")
def log(vm_id: str, follow: bool) -> None:
    """Print a sandbox's console log and command output."""
    store = _store()
    path = SandboxPaths(store.vm_dir(store.require(vm_id).id)).console_log
    out = sys.stdout.buffer
    offset = _copy_from(path, 0, out)
    if not follow:
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop following cleanly, exit 0
    try:
        while True:
            time.sleep(0.1)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < offset:
                offset = 0  # truncated or replaced: start over
            offset = _copy_from(path, offset, out)
    except KeyboardInterrupt:
        pass


def _copy_from(path: Path, offset: int, out) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(65536):
                out.write(chunk)
                offset += len(chunk)
    except FileNotFoundError:
        return offset
    out.flush()
    return offset
