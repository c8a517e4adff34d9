"""Count and classify every failing pjdfstest assertion in the logs `pjdfstest_run.py` saves.

Each log line is "FILE: TAP-LINE". Every "not ok" gets one category, tried in this order:

- `device node refused`: `mknod NAME b|c` expected to succeed, got EPERM;
- `cascade of <category>`: the assertion names a file (or a directory above it) whose latest create
  in the same test file failed (so its ENOENT, or the wrong stat, follows from that failure alone);
- `probable cascade of <category>`: in a file with a failed create, an expectation of "ENOENT" as
  an inode or among other fields: a value the suite captured from a file that was never made;
- otherwise `SYSCALL: expected E, got R` (numbers in either side normalised to N; stat calls also
  name the fields they read, `lstat uid,gid`).

A "not ok ... # TODO" is the suite's own known failure on this OS and is counted apart. With a
baseline log (the guest's root filesystem, the first log named pjd-root.log), each category also says
how many of its assertions fail there too (same file, same assertion number): those are not ours.
Each log's failures, one a line with their category, are written beside it as LOG.failures.tsv.

Usage: python benchmarks/pjdfstest_summary.py OUT/pjd-root.log OUT/pjd-memory.log ...
       python benchmarks/pjdfstest_summary.py --compare BEFORE.log AFTER.log   # what a fix removed
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

LINE = re.compile(r"^(?P<file>[\w-]+/\d+\.t): (?P<tap>.*)$")
OK = re.compile(r"^ok (?P<n>\d+)(?: - tried '(?P<args>.*)', expected (?P<expected>.*))?$")
NOT_OK = re.compile(r"^not ok (?P<n>\d+)(?P<rest>.*)$")
TRIED = re.compile(r"^ - tried '(?P<args>.*)', expected (?P<expected>.*), got (?P<got>.*)$")
FILE_DONE = re.compile(r"^## (?P<file>[\w-]+/\d+\.t) rc=(?P<rc>\d+) seconds=(?P<s>\d+)")
DONE = re.compile(r"^## done in (?P<s>\d+) s")
# Syscalls whose argument names a path they create when they succeed (index of that argument).
CREATES = {"create": 0, "open": 0, "mkdir": 0, "mkfifo": 0, "mknod": 0, "bind": 0, "symlink": 1, "link": 1,
           "rename": 1}  # fmt: skip
STATS = ("stat", "lstat", "fstat", "fstatat")


@dataclass
class Failure:
    file: str
    n: int
    text: str
    category: str = ""


@dataclass
class Log:
    path: Path
    assertions: int = 0
    ok: int = 0
    todo: int = 0
    files: set[str] = field(default_factory=set)
    failures: list[Failure] = field(default_factory=list)
    seconds: int | None = None
    nonzero_rc: list[str] = field(default_factory=list)

    @property
    def failing_files(self) -> set[str]:
        return {f.file for f in self.failures}


def _syscall(args: list[str]) -> tuple[str, list[str]]:
    """The first syscall and its arguments, past pjdfstest's -u/-g/-U options ("a : b" chains keep a)."""
    i = 0
    while i + 1 < len(args) and args[i] in ("-u", "-g", "-U"):
        i += 2
    call = args[i:] if i < len(args) else [""]
    if ":" in call:
        call = call[: call.index(":")]
    return call[0], call[1:]


def _created(args: list[str]) -> str | None:
    """The path `args` creates if it succeeds, or None."""
    name, rest = _syscall(args)
    index = CREATES.get(name)
    if index is None or index >= len(rest):
        return None
    if name == "open" and (len(rest) < 2 or "O_CREAT" not in rest[1]):
        return None
    return rest[index]


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _norm(value: str) -> str:
    return re.sub(r"\d+", "N", value) if not re.fullmatch(r"E[A-Z]+|0", value) else value


def _classify(args: list[str], expected: str, got: str, failed_creates: dict[str, str], first: str) -> str:
    """`first`: the category of the file's first failed create so far ("" if none)."""
    name, rest = _syscall(args)
    if name == "mknod" and len(rest) > 1 and rest[1] in ("b", "c") and got == "EPERM" and expected == "0":
        return "device node refused (mknod b/c: EPERM)"
    created = _created(args) if expected == "0" else None
    for arg in args:
        for path in (*_prefixes(arg), *(() if arg == created else (arg,))):
            if path in failed_creates:
                return f"cascade of: {failed_creates[path]}"
    if first and (expected.startswith("ENOENT,") or (expected == "ENOENT" and rest[-1:] == ["inode"])):
        # The suite captured a value (`inode=$(pjdfstest lstat ...)`) from a file it never made, and
        # expects that "ENOENT" back from a file that does exist: follows from an earlier failure.
        return f"probable cascade of: {first} (a value captured from it)"
    if name in STATS and rest:  # which fields it read: "stat uid,gid"
        name = f"{name} {rest[-1]}"
    return f"{name}: expected {_norm(expected)}, got {_norm(got)}"


