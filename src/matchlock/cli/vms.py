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
from ..state import reconcile as reconciler
from ..state.store import CRASHED, RUNNING, STOPPED, StateStore, VMState


def _store() -> StateStore:
    return StateStore()


def _created(vm: VMState) -> str:
    try:
        return datetime.fromisoformat(vm.created_at.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return vm.created_at


@click.command("list")
@click.option("--running", is_flag=True, help="Only sandboxes whose owner is alive.")
def list_vms(running: bool) -> None:
    """List sandboxes (a sandbox whose owner died is shown as crashed)."""
    store = _store()
    click.echo("ID\tSTATUS\tIMAGE\tCREATED\tPID")
    for vm in store.list():
        if running and vm.status != RUNNING:
            continue
        click.echo(f"{vm.id}\t{vm.status}\t{vm.image}\t{_created(vm)}\t{vm.pid or '-'}")


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
    history = store.history(vm_id)
    report = {
        "vm": vm.to_json(),
        "lifecycle": history[-1].to_json() if history else None,
        "history": [record.to_json() for record in history],
    }
    click.echo(json.dumps(report, indent=2))


@click.command()
@click.argument("vm_id", required=False)
@click.option("--all", "kill_all", is_flag=True, help="Kill every running sandbox.")
def kill(vm_id: str | None, kill_all: bool) -> None:
    """Stop a sandbox: SIGTERM to its owning process, which closes it cleanly."""
    if bool(vm_id) == kill_all:
        raise UsageError("kill needs a VM ID or --all")
    store = _store()
    targets = [vm for vm in store.list() if vm.status == RUNNING] if kill_all else [store.require(vm_id)]
    failures = 0
    for vm in targets:
        try:
            _terminate(store, vm)
            click.echo(f"Killed {vm.id}")
        except MatchlockError as exc:
            if not kill_all:
                raise
            failures += 1
            click.echo(f"Error: {exc}", err=True)
    if failures:
        sys.exit(1)


def _terminate(store: StateStore, vm: VMState) -> None:
    if vm.status != RUNNING or not store.owner_alive(vm):
        raise MatchlockError(f"VM {vm.id} is not running (status: {vm.status})")
    try:
        os.kill(vm.pid, signal.SIGTERM)
    except ProcessLookupError:
        raise MatchlockError(f"VM {vm.id} is not running (its owner exited)") from None


@click.command()
@click.argument("vm_id", required=False)
@click.option("--stopped", is_flag=True, help="Remove every sandbox that is not running.")
def rm(vm_id: str | None, stopped: bool) -> None:
    """Remove a stopped or crashed sandbox: clean up its resources, then its state and logs."""
    if bool(vm_id) == stopped:
        raise UsageError("rm needs a VM ID or --stopped")
    store = _store()
    targets = [vm for vm in store.list() if vm.status != RUNNING] if stopped else [store.require(vm_id)]
    for vm in targets:
        reconciler.remove(store, vm)
        click.echo(f"Removed {vm.id}")


@click.command()
def prune() -> None:
    """Remove every stopped or crashed sandbox."""
    store = _store()
    pruned = 0
    for vm in store.list():
        if vm.status not in (STOPPED, CRASHED):
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
@click.option("--force-running", is_flag=True, help="Also clean sandboxes whose owner is alive.")
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
    if failed:
        sys.exit(1)


@click.command()
@click.argument("vm_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended (Ctrl-C to stop).")
def log(vm_id: str, follow: bool) -> None:
    """Print a sandbox's console log and command output."""
    store = _store()
    store.require(vm_id)
    path = store.vm_dir(vm_id) / "logs" / "vm.log"
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
