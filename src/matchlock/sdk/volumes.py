"""The SDK calls that run the `matchlock` CLI instead of the RPC server (volumes, `rm`), without I/O.

As in the published SDK: the argv after the binary, and how its stdout is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import MatchlockError
from .types import VolumeInfo

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class CliCall(Generic[R]):
    args: list[str]
    parse: Callable[[str], R]


def _ignore(_stdout: str) -> None:
    return None


def remove(vm_id: str) -> CliCall[None]:
    return CliCall(["rm", vm_id], _ignore)


def _name(name: str) -> str:
    name = name.strip()
    if not name:
        raise MatchlockError("volume name is required")
    return name


def volume_create(name: str, size_mb: int) -> CliCall[VolumeInfo]:
    checked = _name(name)
    if size_mb <= 0:
        raise MatchlockError("volume size must be > 0")
    return CliCall(
        ["volume", "create", checked, "--size", str(size_mb), "--json"],
        lambda stdout: _parse_created(stdout, checked, size_mb),
    )


def volume_list() -> CliCall[list[VolumeInfo]]:
    return CliCall(["volume", "ls", "--json"], _parse_list)


def volume_remove(name: str) -> CliCall[None]:
    return CliCall(["volume", "rm", _name(name)], _ignore)


def _json_output(stdout: str, what: str) -> Any:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise MatchlockError(f"failed to parse volume {what} output: {exc}") from exc


def _parse_created(stdout: str, name: str, size_mb: int) -> VolumeInfo:
    payload = _json_output(stdout, "create")
    if not isinstance(payload, dict):
        raise MatchlockError(f"failed to parse volume create output: expected object, got {payload!r}")
    path = str(payload.get("path", "")).strip()
    if not path:
        raise MatchlockError("failed to parse volume create output: missing Path")
    return VolumeInfo(
        name=str(payload.get("name", "")).strip() or name,
        size=str(payload.get("size", "")).strip() or f"{float(size_mb):.1f} MB",
        path=path,
    )


def _parse_list(stdout: str) -> list[VolumeInfo]:
    payload = _json_output(stdout, "list")
    if not isinstance(payload, list):
        raise MatchlockError("failed to parse volume list output: expected array")
    volumes = []
    for entry in payload:
        if not isinstance(entry, dict):
            raise MatchlockError(f"failed to parse volume list output line: {entry!r}")
        name, size, path = (str(entry.get(key, "")).strip() for key in ("name", "size", "path"))
        if not name or not path:
            raise MatchlockError(f"failed to parse volume list output line: {entry!r}")
        volumes.append(VolumeInfo(name=name, size=size, path=path))
    return volumes
