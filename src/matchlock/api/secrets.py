"""Secrets from the command line: `--secret`, `--secret-file` and `--secret-placeholder`.

`--secret-file FILE` takes the JSON of matchlock's flag,
`{NAME: {"value": ..., "placeholder"?: ..., "hosts": [...]}}`, so values
stay off the command line (as does `--secret NAME@host`, which reads
`$NAME`). Values are only ever kept in memory: no message here quotes one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from .errors import UsageError
from .network import ENV_NAME, SecretConfig, shown, validate_host_glob

MAX_SECRET_FILE = 1024 * 1024
_FIELDS = ("value", "placeholder", "hosts")


def _read(path: str) -> object:
    where = f"--secret-file {shown(path)}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_FILE:
        raise UsageError(f"{where}: larger than {MAX_SECRET_FILE} bytes; it should hold only secret definitions")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not UTF-8 text (byte {exc.start}); write it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:  # its message quotes no content, only the position
        raise UsageError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def load_secret_file(path: str) -> dict[str, SecretConfig]:
    """The secrets of a `--secret-file`, every field checked; a UsageError names the bad field."""
    where = f"--secret-file {shown(path)}"
    document = _read(path)
    if not isinstance(document, dict):
        raise UsageError(f'{where}: expected a JSON object {{"NAME": {{"value": ..., "hosts": [...]}}}}')
    secrets: dict[str, SecretConfig] = {}
    for name, entry in document.items():
        if not ENV_NAME.match(name):
            raise UsageError(f"{where}: invalid secret name {shown(name)}: use letters, digits and '_'")
        at = f"{where}: secret {name}"
        if not isinstance(entry, dict):
            raise UsageError(f'{at}: expected an object with "value" and "hosts"')
        unknown = sorted(set(entry) - set(_FIELDS))
        if unknown:
            raise UsageError(f"{at}: unknown field {shown(unknown[0])}; the fields are value, placeholder and hosts")
        value = entry.get("value")
        if not isinstance(value, str) or not value:
            raise UsageError(f'{at}: "value" must be a non-empty string')
        placeholder = entry.get("placeholder", "")
        if not isinstance(placeholder, str):
            raise UsageError(f'{at}: "placeholder" must be a string')
        hosts = entry.get("hosts")
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise UsageError(f'{at}: "hosts" must be a non-empty list of host names or globs')
        try:
            checked = tuple(validate_host_glob(h, "host") for h in hosts)
        except UsageError as exc:
            raise UsageError(f"{at}: {exc}") from None
        secrets[name] = SecretConfig(value=value, hosts=checked, placeholder=placeholder.strip())
    return secrets


def parse_placeholder_flag(spec: str) -> tuple[str, str]:
    """`--secret-placeholder NAME=PLACEHOLDER`."""
    name, sep, placeholder = spec.partition("=")
    name, placeholder = name.strip(), placeholder.strip()
    if not sep or not placeholder:
        raise UsageError(f"invalid --secret-placeholder {shown(spec)}: expected NAME=PLACEHOLDER")
    if not ENV_NAME.match(name):
        raise UsageError(f"invalid --secret-placeholder name {shown(name)}: use letters, digits and '_'")
    return name, placeholder


def parse_secrets(
    flags: Iterable[str], placeholders: Iterable[str], secret_file: str | None, environ: Mapping[str, str]
) -> dict[str, SecretConfig]:
    """The file first, then each `--secret` (replacing a file entry of its name), then the placeholders,
    each of which must name one of those secrets. The placeholders themselves are checked with the
    rest of the network config (`validate_placeholders`), for the RPC's secrets alike."""
    secrets = load_secret_file(secret_file) if secret_file else {}
    for spec in flags:
        name, secret = SecretConfig.parse_flag(spec, environ)
        secrets[name] = secret
    for spec in placeholders:
        name, placeholder = parse_placeholder_flag(spec)
        if name not in secrets:
            raise UsageError(f"--secret-placeholder {name}: no secret {name}; define it with --secret or --secret-file")
        secret = secrets[name]
        secrets[name] = SecretConfig(value=secret.value, hosts=secret.hosts, placeholder=placeholder)
    return secrets
