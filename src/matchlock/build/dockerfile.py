"""Dockerfile syntax: the `dockerfile` package (BuildKit's own Go parser) plus our validation.

The parser handles continuations, comments, the `escape` directive and
heredocs exactly as BuildKit does. What it leaves to the frontend, we check
here: known instructions, FROM first, per-instruction flags and arities, each
error naming `file:line`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile as _parser

from ..api.errors import UsageError

# Flags each instruction accepts (BuildKit's names); anything else is refused, not ignored.
# Flags an instruction may repeat: kept in order in `Instruction.mounts`, not in `flags`.
REPEATED = frozenset({"mount"})
FLAGS: dict[str, frozenset[str]] = {
    "FROM": frozenset({"platform"}),
    "RUN": frozenset({"mount"}),
    "COPY": frozenset({"from", "chown", "chmod", "link"}),
    "ADD": frozenset({"chown", "chmod", "link"}),
    "HEALTHCHECK": frozenset({"interval", "timeout", "start-period", "start-interval", "retries"}),
}
INSTRUCTIONS = frozenset(FLAGS) | frozenset(
    {"ARG", "CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "MAINTAINER", "ONBUILD", "SHELL", "STOPSIGNAL", "USER",
     "VOLUME", "WORKDIR"}
)  # fmt: skip
_ESCAPE_DIRECTIVE = re.compile(r"^#\s*escape\s*=\s*(\S)\s*$", re.IGNORECASE)
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class Instruction:
    cmd: str  # upper case
    args: tuple[str, ...]  # unexpanded words as the parser split them
    flags: dict[str, str]
    json: bool  # exec (JSON array) form
    line: int
    original: str  # the instruction's text, continuations joined (cache keys, progress lines)
    heredocs: tuple[tuple[str, str], ...] = ()  # (name, content)
    mounts: tuple[str, ...] = ()  # RUN --mount values, unexpanded, in order (build/mounts.py reads them)

    @property
    def text(self) -> str:
        """After the keyword and flags: the shell-form body (heredocs included, for `sh -c`)."""
        body = self.original.split(None, 1)[1] if " " in self.original.strip() else ""
        for _ in range(len(self.flags) + len(self.mounts)):
            body = body.split(None, 1)[1] if " " in body else ""
        return body.strip() if not self.heredocs else body


@dataclass
class Stage:
    index: int
    base: str  # unexpanded FROM argument
    name: str  # lower-cased `AS` name, or ""
    platform: str
    line: int
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: str
    escape: str
    global_args: list[Instruction]  # ARGs before the first FROM
    stages: list[Stage]

    def stage(self, ref: str) -> Stage | None:
        """An earlier stage by name or index (COPY --from, FROM)."""
        lowered = ref.lower()
        for stage in self.stages:
            if stage.name == lowered or (ref.isdigit() and int(ref) == stage.index):
                return stage
        return None


def _escape_char(text: str) -> str:
    """The escape directive, read from the leading comment lines as BuildKit does."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        match = _ESCAPE_DIRECTIVE.match(stripped)
        if match:
            char = match.group(1)
            if char not in ("\\", "`"):
                raise UsageError(f"invalid escape directive {char!r}: must be ` or \\")
            return char
        if not _DIRECTIVE.match(stripped):
            break
    return "\\"


def _error_line(text: str, message: str) -> int:
    """The first line at which the Go parser's message appears (it reports none itself)."""
    lines = text.splitlines(keepends=True)
    for count in range(1, len(lines) + 1):
        try:
            _parser.parse_string("".join(lines[:count]))
        except _parser.GoParseError as exc:
            if str(exc) == message:
                return count
    return len(lines)


