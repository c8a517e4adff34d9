"""The workload's capability drop, done for real in a forked child (the tests run as root)."""

from __future__ import annotations

import json
import os

from matchlock.guest import process, syscalls

CAP_SYS_ADMIN = 21
CAP_SYSLOG = 34


def _sets_in_child(drop) -> dict[str, int]:
    """Run `drop` in a forked child; returns its capability sets from /proc/self/status."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            drop()
            with open("/proc/self/status") as f:
                sets = {k: int(v, 16) for k, v in (line.split(":") for line in f if line.startswith("Cap"))}
            os.write(write_end, json.dumps(sets).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def test_root_keeps_only_the_workload_set_in_every_set():
    def drop() -> None:
        process._drop_bounding_capabilities()
        syscalls.capset(process._KEPT_MASK, process._KEPT_MASK, 0)
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)

    kept = process._KEPT_MASK
    assert _sets_in_child(drop) == {"CapInh": 0, "CapPrm": kept, "CapEff": kept, "CapBnd": kept, "CapAmb": 0}
    assert not kept >> CAP_SYS_ADMIN & 1 and not kept >> CAP_SYSLOG & 1
    # Docker's default set, less CAP_MKNOD: what lets an image's root chown, switch users and bind port 80.
    assert set(process.WORKLOAD_CAPABILITIES) == {
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
        "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE", "CAP_SETFCAP",
    }  # fmt: skip


def test_capset_cannot_raise_what_was_dropped():
    def raise_again() -> None:
        syscalls.capset(process._KEPT_MASK, process._KEPT_MASK, 0)
        try:
            syscalls.capset(1 << CAP_SYS_ADMIN, 1 << CAP_SYS_ADMIN, 0)
        except PermissionError:
            return
        raise AssertionError("capset raised CAP_SYS_ADMIN back")

    sets = _sets_in_child(raise_again)
    assert sets["CapEff"] == process._KEPT_MASK