def parse(path: Path) -> Log:
    log = Log(path)
    failed_creates: dict[str, dict[str, str]] = defaultdict(dict)  # file -> path -> category of the failure
    first_failed: dict[str, str] = {}  # file -> category of its first failed create
    for raw in path.read_text(errors="replace").splitlines():
        if m := FILE_DONE.match(raw):
            log.files.add(m["file"])
            if m["rc"] != "0":
                log.nonzero_rc.append(f"{m['file']} rc={m['rc']}")
            continue
        if m := DONE.match(raw):
            log.seconds = int(m["s"])
            continue
        if not (m := LINE.match(raw)):
            continue
        file, tap = m["file"], m["tap"]
        log.files.add(file)
        creates = failed_creates[file]
        if ok := OK.match(tap):
            log.assertions += 1
            log.ok += 1
            if ok["args"] and ok["expected"] == "0" and (made := _created(ok["args"].split())):
                creates.pop(made, None)
            continue
        if not (bad := NOT_OK.match(tap)):
            continue
        log.assertions += 1
        rest = bad["rest"]
        if "# TODO" in rest:
            log.todo += 1
            continue
        failure = Failure(file, int(bad["n"]), tap)
        if tried := TRIED.match(rest):
            args = tried["args"].split()
            failure.category = _classify(args, tried["expected"], tried["got"], creates, first_failed.get(file, ""))
            if tried["expected"] == "0" and (made := _created(args)):
                creates[made] = failure.category.removeprefix("cascade of: ")
                first_failed.setdefault(file, creates[made])
        else:
            failure.category = f"check without a syscall ({rest.strip() or 'test_check'})"
        log.failures.append(failure)
    return log


def print_summary(paths: list[Path]) -> None:
    logs = [parse(p) for p in paths]
    baseline = next((log for log in logs if log.path.name == "pjd-root.log"), None)
    base_keys = {(f.file, f.n) for f in baseline.failures} if baseline else set()
    for log in logs:
        time_note = f", {log.seconds} s" if log.seconds is not None else ", incomplete (no end marker)"
        print(f"\n== {log.path.name}: {log.assertions} assertions, {len(log.failures)} not ok (+{log.todo} TODO), "
              f"in {len(log.failing_files)} of {len(log.files)} files{time_note}")  # fmt: skip
        if log.nonzero_rc:
            print(f"   files that exited non-zero: {', '.join(log.nonzero_rc)}")
        counts: Counter[str] = Counter(f.category for f in log.failures)
        on_base: Counter[str] = Counter(f.category for f in log.failures if (f.file, f.n) in base_keys)
        files: dict[str, set[str]] = defaultdict(set)
        for f in log.failures:
            files[f.category].add(f.file)
        for category, count in counts.most_common():
            base = f", {on_base[category]} also on root" if baseline is not None and log is not baseline else ""
            names = sorted(files[category])
            shown = ", ".join(names[:6]) + (f" +{len(names) - 6}" if len(names) > 6 else "")
            print(f"  {count:5d}  {category}{base}  [{len(names)} files: {shown}]")
        with open(f"{log.path}.failures.tsv", "w") as out:
            for f in log.failures:
                also = "root-too" if (f.file, f.n) in base_keys and log is not baseline else ""
                out.write(f"{f.file}\t{f.n}\t{f.category}\t{also}\t{f.text}\n")


def compare(before: Path, after: Path) -> None:
    """Which failures of `before` are gone in `after` (same file and assertion number), by category, and
    which are new: after a fix, this shows what it removed (a cascade's whole tail goes with its cause)."""
    old, new = parse(before), parse(after)
    old_keys, new_keys = {(f.file, f.n) for f in old.failures}, {(f.file, f.n) for f in new.failures}
    gone = Counter(f.category for f in old.failures if (f.file, f.n) not in new_keys)
    added = Counter(f.category for f in new.failures if (f.file, f.n) not in old_keys)
    print(f"{before.name} -> {after.name}: {len(old.failures)} -> {len(new.failures)} not ok; "
          f"{sum(gone.values())} gone, {sum(added.values())} new")  # fmt: skip
    for label, counts in (("gone", gone), ("new", added)):
        for category, count in counts.most_common():
            print(f"  {label} {count:5d}  {category}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--compare" and len(sys.argv) == 4:
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        print_summary([Path(p) for p in sys.argv[1:]])