def _flags(command, where: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """(the single flags by name, the values of the repeatable --mount in order)."""
    allowed = FLAGS.get(command.cmd.upper(), frozenset())
    flags: dict[str, str] = {}
    repeated: list[str] = []
    for raw in command.flags:
        name, sep, value = raw[2:].partition("=")
        if not raw.startswith("--") or name not in allowed:
            hint = f"; {command.cmd.upper()} accepts: {', '.join('--' + f for f in sorted(allowed))}" if allowed else ""
            raise UsageError(f"{where}: unsupported flag {raw.split('=')[0]!r} for {command.cmd.upper()}{hint}")
        if not sep and name != "link":
            raise UsageError(f"{where}: flag --{name} needs a value (--{name}=VALUE)")
        if name in REPEATED:
            repeated.append(value)
        else:
            flags[name] = value
    return flags, tuple(repeated)


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """Parse and validate; every error names `path:line`."""
    escape = _escape_char(text)
    try:
        commands = _parser.parse_string(text)
    except _parser.GoParseError as exc:
        raise UsageError(f"{path}:{_error_line(text, str(exc))}: {exc}") from None
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for command in commands:
        cmd = command.cmd.upper()
        where = f"{path}:{command.start_line}"
        if cmd not in INSTRUCTIONS:
            raise UsageError(f"{where}: unknown instruction {command.cmd}")
        flags, repeated = _flags(command, where)
        inst = Instruction(
            cmd=cmd,
            args=tuple(command.value),
            flags=flags,
            json=command.json,
            line=command.start_line,
            original=command.original,
            heredocs=tuple((h.name, h.content) for h in command.heredocs),
            mounts=repeated,
        )
        _check_arity(inst, where)
        if cmd == "FROM":
            name = ""
            if len(inst.args) == 3 and inst.args[1].upper() == "AS":
                name = inst.args[2].lower()
                if not re.fullmatch(r"[a-z][a-z0-9._-]*", name):
                    raise UsageError(f"{where}: invalid stage name {inst.args[2]!r}")
                if any(stage.name == name for stage in stages):
                    raise UsageError(f"{where}: duplicate stage name {name!r}")
            elif len(inst.args) != 1:
                raise UsageError(f"{where}: FROM takes IMAGE [AS NAME], got {' '.join(inst.args)!r}")
            stages.append(Stage(len(stages), inst.args[0], name, flags.get("platform", ""), command.start_line))
        elif not stages:
            if cmd != "ARG":
                raise UsageError(f"{where}: {cmd} before the first FROM; a Dockerfile must start with FROM")
            global_args.append(inst)
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise UsageError(f"{path}: no FROM instruction; a Dockerfile must start with FROM")
    return Dockerfile(path, escape, global_args, stages)


def _check_arity(inst: Instruction, where: str) -> None:
    args = [a for a in inst.args if a]
    if inst.cmd in ("COPY", "ADD") and len(args) < 2 and not inst.heredocs:
        raise UsageError(f"{where}: {inst.cmd} needs at least one source and a destination")
    if inst.cmd in ("COPY", "ADD") and inst.heredocs and not args:
        raise UsageError(f"{where}: {inst.cmd} needs a destination")
    if (
        inst.cmd in ("RUN", "WORKDIR", "USER", "STOPSIGNAL", "ARG", "EXPOSE", "VOLUME", "SHELL", "ENV", "LABEL")
        and not args
    ):
        raise UsageError(f"{where}: {inst.cmd} needs an argument")
    if inst.cmd in ("WORKDIR", "USER", "STOPSIGNAL") and len(args) != 1:
        raise UsageError(f"{where}: {inst.cmd} takes exactly one argument")
    if inst.cmd == "SHELL" and not inst.json:
        raise UsageError(f'{where}: SHELL requires the JSON form, e.g. SHELL ["/bin/sh", "-c"]')


def read(path: Path, shown: str) -> Dockerfile:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"Dockerfile not found: {path}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{shown}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, shown)


def canonical(inst: Instruction) -> str:
    """Stable text for cache keys: keyword, sorted flags, arguments (and RUN's --mount specs, in order)."""
    parts = [inst.cmd, sorted(inst.flags.items()), inst.json, list(inst.args), list(inst.heredocs)]
    if inst.mounts:  # only then, so the keys of steps without mounts stay what they were
        parts.append(list(inst.mounts))
    return json.dumps(parts)
