"""`matchlock build --secret id=NAME[,src=PATH|,env=VAR]`: BuildKit's file secrets, read into memory.

A value is BuildKit's CSV (`id=npmrc,src=$HOME/.npmrc`; keys case-insensitive):
`id` (required) names it for `RUN --mount=type=secret,id=NAME`; `src` (or
`source`) is a host file; `env` a host environment variable; `type=file|env`
says which `src` is (as docker's flag does). With neither `src` nor `env`, the
value is $NAME when that is set, else the file NAME (docker's default). Each
value is at most MAX_BYTES (BuildKit's 500 KiB) and is read once, here, into
memory: the builder serves it to a step as a one-file memory mount and never
writes it to a host file; no message quotes it.

`--secret` of `matchlock build` also takes network secrets (`NAME=VALUE@HOSTS`,
`NAME@HOSTS`, api/secrets.py): a value whose first key is one of KEYS in
lower case (`id=`, `src=`, ...) is a file secret, anything else a network one.
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..api.errors import UsageError

MAX_BYTES = 500 * 1024  # BuildKit's bound on one secret
KEYS = ("id", "type", "src", "source", "env")
ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class BuildSecret:
    id: str
    data: bytes = field(repr=False)
    origin: str = ""  # where it came from, for messages: "file PATH" or "$VAR"


def is_file_secret(spec: str) -> bool:
    """Whether a `--secret` value is BuildKit's form (`id=...`), not a network secret (`NAME=VALUE@HOSTS`)."""
    first = spec.split(",", 1)[0]
    key, sep, _ = first.partition("=")
    return bool(sep) and key in KEYS


def parse(spec: str, environ: Mapping[str, str]) -> BuildSecret:
    shown = f"--secret {spec}"
    try:
        rows = list(csv.reader([spec], strict=True))
    except csv.Error as exc:
        raise UsageError(f"{shown}: not a valid comma-separated list ({exc})") from None
    values: dict[str, str] = {}
    for item in rows[0] if rows else []:
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        key = "src" if key == "source" else key
        if key not in KEYS:
            raise UsageError(f"{shown}: unknown key {key!r}; accepted: id, src (or source), env, type")
        if not sep or not value:
            raise UsageError(f"{shown}: key {key!r} needs a value ({key}=VALUE)")
        if key in values:
            raise UsageError(f"{shown}: key {key!r} is given twice")
        values[key] = value
    name = values.get("id", "")
    if not name:
        raise UsageError(f"{shown}: id is required (id=NAME, as RUN --mount=type=secret,id=NAME names it)")
    if not set(name) <= ID_CHARS:
        raise UsageError(f"{shown}: id {name!r} may hold only letters, digits, '.', '_' and '-'")
    kind = values.get("type", "")
    if kind not in ("", "file", "env"):
        raise UsageError(f"{shown}: type={kind!r} is not file or env")
    if "src" in values and "env" in values:
        raise UsageError(f"{shown}: give src= (a file) or env= (a variable), not both")
    if "env" in values and kind == "file":
        raise UsageError(f"{shown}: type=file contradicts env=; use src=PATH for a file")
    variable = values.get("env") or (values.get("src") if kind == "env" else None)
    path = values.get("src") if kind != "env" else None
    if variable is None and path is None:
        if kind == "env" or (kind == "" and name in environ):
            variable = name
        else:
            path = name
    if variable is not None:
        if variable not in environ:
            raise UsageError(f"{shown}: ${variable} is not set; fix: export it, or give src=PATH")
        data = environ[variable].encode("utf-8", "surrogateescape")
        origin = f"${variable}"
    else:
        assert path is not None
        data = _read(os.path.expanduser(path), shown)
        origin = f"file {path}"
    if len(data) > MAX_BYTES:
        raise UsageError(f"{shown}: {origin} holds {len(data)} bytes, over the {MAX_BYTES} (500 KiB) a secret may hold")
    return BuildSecret(name, data, origin)


def _read(path: str, shown: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the build
    except OSError as exc:
        raise UsageError(
            f"{shown}: cannot read {path}: {exc.strerror or exc}; fix: give src= a readable file"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{shown}: {path} is not a regular file; fix: give src= a file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise UsageError(f"{shown}: cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def parse_all(specs: Iterable[str], environ: Mapping[str, str]) -> dict[str, BuildSecret]:
    secrets: dict[str, BuildSecret] = {}
    for spec in specs:
        secret = parse(spec, environ)
        if secret.id in secrets:
            raise UsageError(f"--secret {spec}: id {secret.id!r} is given twice; fix: give each secret its own id")
        secrets[secret.id] = secret
    return secrets
